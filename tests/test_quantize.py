"""decompose.quantize: RTN against an independent numpy implementation, exact byte counts, and the
whitened error correction (EoRA) against an independent fp64 SVD of E S and against every other rank-k
correction tried."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from factorlm.decompose.quantize import error_correction, rtn, rtn_bytes
from factorlm.decompose.whiten import GramScale
from factorlm.errors import FactorLMError

from conftest import bf16_ceil_reference


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 16), (8, 64)])
def test_rtn_matches_a_numpy_reference(bits, group):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(24, 128, generator=g) * torch.rand(24, 1, generator=g)
    codes, scales, W_hat = rtn(W, bits, group)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    x = W.numpy().reshape(24, 128 // group, group).astype(np.float64)
    s = np.abs(x).max(axis=2, keepdims=True).astype(np.float32) / np.float32((hi - lo) / 2)
    s = bf16_ceil_reference(s).astype(np.float64)  # one bf16 scale per group, rounded up, as stored
    q = np.clip(np.round(x / s), lo, hi)
    ref = (q * s).reshape(24, 128)
    assert codes.dtype == torch.int8 and int(codes.min()) >= lo and int(codes.max()) <= hi
    assert scales.shape == (24, 128 // group) and scales.dtype == torch.bfloat16
    # ties of x / s at .5 may round either way in float32 vs float64: allow one step on a few entries
    diff = np.abs(W_hat.double().numpy() - ref)
    step = np.repeat(s.reshape(24, -1), group, axis=1)
    assert (diff <= 1e-6 + 1e-6 * np.abs(ref)).mean() > 0.995 and (diff <= step + 1e-6).all()
    assert rtn_bytes((24, 128), bits, group) == (24 * 128 * bits + 7) // 8 + 2 * 24 * (128 // group)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("zero_point", [False, True])
def test_every_weight_lies_within_half_a_step_of_its_code(bits, zero_point):
    """Round to nearest on a grid that covers the group: no weight, the group's extremes included, errs by more
    than half a step.  A bf16 scale rounded *down* (a plain cast) clips the largest weight of a fifth to a
    quarter of the groups (int8: by up to a whole step), so this fails without the round-up."""
    from factorlm.decompose.quantize import bf16_ceil, quantize_groups

    g = torch.Generator().manual_seed(10 * bits + zero_point)
    W = torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g) + 0.3 * zero_point
    codes, scales, zeros, W_hat = quantize_groups(W, bits, 32, zero_point)
    step = scales.float().repeat_interleave(32, dim=1)
    assert ((W - W_hat).abs() <= 0.5 * step * (1 + 1e-5)).all()
    # the scale is the least bf16 value that covers the group: the float32 scale rounded up, never down
    x = W.numpy().reshape(64, 8, 32)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if zero_point:  # torchao's asymmetric range, widened to include 0
        s32 = (np.maximum(x.max(axis=2), 0) - np.minimum(x.min(axis=2), 0)).astype(np.float32) / np.float32(hi - lo)
    else:
        s32 = np.abs(x).max(axis=2).astype(np.float32) / np.float32((hi - lo) / 2)
    assert torch.equal(scales.float(), torch.from_numpy(bf16_ceil_reference(s32)))
    x = torch.tensor([1.0, 1.0 + 2 ** -9, 1.0 + 2 ** -7, 3.0e-3])  # exact, below half an ulp, exact, inexact
    up = bf16_ceil(x).float()
    assert (up >= x).all() and torch.equal(up[:3], torch.tensor([1.0, 1.0 + 2 ** -7, 1.0 + 2 ** -7]))
    assert torch.equal(up, torch.from_numpy(bf16_ceil_reference(x.numpy())))


def test_rtn_refuses_a_group_that_does_not_divide_the_width():
    with pytest.raises(FactorLMError, match="group size 48 must divide"):
        rtn(torch.randn(4, 64), 4, 48)


def _gram(n_in, cond, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n_in, n_in, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, -np.log10(cond), n_in, dtype=torch.float64)
    return (Q * lam) @ Q.T


@pytest.mark.parametrize("shape", [(48, 64), (64, 40)])
def test_error_correction_is_the_optimal_rank_k_fit_in_the_input_space(shape):
    """||(E - AB) S||_F equals the tail of E S's singular values (numpy fp64 SVD), and no other rank-k
    correction (plain SVD of E, random) does better under the Gram."""
    out, n_in = shape
    g = torch.Generator().manual_seed(3)
    W = torch.randn(out, n_in, generator=g, dtype=torch.float64)
    _, _, W_hat = rtn(W.float(), 3, 8)
    W_hat = W_hat.double()
    G = _gram(n_in, 1e6, 4)
    S = np.linalg.cholesky(G.numpy() + 1e-12 * np.eye(n_in))
    E = (W - W_hat).numpy()
    k = 6
    A, B = error_correction(W, W_hat, k, GramScale(G, 0.0))
    got = np.linalg.norm((E - (A @ B).numpy()) @ S)
    sv = np.linalg.svd(E @ S, compute_uv=False)
    assert got == pytest.approx(np.sqrt((sv[k:] ** 2).sum()), rel=1e-7)
    U, s, Vt = np.linalg.svd(E)
    plain = (U[:, :k] * s[:k]) @ Vt[:k]
    assert got < np.linalg.norm((E - plain) @ S)
    rng = np.random.default_rng(0)
    for _ in range(20):  # rank-k neighbours of the fit
        C = (A.numpy() + 1e-3 * rng.standard_normal((out, k))) @ (B.numpy() + 1e-3 * rng.standard_normal((k, n_in)))
        assert got <= np.linalg.norm((E - C) @ S) + 1e-12
    # the corrected layer's output error is below RTN's alone
    assert got < np.linalg.norm(E @ S)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 1001])
def test_pack_bits_round_trips_bit_exactly_in_the_stated_bytes(bits, n):
    from factorlm.decompose.quantize import pack_bits, qrange, unpack_bits

    lo, hi = qrange(bits)
    codes = torch.randint(lo, hi + 1, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.int64).to(torch.int8)
    codes[0] = lo
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
    assert torch.equal(unpack_bits(packed, bits, n), codes)
    if bits == 4 and n == 8:  # the layout: little-endian, offset by 8
        c = torch.tensor([-8, 7, 0, 1, -1, 2, 3, -3], dtype=torch.int8)
        assert pack_bits(c, 4).tolist() == [0 | (15 << 4), 8 | (9 << 4), 7 | (10 << 4), 11 | (5 << 4)]


@pytest.mark.parametrize("rank", [0, 5])
def test_quant_lowrank_layer_round_trips_through_its_spec_and_counts_its_bytes(rank):
    """``QuantLowRankLinear``: forward = x (Q(W) + A B)^T + b; the stored bytes are the packed codes,
    the bf16 scales and the factors; a module rebuilt from its spec and state dict is bit-identical."""
    from factorlm.layers import QuantLowRankLinear, structure_from_spec

    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 64, generator=g)
    b = torch.randn(24, generator=g)
    m = QuantLowRankLinear.from_weight(W, 3, 16, rank, bias=b)
    x = torch.randn(5, 64, generator=g)
    _, _, W_hat = rtn(W, 3, 16)
    dense = W_hat + (m.A @ m.B if rank else 0)
    torch.testing.assert_close(m(x), x @ dense.T + b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.to_dense(), dense, atol=0, rtol=0)
    assert m.weight_bytes() == rtn_bytes((24, 64), 3, 16) + rank * (24 + 64) * 4
    assert m.num_params() == 24 * 64 + rank * 88 + 24
    n = structure_from_spec(m.spec())
    n.load_state_dict(m.state_dict())
    torch.testing.assert_close(n(x), m(x), atol=0, rtol=0)
    if rank:  # the correction lowers the error of the quantized layer
        assert (W - m.to_dense()).norm() < (W - W_hat).norm()
    h = m.to(torch.bfloat16)  # the factors follow the dtype; codes and scales stay as stored
    assert h.qweight.dtype == torch.uint8 and h.scales.dtype == torch.bfloat16 and h.weight_dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [3, 4])
def test_zero_points_are_stored_packed_to_the_codes_bits_and_old_folders_load(bits):
    """With zero points the layer stores them bit-packed (``qzeros``, ``ceil(groups * bits / 8)`` bytes), unpacks
    exactly the zero points RTN chose, and computes ``(codes - zero) * scale``; a state dict of the earlier
    format (an int8 ``zeros`` buffer of the same values) loads to the bit-identical layer."""
    from factorlm.decompose.quantize import quantize_groups
    from factorlm.layers import QuantLowRankLinear, structure_from_spec

    g = torch.Generator().manual_seed(bits)
    W = torch.randn(24, 96, generator=g) + 0.4
    m = QuantLowRankLinear.from_weight(W, bits, 32, 0, zero_point=True)
    codes, scales, zeros, W_hat = quantize_groups(W, bits, 32, zero_point=True)
    assert m.qzeros.dtype == torch.uint8 and m.qzeros.numel() == (24 * 3 * bits + 7) // 8
    assert torch.equal(m.zeros, zeros) and torch.equal(m.to_dense(), W_hat)
    assert m.weight_bytes() == rtn_bytes((24, 96), bits, 32, zero_point=True) == \
        (24 * 96 * bits + 7) // 8 + 2 * 24 * 3 + (24 * 3 * bits + 7) // 8
    assert "zeros" not in m.state_dict() and "qzeros" in m.state_dict()
    old = {k: v for k, v in m.state_dict().items() if k != "qzeros"} | {"zeros": zeros.clone()}
    n = structure_from_spec(m.spec())
    n.load_state_dict(old)
    assert torch.equal(n.qzeros, m.qzeros) and torch.equal(n.to_dense(), m.to_dense())
    assert "zeros" in old  # the caller's dict is left as it was


# ------------------------------------------------------------------------ --method rtn / rtn-lowrank
def _lm_cfg(tmp_path, **kw):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_lm_scale import TEXT, _cfg, _src

    cal, ev = tmp_path / "cal.txt", tmp_path / "eval.txt"
    cal.write_text(TEXT)
    ev.write_text(TEXT[::-1])
    src = tmp_path / "src" if (tmp_path / "src").exists() else _src(tmp_path)
    return _cfg(src, cal, ev, tmp_path / kw.pop("name", "out"), **kw)


def test_rtn_lowrank_stores_the_bytes_it_reports_within_the_budget_and_reloads_exactly(tmp_path):
    """``--method rtn-lowrank --keep 0.8 --bits 3 --group-size 16``: every target is a QuantLowRankLinear whose
    stored bytes (packed codes + bf16 scales + fp32 factors) sum to the report's ``target_bytes_after``,
    at most 0.8 of the targets' bf16 bytes; the saved folder reloads to the same logits."""
    from factorlm import models
    from factorlm.api import compress
    from factorlm.layers import QuantLowRankLinear
    from factorlm.models.surgery import get_module

    opts = {"bits": 3, "group_size": 16, "factor_bits": 16, "byte_plan": "uniform"}
    rep = compress(_lm_cfg(tmp_path, method="rtn-lowrank", keep=0.8, method_options=opts), quiet=True)
    acc, ranks = rep.accounting, rep.info["ranks"]
    mods = {n: get_module(rep.model, n) for n in ranks}
    assert all(isinstance(m, QuantLowRankLinear) and m.bits == 3 for m in mods.values())
    # zero points on by default at 3 bits: one int8 per group beside its bf16 scale
    assert all(m.zero_point for m in mods.values()) and acc["quantized"]["zero_point"] is True
    expect = sum(rtn_bytes((m.out_features, m.in_features), 3, 16, True) + m.rank * (m.out_features + m.in_features) * 4
                 for m in mods.values())
    assert acc["target_bytes_after"] == expect
    assert expect <= 0.8 * 2 * acc["target_weights_before"] and min(ranks.values()) >= 1
    assert acc["quantized"]["bits"] == 3
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    loaded = models.load(tmp_path / "out")
    torch.testing.assert_close(loaded(ids).logits, rep.model(ids).logits, atol=0, rtol=0)
    # quantization alone at the same bits: no correction, fewer bytes
    alone = compress(_lm_cfg(tmp_path, method="rtn", method_options={"bits": 3, "group_size": 16}, name="rtn"),
                     quiet=True, save=False)
    assert set(alone.info["ranks"].values()) == {0}
    assert alone.accounting["target_bytes_after"] < expect


def test_a_folder_saved_with_int8_zero_points_still_loads(tmp_path):
    """Folders written before the zero points were bit-packed hold an int8 ``<layer>.zeros`` (out, groups) and
    no ``qzeros``: ``factorlm.load`` (header check included) reads them into the same layers, same logits."""
    from safetensors.torch import load_file, save_file

    from factorlm import models
    from factorlm.api import compress
    from factorlm.layers import QuantLowRankLinear

    opts = {"bits": 3, "group_size": 16, "factor_bits": 16, "byte_plan": "uniform"}
    rep = compress(_lm_cfg(tmp_path, method="rtn-lowrank", keep=0.5, method_options=opts), quiet=True)
    f = tmp_path / "out" / "model.safetensors"
    state = load_file(str(f))
    mods = {n: m for n, m in rep.model.named_modules() if isinstance(m, QuantLowRankLinear)}
    assert mods and all(f"{n}.qzeros" in state for n in mods)
    for n, m in mods.items():
        del state[f"{n}.qzeros"]
        state[f"{n}.zeros"] = m.zeros.contiguous()
    save_file(state, str(f), metadata={"format": "pt"})
    loaded = models.load(tmp_path / "out")
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loaded(ids).logits, rep.model(ids).logits, atol=0, rtol=0)
    got = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLowRankLinear)}
    assert all(torch.equal(got[n].qzeros, m.qzeros) for n, m in mods.items())
    state[next(iter(state))] = torch.zeros(1)  # anything else still refused by the header check, in one line
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(FactorLMError, match="does not match"):
        models.load(tmp_path / "out")


def test_rtn_lowrank_refuses_a_budget_below_the_codes(tmp_path):
    from factorlm.api import compress

    with pytest.raises(FactorLMError, match="below what int3 in groups of 16 with zero points stores alone"):
        compress(_lm_cfg(tmp_path, method="rtn-lowrank", keep=0.1,
                         method_options={"bits": 3, "group_size": 16, "byte_plan": "uniform"}), quiet=True, save=False)
    with pytest.raises(FactorLMError, match=r"--bits must be in \[2, 8\], got 9"):
        compress(_lm_cfg(tmp_path, method="rtn-lowrank", method_options={"bits": 9}), quiet=True, save=False)
    with pytest.raises(FactorLMError, match="takes a byte budget"):
        compress(_lm_cfg(tmp_path, method="rtn-lowrank", rank_policy="global"), quiet=True, save=False)


def test_int8_factors_store_half_the_bytes_and_round_trip(tmp_path):
    """``factor_bits=8``: the correction's factors as int8 codes (groups of 32) + bf16 scales; the layer's
    bytes are exact, its dense weight is Q(W) + deq(A) deq(B), and it reloads bit-identically."""
    from factorlm.layers import QuantLowRankLinear, structure_from_spec

    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 96, generator=g)
    m8 = QuantLowRankLinear.from_weight(W, 3, 32, 8, factor_bits=8)
    m16 = QuantLowRankLinear.from_weight(W, 3, 32, 8)
    assert m8.A is None and m8.A_codes.dtype == torch.int8
    assert m8.weight_bytes() == rtn_bytes((64, 96), 3, 32) + 8 * (64 + 96) + 2 * 8 * (64 + 96) // 32
    A16, B16 = m16.factors()
    A8, B8 = m8.factors()
    assert (A8 - A16).abs().max() <= A16.abs().max() / 127 and (B8 - B16).abs().max() <= B16.abs().max() / 127
    n = structure_from_spec(m8.spec())
    n.load_state_dict(m8.state_dict())
    x = torch.randn(3, 96, generator=g)
    torch.testing.assert_close(n(x), m8(x), atol=0, rtol=0)
    torch.testing.assert_close(m8(x), x @ m8.to_dense().T, atol=1e-5, rtol=1e-5)


def test_rtn_lowrank_picks_bits_groups_and_zero_points_from_the_budget():
    from factorlm.lm.methods import get_lm_method

    shapes = {"a": (64, 576), "b": (64, 1536)}
    for keep, bits, group, zp in ((0.6, 8, 192, False), (0.3, 4, 192, True), (0.264, 4, 192, True),
                                  (0.25, 3, 32, True)):
        m = get_lm_method("rtn-lowrank", {})
        m.resolve(keep, shapes)
        q = m.quant
        assert (q.bits, q.group_size, q.zero_point) == (bits, group, zp), keep
    # the first preferred group whose codes fit: int3-g32 with zero points stores 0.234 of the bf16 bytes,
    # more than keep 0.22, int3-g64 0.211
    m = get_lm_method("rtn-lowrank", {})
    m.resolve(0.22, shapes)
    assert (m.options.bits, m.options.group_size) == (3, 64)
    m = get_lm_method("rtn-lowrank", {"bits": 4})
    m.resolve(0.3, {"a": (64, 4096), "b": (64, 14336)})  # Llama widths: 192 does not divide 4096
    assert m.options.group_size == 128
    m = get_lm_method("rtn-lowrank", {"bits": 4, "group_size": 64, "zero_point": False})
    m.resolve(0.3, shapes)
    q = m.quant
    assert (q.bits, q.group_size, q.factor_bits, q.zero_point, q.gptq) == (4, 64, 8, False, False)
    # zero points follow the bits where not given: rtn / gptq at 8 bits without, at 2-4 with
    assert get_lm_method("rtn", {"bits": 8, "group_size": 64}).quant.zero_point is False
    assert get_lm_method("gptq", {"bits": 3, "group_size": 64}).quant.zero_point is True


def test_task_lm_defaults_to_rtn_lowrank_on_the_cli():
    import argparse

    from factorlm.cli import _config_from_args

    assert _config_from_args(argparse.Namespace(task="lm")).method == "rtn-lowrank"
