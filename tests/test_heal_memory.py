"""Healing that fits (issue 32, item 4): optimizers that keep bf16 updates and shrink the state,
SVD-LLM's sequential update (one factor at a time) and gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

from test_lm_scale import _cfg, _src, texts  # noqa: F401  (texts is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _steps(opt_name, p0, steps=20, lr=5e-5):
    from factorlm.train.optim import make_optimizer

    p = torch.nn.Parameter(p0.clone())
    opt = make_optimizer([{"params": [p]}], opt_name, lr, 0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()
    return p.detach(), opt


def test_torch_adamw_loses_bf16_updates_that_stochastic_rounding_keeps():
    """The same 20 AdamW steps from the same bf16 weights: torch's AdamW moves them much less than the
    fp32 run does (small updates are rounded away), torchao's stochastic rounding matches fp32 on
    average (within 10%)."""
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    ref = (_steps("adamw", w)[0] - w).abs().mean()
    w16 = w.bfloat16()
    plain = (_steps("adamw", w16)[0].float() - w16.float()).abs().mean()
    sr = (_steps("adamw-sr", w16)[0].float() - w16.float()).abs().mean()
    assert plain < 0.75 * ref, (plain, ref)
    assert abs(sr / ref - 1) < 0.10, (sr, ref)
    # and the mean update direction survives: SR's drift agrees with fp32's
    d_ref = _steps("adamw", w)[0] - w
    d_sr = _steps("adamw-sr", w16)[0].float() - w16.float()
    assert torch.nn.functional.cosine_similarity(d_ref.flatten(), d_sr.flatten(), dim=0) > 0.8


def test_adamw8bit_state_is_a_quarter_of_fp32_adam():
    from factorlm.train.optim import state_bytes

    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(2)) * 0.02
    _, full = _steps("adamw", w, steps=1)
    _, small = _steps("adamw8bit", w, steps=1)
    assert state_bytes(full) >= 2 * 4 * w.numel()
    assert state_bytes(small) <= 0.3 * state_bytes(full), (state_bytes(small), state_bytes(full))


def _heal(tmp_path, texts, name, **kw):
    from factorlm.api import compress

    src = _src(tmp_path) if not (tmp_path / "src").exists() else tmp_path / "src"
    cfg = _cfg(src, *texts, tmp_path / name, heal_samples=8, learning_rate=1e-3, batch_size=4, warmup_ratio=0.0, **kw)
    return compress(cfg, quiet=True, save=False)


def test_sequential_update_trains_A_then_B(tmp_path, texts):
    """``--heal-update sequential`` (SVD-LLM): with one step only A moves; with two, B moves too, and
    each phase's optimizer holds state for one factor only."""
    base = _heal(tmp_path, texts, "o0").model.state_dict()
    one = _heal(tmp_path, texts, "o1", heal_steps=1, heal_update="sequential")
    moved = {k.rsplit(".", 1)[-1] for k, v in one.model.state_dict().items() if not torch.equal(v, base[k])}
    assert moved == {"A"}
    assert [p["name"] for p in one.info["heal"]["phases"]] == ["heal-A"]
    two = _heal(tmp_path, texts, "o2", heal_steps=2, heal_update="sequential")
    moved = {k.rsplit(".", 1)[-1] for k, v in two.model.state_dict().items() if not torch.equal(v, base[k])}
    assert moved == {"A", "B"}
    ph = two.info["heal"]["phases"]
    assert [p["name"] for p in ph] == ["heal-A", "heal-B"]
    n_a = sum(v.numel() for k, v in base.items() if k.endswith(".A"))
    assert ph[0]["trainable_params"] == n_a


def test_gradient_checkpointing_gives_the_same_healed_weights(tmp_path, texts):
    a = _heal(tmp_path, texts, "a", heal_steps=2)
    b = _heal(tmp_path, texts, "b", heal_steps=2, heal_checkpointing=True)
    assert b.info["heal"]["gradient_checkpointing"] and not a.info["heal"]["gradient_checkpointing"]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=1e-5)
    m = b.model
    on = m.is_activation_checkpointing if hasattr(type(m), "is_activation_checkpointing") else m.is_gradient_checkpointing
    assert not on  # switched off again after healing


def test_auto_optimizer_picks_stochastic_rounding_for_bf16(tmp_path, texts):
    from factorlm.api import compress

    src = _src(tmp_path, torch.bfloat16, name="bf")
    rep = compress(_cfg(src, *texts, tmp_path / "o", heal_steps=1, heal_samples=4, batch_size=4), quiet=True,
                   save=False)
    assert rep.info["heal"]["optimizer"] == "adamw-sr"
    rep = _heal(tmp_path, texts, "f", heal_steps=1)
    assert rep.info["heal"]["optimizer"] == "adamw"
