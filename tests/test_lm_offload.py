"""--device / --offload (issue 32, item 2): blocks visiting the execution device one at a time through
accelerate's hooks, and evaluation through accelerate's dispatch with offloaded weights.

CPU-only machines have one device, so offloading here is to the *disk* (accelerate's weights map and
hooks, the same code path as CPU offloading next to a GPU): results must be bit-identical to the
unplaced model, and the model afterwards exactly what it was (no hook left, no meta tensor, ties kept)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from factorlm.errors import FactorLMError
from test_lm_scale import _cfg, _src, texts  # noqa: F401  (texts is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids():
    return torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(0))


def _no_hooks(model):
    return not any(hasattr(m, "_hf_hook") for m in model.modules())


def test_blocks_visit_gives_the_same_factors_and_leaves_no_hook(tmp_path):
    """The whitened factorization with the blocks under accelerate's chained CPU-offload hooks equals the
    one without, bit for bit; afterwards no hook is left and every tensor is on the CPU."""
    from factorlm.lm.calibrate import token_batches
    from factorlm.lm.factorize import factorize
    from factorlm.lm.methods import get_lm_method
    from factorlm.models.surgery import find_targets

    method = get_lm_method("whiten", {})
    windows = torch.randint(3, 99, (4, 16), generator=torch.Generator().manual_seed(1))
    out = []
    for offload in (None, torch.device("cpu")):
        torch.manual_seed(0)
        model = tiny_llama().eval()
        targets = find_targets(model, [], [], conv1d=True)
        ranks = {n: 4 for n in targets}
        info = factorize(model, targets, ranks, method, token_batches(windows, 2), mode="layer", offload_to=offload)
        assert info["calibration"]["blocks"] == len(model.model.layers)
        assert _no_hooks(model) and all(p.device.type == "cpu" for p in model.parameters())
        out.append(model)
    sd0, sd1 = out[0].state_dict(), out[1].state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), k
    torch.testing.assert_close(out[0](_ids()).logits, out[1](_ids()).logits, atol=0, rtol=0)


def test_dispatched_with_offloaded_blocks_matches_and_restores_the_model(tmp_path):
    """Perplexity and logits through accelerate's dispatch with half the blocks offloaded (to the disk
    here) equal the plain model's; on exit the weights are back, bit-identical, tied embeddings tied."""
    from factorlm.lm.perplexity import perplexity
    from factorlm.lm.placement import dispatched

    torch.manual_seed(0)
    model = tiny_llama().eval()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stream = torch.randint(3, 99, (200,), generator=torch.Generator().manual_seed(2))
    ref = perplexity(model, stream, seq_len=32)
    ref_logits = model(_ids()).logits
    dmap = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
            "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    with dispatched(model, torch.device("cpu"), "cpu", dmap=dmap, offload_dir=str(tmp_path / "off")):
        assert any(p.device.type == "meta" for p in model.model.layers[1].parameters())  # really offloaded
        got = perplexity(model, stream, seq_len=32)
        torch.testing.assert_close(model(_ids()).logits, ref_logits, atol=0, rtol=0)
    assert got["perplexity"] == ref["perplexity"]
    assert _no_hooks(model)
    after = model.state_dict()
    for k, v in before.items():
        assert after[k].device.type == "cpu" and torch.equal(after[k], v), k
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_dispatched_refuses_healing_with_weights_off_the_gpu(tmp_path):
    from factorlm.lm.placement import dispatched

    model = tiny_llama()
    dmap = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
            "lm_head": "cpu"}
    with pytest.raises(FactorLMError, match="healing needs every weight on a GPU"):
        with dispatched(model, torch.device("cpu"), "cpu", train=True, dmap=dmap, offload_dir=str(tmp_path)):
            pass


def test_compress_with_offload_equals_without(tmp_path, texts):
    """``--offload cpu --device cpu`` runs the whole pipeline (dense scores, sequential factorization with
    blocks visiting the device, one-shot scores, save) to the same numbers and weights as without."""
    from factorlm import models
    from factorlm.api import compress

    src = _src(tmp_path)
    reps = [compress(_cfg(src, *texts, tmp_path / f"o{off}", offload=off, device="cpu"), quiet=True)
            for off in ("none", "cpu")]
    assert reps[0].scores == reps[1].scores
    assert reps[1].info["offload"] == "cpu" and reps[1].info["device"] == "cpu"
    a, b = models.load(tmp_path / "onone"), models.load(tmp_path / "ocpu")
    torch.testing.assert_close(a(_ids()).logits, b(_ids()).logits, atol=0, rtol=0)


@pytest.mark.parametrize("kw,msg", [
    (dict(device="cuda:7"), "no CUDA GPU is visible|GPU"),
    (dict(device="tpu"), "--device must be"),
    (dict(offload="disk"), "--offload must be none or cpu"),
    (dict(offload="cpu", rank_policy="global"), "--global-score fisher .* --offload"),
])
def test_bad_device_settings_fail_before_work(tmp_path, texts, kw, msg):
    from factorlm.api import compress

    if kw.get("device") == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(FactorLMError, match=msg):
        compress(_cfg(tmp_path / "missing-model", *texts, tmp_path / "o", **kw), quiet=True)
    assert not (tmp_path / "o").exists()


def test_anchored_with_offloaded_blocks_copies_one_block_and_matches(tmp_path, monkeypatch):
    """``--sequential anchored`` under the chained offload hooks: each dense copy is one block (a plain
    deepcopy would follow the hook chain and copy the whole decoder), and the factors equal the unplaced run's."""
    import copy as copy_module

    from factorlm.lm import calibrate
    from factorlm.lm.calibrate import token_batches
    from factorlm.lm.factorize import factorize
    from factorlm.lm.methods import get_lm_method
    from factorlm.models.surgery import find_targets

    sizes, real = [], copy_module.deepcopy

    def counting(obj, *a, **k):
        out = real(obj, *a, **k)
        if isinstance(out, torch.nn.Module):
            sizes.append(sum(1 for _ in out.modules()))
        return out

    monkeypatch.setattr(calibrate.copy, "deepcopy", counting)
    method = get_lm_method("whiten", {"sequential": "anchored"})
    windows = torch.randint(3, 99, (4, 16), generator=torch.Generator().manual_seed(1))
    out = []
    for offload in (None, torch.device("cpu")):
        torch.manual_seed(0)
        model = tiny_llama().eval()
        block_modules = sum(1 for _ in model.model.layers[0].modules())
        targets = find_targets(model, [], [], conv1d=True)
        factorize(model, targets, {n: 4 for n in targets}, method, token_batches(windows, 2), mode="anchored",
                  offload_to=offload)
        assert _no_hooks(model)
        out.append(model.state_dict())
    assert sizes and max(sizes) == block_modules
    for k in out[0]:
        assert torch.equal(out[0][k], out[1][k]), k


def test_refine_with_offloaded_blocks_matches(tmp_path):
    """``--refine-steps`` under the chained offload hooks: the optimizer trains the block that visits the
    device, and the refined factors equal the unplaced run's bit for bit (no hook left)."""
    from factorlm.lm.calibrate import token_batches
    from factorlm.lm.factorize import factorize
    from factorlm.lm.methods import get_lm_method
    from factorlm.lm.refine import RefineSpec
    from factorlm.models.surgery import find_targets

    method = get_lm_method("whiten", {})
    windows = torch.randint(3, 99, (8, 16), generator=torch.Generator().manual_seed(1))
    out = []
    for offload in (None, torch.device("cpu")):
        torch.manual_seed(0)
        model = tiny_llama().eval()
        targets = find_targets(model, [], [], conv1d=True)
        info = factorize(model, targets, {n: 4 for n in targets}, method, token_batches(windows, 2), mode="layer",
                         offload_to=offload, refine=RefineSpec(16, 3e-3))
        assert info["refine"]["kept"] >= 1 and _no_hooks(model)
        out.append(model.state_dict())
    for k in out[0]:
        assert torch.equal(out[0][k], out[1][k]), k
