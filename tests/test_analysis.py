"""Low-rank analysis (LPAF Figure 3): spectra, Eckart-Young error curves, the figure, saved models."""

from __future__ import annotations

import json

import pytest
import torch

from factorlm.analysis import (
    LABEL_DENSE,
    LABEL_FIRST,
    LABEL_ZERO,
    analyze_models,
    lowrank_analysis,
    rank_for_error,
    select_module,
    spectrum_report,
)
from factorlm.errors import FactorLMError


pytestmark = pytest.mark.usefixtures("one_thread")


def _best_rank_k_error(W: torch.Tensor, k: int) -> float:
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    Wk = (U[:, :k] * S[:k]) @ Vh[:k]
    return float(torch.linalg.matrix_norm(W.double() - Wk) / torch.linalg.matrix_norm(W.double()))


# -- pure maths -------------------------------------------------------------------------------------
def test_error_curve_matches_direct_reconstruction():
    torch.manual_seed(0)
    W = torch.randn(24, 16)
    rep = spectrum_report(W)
    assert rep["shape"] == (24, 16) and rep["r"] == 16
    assert rep["err"].shape == (17,) and rep["energy"].shape == (17,)
    for k in (1, 3, 8, 15):
        assert float(rep["err"][k]) == pytest.approx(_best_rank_k_error(W, k), rel=1e-9, abs=1e-12)
    assert float(rep["err"][0]) == 1.0
    assert float(rep["err"][16]) == 0.0
    assert bool((rep["err"][1:] <= rep["err"][:-1]).all())  # non-increasing
    assert torch.allclose(rep["energy"], 1 - rep["err"] ** 2)
    assert float(rep["normalized"][0]) == 1.0 and bool((rep["normalized"][1:] <= 1).all())
    assert 0 < rep["rank_90"] <= rep["rank_99"] <= 16


def test_low_rank_matrix_is_detected():
    torch.manual_seed(1)
    W = torch.randn(30, 3, dtype=torch.float64) @ torch.randn(3, 20, dtype=torch.float64)
    rep = spectrum_report(W)
    assert rank_for_error(rep["err"], 1e-6) == 3
    assert rank_for_error(rep["err"], 0.0) <= 20
    assert rep["rank_99"] <= 3
    # the transpose has the same spectrum
    assert torch.allclose(spectrum_report(W.T)["err"], rep["err"])


def test_rank_for_error_on_plain_lists_and_zero_matrix():
    assert rank_for_error([1.0, 0.6, 0.4, 0.0], 0.5) == 2
    assert rank_for_error([1.0, 0.6, 0.4, 0.0], 0.0) == 3
    assert rank_for_error([1.0, 0.9], 0.1) == 1  # never within tol -> full rank
    rep = spectrum_report(torch.zeros(4, 5))
    assert rep["r"] == 4 and float(rep["err"].abs().max()) == 0.0
    with pytest.raises(FactorLMError):
        spectrum_report(torch.zeros(3))


def test_magnitude_pruning_keeps_random_matrix_high_rank():
    from factorlm.prune import topk_mask

    torch.manual_seed(2)
    W = torch.randn(40, 40)
    W0 = W * topk_mask(W.abs(), int(0.3 * W.numel()))
    dense, pruned = spectrum_report(W), spectrum_report(W0)
    assert torch.linalg.matrix_rank(W0.double()) == 40
    # still needs most of the rank for a good approximation
    assert rank_for_error(pruned["err"], 0.1) >= 0.6 * 40
    assert rank_for_error(dense["err"], 0.1) >= 0.6 * 40


# -- figure -----------------------------------------------------------------------------------------
def test_lowrank_analysis_writes_png_and_summary(tmp_path):
    torch.manual_seed(3)
    W = torch.randn(20, 12)
    low = torch.randn(20, 2) @ torch.randn(2, 12)
    mats = {LABEL_DENSE: W, LABEL_ZERO: W * (W.abs() > 0.5), "low rank": low}
    out = tmp_path / "sub" / "lr.png"
    summary = lowrank_analysis(mats, str(out), title="demo")
    assert out.is_file() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["png"] == str(out)
    assert set(summary["matrices"]) == set(mats)
    json.dumps(summary)  # JSON-able
    s = summary["matrices"]["low rank"]
    assert s["shape"] == [20, 12] and s["density"] == 1.0
    assert set(s["rank_for_err"]) == {"0.5", "0.3", "0.1"}
    assert set(s["err_at_rank_fraction"]) == {"0.1", "0.25", "0.5"}
    assert s["rank_for_err"]["0.1"] <= 2 and s["err_at_rank_fraction"]["0.5"] < 1e-5
    assert summary["matrices"][LABEL_ZERO]["density"] < 1.0
    assert lowrank_analysis({"a": W}, None)["png"] is None


# -- saved models -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    from factorlm.models import find_targets, save
    from factorlm.prune import prune_once

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    model = BertForSequenceClassification(cfg).eval()
    root = tmp_path_factory.mktemp("analysis")
    dense = save(model, root / "dense")
    targets = find_targets(model)
    # a stand-in for the first-order pruned model: any 30%-dense pruning of the same weights
    prune_once(model, targets, "magnitude", 0.3, scope="per_matrix")
    pruned = save(model, root / "pruned", meta={"method_info": {"density": 0.3}})
    return str(dense), str(pruned), targets


def test_density_from_pruning_file_and_nonzeros(saved_models, tmp_path):
    from factorlm.methods.prune import PRUNING_FILE, pruning_file_writer
    from factorlm.models import load, save

    dense, pruned, targets = saved_models
    model = load(pruned)
    masks = {t: model.get_submodule(t).weight != 0 for t in targets}
    save(model, tmp_path / "with_masks", meta={"method_info": {"density": 0.9}},
         extra_files={PRUNING_FILE: pruning_file_writer(masks, {}, 0.3)})
    save(model, tmp_path / "no_info")
    res = analyze_models(dense, str(tmp_path / "with_masks"), out_png=None)
    assert res["density_source"] == "pruning.safetensors mask"
    assert res["density"] == pytest.approx(0.3, abs=1e-3)
    res = analyze_models(dense, str(tmp_path / "no_info"), module="layer.1.intermediate", out_png=None)
    assert res["density_source"] == "non-zero fraction"
    assert res["density"] == pytest.approx(0.3, abs=1e-3)
    assert res["matrices"][LABEL_ZERO]["density"] == pytest.approx(res["density"], abs=1e-3)


def test_analyze_models_with_pruned_folder(saved_models, tmp_path):
    dense, pruned, targets = saved_models
    out = tmp_path / "lowrank.png"
    res = analyze_models(dense, pruned, out_png=str(out))
    assert out.is_file() and out.stat().st_size > 1000
    assert res["module"] == targets[0] and "layer.0.attention.self.query" in res["module"]
    assert res["density"] == 0.3 and res["density_source"] == "method_info.density"
    mats = res["matrices"]
    assert set(mats) == {LABEL_DENSE, LABEL_ZERO, LABEL_FIRST}  # no recipe: the default criterion
    assert mats[LABEL_DENSE]["density"] == 1.0
    assert mats[LABEL_ZERO]["density"] == pytest.approx(0.3, abs=1e-3)
    assert mats[LABEL_FIRST]["density"] == pytest.approx(0.3, abs=1e-3)
    assert mats[LABEL_DENSE]["shape"] == [32, 32]
    json.dumps(res)


def test_analyze_models_module_pattern_and_density_arg(saved_models, tmp_path):
    dense, _, _ = saved_models
    res = analyze_models(dense, module=r"layer\.1\.output\.dense", density=0.5, out_png=None)
    assert res["module"] == "bert.encoder.layer.1.output.dense"  # FFN out, (32, 64)
    assert set(res["matrices"]) == {LABEL_DENSE, LABEL_ZERO}
    assert res["density_source"] == "argument"
    assert res["matrices"][LABEL_ZERO]["shape"] == [32, 64]
    assert res["matrices"][LABEL_ZERO]["density"] == pytest.approx(0.5, abs=1e-3)


def test_module_pattern_errors(saved_models):
    dense, pruned, targets = saved_models
    with pytest.raises(FactorLMError, match="ambiguous"):
        analyze_models(dense, pruned, module="query", out_png=None)
    with pytest.raises(FactorLMError, match="matches no target"):
        analyze_models(dense, pruned, module="nonexistent_layer", out_png=None)
    with pytest.raises(FactorLMError, match="not a valid regular expression"):
        select_module(targets, "query(")
    assert select_module(targets, None) == targets[0]
    assert select_module(targets, targets[3]) == targets[3]
    assert select_module(targets, r"layer\.1\.attention\.self\.key") == "bert.encoder.layer.1.attention.self.key"


def test_missing_folders_and_density(saved_models, tmp_path):
    dense, pruned, _ = saved_models
    with pytest.raises(FactorLMError, match="dense model folder does not exist"):
        analyze_models(str(tmp_path / "nope"), pruned, out_png=None)
    with pytest.raises(FactorLMError, match="pruned model folder does not exist"):
        analyze_models(dense, str(tmp_path / "nope"), out_png=None)
    with pytest.raises(FactorLMError, match="density"):
        analyze_models(dense, out_png=None)
    with pytest.raises(FactorLMError, match="density"):
        analyze_models(dense, density=1.5, out_png=None)


def test_rank_errors_over_all_targets(saved_models):
    from factorlm.analysis import rank_errors

    dense, pruned, targets = saved_models
    res = rank_errors(dense, pruned, rank=4)
    assert set(res["modules"]) == set(targets)
    for row in res["modules"].values():
        assert row["rank"] == 4 and row["density"] == pytest.approx(0.3, abs=1e-3)
        # the stand-in pruned model *is* the magnitude pruning: both fits have the same error
        assert row[LABEL_FIRST] == pytest.approx(row[LABEL_ZERO], abs=1e-9)
        assert 0 < row[LABEL_DENSE] < 1 and 0 <= row["empty rows+cols"] <= 1
    mean = res["mean"][LABEL_DENSE]
    assert mean == pytest.approx(sum(r[LABEL_DENSE] for r in res["modules"].values()) / len(targets))
    full = rank_errors(dense, pruned, rank=10_000)  # clipped to full rank: exact
    assert all(r[LABEL_DENSE] < 1e-6 and r[LABEL_FIRST] < 1e-6 for r in full["modules"].values())
    budget = rank_errors(dense, pruned, keep=0.5)  # 32x32 at keep 0.5 -> rank 8; 64x32 -> rank 10
    assert {r["rank"] for r in budget["modules"].values()} == {8, 10}
    with pytest.raises(FactorLMError):
        rank_errors(dense, pruned)
    with pytest.raises(FactorLMError, match="--keep"):
        rank_errors(dense, pruned, keep=1.5)


def test_cli_analyze_rank_table(saved_models, capsys):
    from factorlm.cli import main

    dense, pruned, _ = saved_models
    assert main(["analyze", dense, "--pruned", pruned, "--rank", "4"]) == 0
    assert LABEL_DENSE in json.loads(capsys.readouterr().out)
    assert main(["analyze", dense, "--rank", "4"]) == 2
    assert "--pruned" in capsys.readouterr().err
