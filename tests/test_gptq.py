"""decompose.gptq against an independent fp64 reference (the unblocked OBS loop with an explicit inverse
downdate, not the Cholesky form), its RTN limit (H = I gives exactly torchao's RTN codes), its purpose
(a lower output error than RTN on correlated inputs), the zero-point grid, and the layer / CLI plumbing
(``--method gptq`` / ``gptq-lowrank``, ``--zero-point``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from factorlm.decompose.gptq import gptq, output_error
from factorlm.decompose.quantize import quantize_groups, rtn_bytes
from factorlm.errors import FactorLMError

from conftest import bf16_ceil_reference


def _inputs(n_in, seed, tokens=2048):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(n_in) + 0.3 * torch.randn(n_in, n_in, generator=g)  # correlated input channels
    X = torch.randn(tokens, n_in, generator=g) @ mix * torch.rand(n_in, generator=g).add(0.2)
    return X.double().T @ X.double()


def _reference(W, H, bits, group, percdamp):
    """GPTQ as the OBS loop: quantize column j, spread its error over the later columns with row j of the
    current inverse Hessian, then eliminate j from the inverse (Schur complement); fp64 numpy throughout;
    symmetric grid, the scale of a group from its updated columns, rounded up to bf16 as stored."""
    W = W.double().numpy().copy()
    H = H.double().numpy().copy()
    n = H.shape[0]
    H += percdamp * np.mean(np.diag(H)) * np.eye(n)
    Hinv = np.linalg.inv(H)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = np.zeros(W.shape, dtype=np.int64)
    for j in range(n):
        if j % group == 0:
            s = np.abs(W[:, j:j + group]).max(axis=1).astype(np.float32) / np.float32((hi - lo) / 2)
            s = bf16_ceil_reference(s).astype(np.float64)
        q = np.clip(np.round(W[:, j] / s), lo, hi)
        codes[:, j] = q
        err = (W[:, j] - q * s) / Hinv[j, j]
        W[:, j + 1:] -= np.outer(err, Hinv[j, j + 1:])
        Hinv = Hinv - np.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return codes


@pytest.mark.parametrize("bits,group", [(4, 16), (3, 32)])
def test_gptq_matches_the_obs_loop_reference(bits, group):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(32, 64, generator=g)
    H = _inputs(64, bits)
    codes, scales, zeros, W_hat = gptq(W, H, bits, group, block_size=32)
    ref = _reference(W, H, bits, group, 0.01)
    assert zeros is None and codes.dtype == torch.int8 and scales.shape == (32, 64 // group)
    # float32 (ours) vs float64 (reference): a near-tie may round the other way and shift that row's later
    # columns by a step, so compare the codes entry-wise loosely and the objective tightly
    assert (codes.numpy() == ref).mean() > 0.97
    ref_hat = torch.from_numpy(ref).double().reshape(32, -1, group) * scales.double()[:, :, None]
    e_ours, e_ref = output_error(W, W_hat, H), output_error(W, ref_hat.reshape(32, 64), H)
    assert abs(e_ours - e_ref) <= 0.02 * e_ref


def _reference_act_order(W, H, bits, group, percdamp):
    """The OBS loop over the columns in descending H_jj, every group's symmetric scale fixed up front from the
    unquantized weights (static groups); codes returned in the original column order."""
    W = W.double().numpy().copy()
    H = H.double().numpy().copy()
    n = H.shape[0]
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = np.abs(W.reshape(W.shape[0], -1, group)).max(axis=2).astype(np.float32) / np.float32((hi - lo) / 2)
    s = bf16_ceil_reference(s).astype(np.float64)  # (out, groups), rounded up to bf16 as stored
    order = np.argsort(-np.diag(H), kind="stable")
    H = H + percdamp * np.mean(np.diag(H)) * np.eye(n)
    Hinv = np.linalg.inv(H)
    codes = np.zeros(W.shape, dtype=np.int64)
    left = list(order)
    for j in order:
        left.remove(j)
        sj = s[:, j // group]
        q = np.clip(np.round(W[:, j] / sj), lo, hi)
        codes[:, j] = q
        err = (W[:, j] - q * sj) / Hinv[j, j]
        W[:, left] -= np.outer(err, Hinv[j, left])
        Hinv = Hinv - np.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return codes, s


def test_gptq_act_order_matches_the_obs_loop_in_that_order():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(24, 64, generator=g)
    H = _inputs(64, 6)
    codes, scales, zeros, W_hat = gptq(W, H, 3, 16, block_size=32, act_order=True)
    ref, ref_s = _reference_act_order(W, H, 3, 16, 0.01)
    assert torch.equal(scales.double(), torch.from_numpy(ref_s))  # static groups: the RTN scales of W
    assert (codes.numpy() == ref).mean() > 0.97
    ref_hat = torch.from_numpy(ref).double().reshape(24, -1, 16) * scales.double()[:, :, None]
    e_ours, e_ref = output_error(W, W_hat, H), output_error(W, ref_hat.reshape(24, 64), H)
    assert abs(e_ours - e_ref) <= 0.02 * e_ref
    # the visiting order is what act_order changes: the plain order gives other codes
    assert not torch.equal(codes, gptq(W, H, 3, 16, block_size=32)[0])


@pytest.mark.parametrize("zero_point", [False, True])
def test_gptq_act_order_with_a_diagonal_gram_is_exactly_rtn(zero_point):
    """A diagonal Gram has no error feedback, and static groups are RTN's own parameters: bit-identical to
    torchao's RTN whatever the visiting order."""
    W = torch.randn(40, 96, generator=torch.Generator().manual_seed(3))
    H = torch.diag(torch.rand(96, generator=torch.Generator().manual_seed(4)) + 0.1)
    ours = gptq(W, H, 4, 32, zero_point=zero_point, percdamp=0.0, act_order=True)
    lib = quantize_groups(W, 4, 32, zero_point)
    for a, b in zip(ours, lib):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("zero_point", [False, True])
def test_gptq_with_an_identity_gram_is_exactly_rtn(zero_point):
    """No correlation and no damping: the error feedback is zero, so the codes, scales, zero points and the
    dequantized weight are bit-identical to torchao's RTN (``quantize_groups``)."""
    W = torch.randn(40, 96, generator=torch.Generator().manual_seed(1))
    ours = gptq(W, torch.eye(96), 4, 32, zero_point=zero_point, percdamp=0.0)
    lib = quantize_groups(W, 4, 32, zero_point)
    for a, b in zip(ours, lib):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("zero_point", [False, True])
def test_gptq_lowers_the_output_error_of_rtn_on_correlated_inputs(zero_point):
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    H = _inputs(128, 3)
    for bits, group in ((4, 32), (3, 64)):
        rtn_err = output_error(W, quantize_groups(W, bits, group, zero_point)[3], H)
        gptq_err = output_error(W, gptq(W, H, bits, group, zero_point=zero_point)[3], H)
        assert gptq_err < 0.8 * rtn_err, (bits, group, gptq_err / rtn_err)


def test_zero_point_grid_lowers_rtn_error_and_costs_its_bits_per_group():
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) + 0.3  # off-centre groups
    codes, scales, zeros, W_hat = quantize_groups(W, 3, 32, zero_point=True)
    assert zeros.dtype == torch.int8 and zeros.shape == scales.shape
    torch.testing.assert_close(W_hat, ((codes.float().reshape(64, 4, 32) - zeros.float()[:, :, None])
                                       * scales.float()[:, :, None]).reshape(64, 128), atol=0, rtol=0)
    sym = quantize_groups(W, 3, 32)[3]
    assert (W - W_hat).norm() < 0.9 * (W - sym).norm()
    assert int(zeros.min()) >= -4 and int(zeros.max()) <= 3  # in the codes' range: packs to 3 bits
    assert rtn_bytes((64, 128), 3, 32, zero_point=True) == rtn_bytes((64, 128), 3, 32) + (64 * 4 * 3 + 7) // 8


def test_gptq_zeroes_dead_inputs_and_refuses_bad_input():
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    H = _inputs(64, 5)
    H[7, :] = 0
    H[:, 7] = 0
    _, _, _, W_hat = gptq(W, H, 4, 16)
    assert (W_hat[:, 7] == 0).all()
    with pytest.raises(FactorLMError, match="Gram must be 64x64"):
        gptq(W, torch.eye(32), 4, 16)
    with pytest.raises(FactorLMError, match="group size 24 must divide"):
        gptq(W, H, 4, 24)


@pytest.mark.parametrize("rank", [0, 3])
def test_layer_from_gram_stores_gptq_codes_with_zero_points_and_round_trips(rank):
    from factorlm.decompose.whiten import GramScale
    from factorlm.layers import QuantLowRankLinear, structure_from_spec

    g = torch.Generator().manual_seed(6)
    W, b = torch.randn(32, 64, generator=g), torch.randn(32, generator=g)
    H = _inputs(64, 7)
    m = QuantLowRankLinear.from_weight(W, 3, 16, rank, GramScale(H), b, zero_point=True, gram=H)
    _, _, _, W_hat = gptq(W, H, 3, 16, zero_point=True)
    torch.testing.assert_close(m.quantized(), W_hat, atol=0, rtol=0)
    assert m.weight_bytes() == rtn_bytes((32, 64), 3, 16, zero_point=True) + rank * (32 + 64) * 4
    n = structure_from_spec(m.spec())
    n.load_state_dict(m.state_dict())
    x = torch.randn(5, 64, generator=g)
    torch.testing.assert_close(n(x), m(x), atol=0, rtol=0)
    if rank:  # the correction of GPTQ's error lowers the output error further
        assert output_error(W, m.to_dense(), H) < output_error(W, W_hat, H)


def test_gptq_lowrank_end_to_end_stores_its_bytes_and_reloads_exactly(tmp_path):
    """``--method gptq-lowrank --keep 0.8 --bits 3 --group-size 16 --zero-point true`` on a tiny Llama: every
    target stores GPTQ codes, zero points and the correction within the budget, the folder reloads to the
    same logits, and the report records the quantizer."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_quantize import _lm_cfg

    from factorlm import models
    from factorlm.api import compress
    from factorlm.layers import QuantLowRankLinear
    from factorlm.models.surgery import get_module

    opts = {"bits": 3, "group_size": 16, "factor_bits": 16, "zero_point": True, "byte_plan": "uniform"}
    rep = compress(_lm_cfg(tmp_path, method="gptq-lowrank", keep=0.8, method_options=opts), quiet=True)
    acc, ranks = rep.accounting, rep.info["ranks"]
    mods = {n: get_module(rep.model, n) for n in ranks}
    assert all(isinstance(m, QuantLowRankLinear) and m.zero_point for m in mods.values())
    assert acc["target_bytes_after"] == sum(m.weight_bytes() for m in mods.values())
    assert acc["target_bytes_after"] <= 0.8 * 2 * acc["target_weights_before"] and min(ranks.values()) >= 1
    assert acc["quantized"]["quantizer"] == "gptq" and acc["quantized"]["zero_point"] is True
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    loaded = models.load(tmp_path / "out")
    torch.testing.assert_close(loaded(ids).logits, rep.model(ids).logits, atol=0, rtol=0)
    alone = compress(_lm_cfg(tmp_path, method="gptq", method_options={"bits": 3, "group_size": 16}, name="g"),
                     quiet=True, save=False)
    assert set(alone.info["ranks"].values()) == {0} and alone.accounting["quantized"]["quantizer"] == "gptq"
    # the codes are GPTQ's, not RTN's: a run with --method rtn stores other codes for the same weights
    rtn_run = compress(_lm_cfg(tmp_path, method="rtn", method_options={"bits": 3, "group_size": 16}, name="r"),
                       quiet=True, save=False)
    differ = [n for n in ranks if not torch.equal(get_module(alone.model, n).qweight, get_module(rtn_run.model, n).qweight)]
    assert len(differ) >= len(ranks) // 2
    # --gptq-act-order true: recorded, and it changes the codes (the visiting order is not the input order)
    act = compress(_lm_cfg(tmp_path, method="gptq", method_options={"bits": 3, "group_size": 16,
                                                                    "gptq_act_order": True}, name="a"),
                   quiet=True, save=False)
    assert act.accounting["quantized"]["gptq_act_order"] is True
    assert alone.accounting["quantized"]["gptq_act_order"] is False
    differ = [n for n in ranks if not torch.equal(get_module(alone.model, n).qweight, get_module(act.model, n).qweight)]
    assert len(differ) >= len(ranks) // 2


def test_a_single_group_per_row_keeps_its_scale_shape():
    """One group spanning the row (torchao squeezes that dimension away): scales stay (out, 1)."""
    codes, scales, zeros, _ = quantize_groups(torch.randn(16, 32), 8, 32, zero_point=True)
    assert scales.shape == (16, 1) and zeros.shape == (16, 1) and codes.shape == (16, 32)
