"""Low-rank analysis of weight matrices: how well does a (pruned) matrix compress at low rank?

This reproduces the argument of LPAF (Ren & Zhu, LREC-COLING 2024, Figure 3): a fine-tuned weight
matrix ``W`` of the dense model *T* is close to full rank; pruning it by magnitude (zero-order,
*UP_zero*) keeps it high-rank, because zeroing the smallest entries of a matrix with no low-rank
structure only adds "noise"; pruning it by movement (first-order, *UP_first*, trained with
gradients) yields a matrix whose singular values decay fast, i.e. one that a rank-``k``
factorization approximates well.  That is why LPAF factorizes the first-order pruned model.

The figure written by :func:`lowrank_analysis` has two panels, one curve per matrix:

* **left** -- the normalised singular value spectrum ``s_i / s_1`` against the index ``i``
  (log y axis).  A flat curve = high rank; a steep drop = energy concentrated in few directions.
* **right** -- the relative reconstruction error of the best rank-``k`` approximation,
  ``||W - W_k||_F / ||W||_F``, against the rank fraction ``k / min(m, n)``.  By Eckart-Young this is
  ``sqrt(sum_{i>k} s_i^2) / ||W||_F``; it goes from 1 (``k = 0``) to 0 (full rank).  The lower the
  curve, the more a low-rank factorization can keep.

Only torch and matplotlib (Agg canvas, no global backend change) are used; the summaries are
plain JSON-able dicts.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .errors import FactorLMError, check

#: error tolerances reported as "rank needed for err <= tol"
ERROR_TOLS: tuple[float, ...] = (0.5, 0.3, 0.1)
#: rank fractions k / min(m, n) at which the error is reported
RANK_FRACTIONS: tuple[float, ...] = (0.1, 0.25, 0.5)
#: energy fractions reported as effective ranks
ENERGY_LEVELS: tuple[float, ...] = (0.9, 0.99)

LABEL_DENSE = "T (fine-tuned)"
LABEL_ZERO = "UP_zero (magnitude)"
LABEL_FIRST = "UP_first (sensitivity)"  # label of the default first-order criterion

_EPS = 1e-12  # slack for float comparisons of energy/error fractions


# -- pure maths -----------------------------------------------------------------------------------
def spectrum_report(W: torch.Tensor) -> dict[str, Any]:
    """Singular-value statistics of a 2-D matrix ``W`` (m x n), computed in float64.

    Returns a dict with, for ``r = min(m, n)``:

    * ``shape``: ``(m, n)``; ``r``: ``min(m, n)``; ``fro_norm``: ``||W||_F``;
    * ``singular_values``: ``s`` (length ``r``, descending);
    * ``normalized``: ``s / s[0]`` (zeros for the zero matrix);
    * ``err``: length ``r + 1``, ``err[k] = ||W - W_k||_F / ||W||_F`` for the best rank-``k``
      approximation ``W_k`` (Eckart-Young: ``sqrt(sum_{i>k} s_i^2) / ||W||_F``), so ``err[0] = 1``
      and ``err[r] = 0`` (all zeros for the zero matrix);
    * ``energy``: length ``r + 1``, cumulative energy ``sum_{i<=k} s_i^2 / ||W||_F^2 = 1 - err[k]^2``;
    * ``rank_90`` / ``rank_99``: effective rank, the smallest ``k`` with ``energy[k] >= 0.9 / 0.99``.

    Tensors in the result are float64 on the CPU.
    """
    check(isinstance(W, torch.Tensor) and W.dim() == 2, f"spectrum_report needs a 2-D tensor, got {getattr(W, 'shape', type(W).__name__)}")
    m, n = (int(d) for d in W.shape)
    W64 = W.detach().to("cpu", torch.float64)
    check(bool(torch.isfinite(W64).all()), "matrix has non-finite values (NaN/Inf)")
    s = torch.linalg.svdvals(W64) if min(m, n) > 0 else torch.zeros(0, dtype=torch.float64)
    r = s.numel()
    sq = s * s
    # tail[k] = sum_{i >= k} s_i^2 (0-based), summed from the smallest value up (no cancellation)
    tail = torch.cat([torch.flip(torch.cumsum(torch.flip(sq, [0]), 0), [0]), torch.zeros(1, dtype=torch.float64)])
    total = float(tail[0])
    if total > 0:
        err = torch.sqrt(tail / total).clamp_(0.0, 1.0)
        err[0] = 1.0
        normalized = s / s[0]
    else:  # zero (or empty) matrix: every rank reconstructs it exactly
        err = torch.zeros(r + 1, dtype=torch.float64)
        normalized = torch.zeros(r, dtype=torch.float64)
    energy = (1.0 - err * err).clamp_(0.0, 1.0)
    out: dict[str, Any] = {
        "shape": (m, n),
        "r": r,
        "fro_norm": math.sqrt(total),
        "singular_values": s,
        "normalized": normalized,
        "energy": energy,
        "err": err,
    }
    for level in ENERGY_LEVELS:
        out[f"rank_{round(level * 100)}"] = rank_for_energy(energy, level)
    return out


def _as_list(x: "torch.Tensor | Sequence[float]") -> list[float]:
    return x.detach().cpu().double().tolist() if isinstance(x, torch.Tensor) else [float(v) for v in x]


def rank_for_error(err: "torch.Tensor | Sequence[float]", tol: float) -> int:
    """Smallest ``k`` with ``err[k] <= tol`` (``err`` as returned by :func:`spectrum_report`).

    Returns ``len(err) - 1`` (full rank) if no entry is within ``tol``."""
    values = _as_list(err)
    check(len(values) > 0, "empty error curve")
    for k, e in enumerate(values):
        if e <= tol:
            return k
    return len(values) - 1


def rank_for_energy(energy: "torch.Tensor | Sequence[float]", level: float) -> int:
    """Smallest ``k`` whose cumulative energy ``energy[k]`` is at least ``level`` (e.g. 0.9)."""
    values = _as_list(energy)
    check(len(values) > 0, "empty energy curve")
    for k, e in enumerate(values):
        if e >= level - _EPS:
            return k
    return len(values) - 1


def error_at_fraction(err: "torch.Tensor | Sequence[float]", fraction: float) -> float:
    """``err[k]`` at ``k = round(fraction * r)`` where ``r = len(err) - 1 = min(m, n)``."""
    values = _as_list(err)
    r = len(values) - 1
    k = int(min(max(round(fraction * r), 0), r))
    return float(values[k])


def matrix_summary(W: torch.Tensor, rep: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """JSON-able summary of one matrix: shape, density (fraction of non-zeros), ranks needed for
    ``err <= 0.5 / 0.3 / 0.1`` (absolute and as a fraction of ``min(m, n)``), the error at rank
    fractions 0.1 / 0.25 / 0.5 and the effective ranks at 90% / 99% energy."""
    rep = spectrum_report(W) if rep is None else rep
    m, n = rep["shape"]
    r = rep["r"]
    ranks = {f"{t:g}": rank_for_error(rep["err"], t) for t in ERROR_TOLS}
    return {
        "shape": [m, n],
        "min_dim": r,
        "density": float((W != 0).sum()) / max(W.numel(), 1),
        "fro_norm": rep["fro_norm"],
        "rank_for_err": ranks,
        "rank_fraction_for_err": {t: (k / r if r else 0.0) for t, k in ranks.items()},
        "err_at_rank_fraction": {f"{f:g}": error_at_fraction(rep["err"], f) for f in RANK_FRACTIONS},
        **{f"effective_rank_{round(lv * 100)}": rep[f"rank_{round(lv * 100)}"] for lv in ENERGY_LEVELS},
    }


# -- figure ---------------------------------------------------------------------------------------
def plot_spectra(reports: Mapping[str, Mapping[str, Any]], out_png: str | Path, title: str = "") -> str:
    """Two-panel PNG (see the module docstring) from ``{label: spectrum_report(...)}``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    check(len(reports) > 0, "no matrices to plot")
    fig = Figure(figsize=(10.0, 4.0))
    FigureCanvasAgg(fig)
    ax_s, ax_e = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    floor = 1e-12
    for label, rep in reports.items():
        r = rep["r"]
        if r == 0:
            continue
        s = rep["normalized"].clamp(min=floor).tolist()
        line, = ax_s.plot(range(1, r + 1), s, lw=1.5, label=label)
        err = rep["err"].tolist()
        ax_e.plot([k / r for k in range(r + 1)], err, lw=1.5, color=line.get_color(),
                  label=f"{label} (90% energy: k={rep['rank_90']})")
    ax_s.set_yscale("log")
    ax_s.set_xlabel("singular value index i")
    ax_s.set_ylabel("s_i / s_1")
    ax_s.set_title("normalised singular values")
    ax_s.grid(True, which="both", alpha=0.3)
    ax_s.legend(fontsize=8)
    for t in ERROR_TOLS:
        ax_e.axhline(t, ls=":", color="gray", lw=0.8)
    ax_e.set_xlim(0.0, 1.0)
    ax_e.set_ylim(0.0, 1.02)
    ax_e.set_xlabel("rank fraction k / min(m, n)")
    ax_e.set_ylabel("||W - W_k||_F / ||W||_F")
    ax_e.set_title("relative reconstruction error (best rank k)")
    ax_e.grid(True, alpha=0.3)
    ax_e.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(out_png).expanduser()
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out), dpi=120)
    return str(out)


def lowrank_analysis(matrices: Mapping[str, torch.Tensor], out_png: str | None, title: str = "") -> dict[str, Any]:
    """Spectra of labelled matrices, e.g. ``{"T (fine-tuned)": W, "UP_zero (magnitude)": W0,
    "UP_first (movement)": W1}``; draws the two-panel figure to ``out_png`` (skipped if None).

    Returns ``{"title", "png", "matrices": {label: matrix_summary}}`` (JSON-able)."""
    check(len(matrices) > 0, "lowrank_analysis needs at least one matrix")
    reports = {label: spectrum_report(W) for label, W in matrices.items()}
    summary = {label: matrix_summary(matrices[label], rep) for label, rep in reports.items()}
    png = plot_spectra(reports, out_png, title) if out_png is not None else None
    return {"title": title, "png": png, "matrices": summary}


# -- saved models ---------------------------------------------------------------------------------
def select_module(targets: Sequence[str], module: str | None) -> str:
    """``module`` resolved against the target names: ``None`` -> the first target; an exact name;
    else a regular expression that must match (``re.search``) exactly one target."""
    check(len(targets) > 0, "the model has no target linear layers to analyse")
    if module is None or module == "":
        return targets[0]
    if module in targets:
        return module
    try:
        pat = re.compile(module)
    except re.error as e:
        raise FactorLMError(f"--module {module!r} is not a valid regular expression ({e})") from None
    hits = [t for t in targets if pat.search(t)]
    if not hits:
        raise FactorLMError(f"--module {module!r} matches no target layer; targets are e.g. {_few(targets)}")
    if len(hits) > 1:
        raise FactorLMError(f"--module {module!r} is ambiguous: it matches {len(hits)} layers, e.g. {_few(hits)}")
    return hits[0]


def _few(names: Sequence[str], k: int = 4) -> str:
    more = f" (+{len(names) - k} more)" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def _weight(model, name: str) -> torch.Tensor:
    """The dense (out, in) weight of module ``name`` (a factorized module is expanded)."""
    from .layers.base import FactorizedLinear

    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise FactorLMError(f"the model has no module {name!r}") from None
    if isinstance(mod, FactorizedLinear):
        return mod.to_dense().detach().float().clone()
    w = getattr(mod, "weight", None)
    check(isinstance(w, torch.Tensor) and w.dim() == 2, f"module {name!r} ({type(mod).__name__}) has no 2-D weight")
    return w.detach().float().clone()


def _load(path: str, what: str):
    from .models import load

    p = Path(path).expanduser()
    if not p.exists():
        raise FactorLMError(f"{what} folder does not exist: {path}")
    if not p.is_dir():
        raise FactorLMError(f"{what} path is not a folder: {path}")
    return load(str(p))


def _pruned_density(pruned_dir: str, name: str, W1: torch.Tensor) -> tuple[float, str]:
    """Density of ``name`` in the pruned folder: its mask in ``pruning.safetensors`` (exact, also
    right for a global-scope pruning), else ``method_info.density``, else the non-zero fraction."""
    from .methods.prune import PRUNING_FILE
    from .models import read_meta
    from .prune import load_pruning_state

    f = Path(pruned_dir).expanduser() / PRUNING_FILE
    if f.is_file():
        masks, _ = load_pruning_state(str(f))
        m = masks.get(name)
        if m is not None and tuple(m.shape) == tuple(W1.shape):
            return float(m.float().mean()), f"{PRUNING_FILE} mask"
    meta = read_meta(str(Path(pruned_dir).expanduser())) or {}
    info = meta.get("method_info") or {}
    d = info.get("density") if isinstance(info, dict) else None
    if isinstance(d, (int, float)) and 0 < float(d) <= 1:
        return float(d), "method_info.density"
    return float((W1 != 0).sum()) / max(W1.numel(), 1), "non-zero fraction"


def _pruned_label(pruned_dir: str) -> str:
    from .models import read_meta

    meta = read_meta(str(Path(pruned_dir).expanduser())) or {}
    recipe = meta.get("recipe")
    opts = (recipe.get("method_options") or {}) if isinstance(recipe, dict) else {}
    importance = opts.get("importance", "sensitivity") if isinstance(opts, dict) else "sensitivity"
    if importance in (None, "", "movement", "sensitivity"):
        return f"UP_first ({importance or 'sensitivity'})"
    return f"pruned model ({importance})"


def analyze_models(
    dense_dir: str,
    pruned_dir: str | None = None,
    module: str | None = None,
    density: float | None = None,
    out_png: str | None = "lowrank.png",
) -> dict[str, Any]:
    """LPAF Figure 3 for one matrix of saved factorlm models.

    ``dense_dir``: the fine-tuned dense model T.  ``pruned_dir``: a model pruned from T (e.g. by
    ``factorlm compress --method prune``, movement importance = UP_first), optional.  ``module``:
    target layer name or a regex matching exactly one target (default: the first target, layer 0's
    attention query).  Matrices compared: W (T), W0 = W magnitude-pruned (one shot, UP_zero) to the
    density of the pruned model's matrix, and W1 = the pruned model's matrix.  The density comes from
    ``density`` if given, else the pruned folder (its ``pruning.safetensors`` mask for the module,
    else ``factorlm.json`` ``method_info.density``, else the matrix's non-zero fraction); without
    ``pruned_dir``, ``density`` is required.  Writes the figure to ``out_png`` (None = no figure).

    Returns the :func:`lowrank_analysis` summary plus ``module``, ``dense_dir``, ``pruned_dir``,
    ``density`` and ``density_source``.
    """
    from .models import find_targets
    from .prune import prune_once

    if pruned_dir is None and density is None:
        raise FactorLMError("without a pruned model folder, give --density for the magnitude-pruned comparison")
    if density is not None:
        check(0.0 < float(density) <= 1.0, f"--density must be in (0, 1], got {density}")
    dense = _load(dense_dir, "dense model")
    name = select_module(find_targets(dense), module)
    W = _weight(dense, name)

    matrices: dict[str, torch.Tensor] = {LABEL_DENSE: W}
    W1 = None
    label1 = LABEL_FIRST
    if pruned_dir is not None:
        pruned = _load(pruned_dir, "pruned model")
        W1 = _weight(pruned, name)
        del pruned
        if tuple(W1.shape) != tuple(W.shape):
            raise FactorLMError(f"{name} has shape {tuple(W1.shape)} in {pruned_dir} but {tuple(W.shape)} in {dense_dir}")
        label1 = _pruned_label(pruned_dir)
    if density is not None:
        dens, source = float(density), "argument"
    else:
        dens, source = _pruned_density(pruned_dir, name, W1)

    prune_once(dense, [name], "magnitude", dens, scope="per_matrix")
    matrices[LABEL_ZERO] = _weight(dense, name)
    del dense
    if W1 is not None:
        matrices[label1] = W1

    shape = "x".join(str(d) for d in W.shape)
    title = f"{name} ({shape}), density {dens:.3g}"
    result = lowrank_analysis(matrices, out_png, title)
    return {
        "module": name,
        "dense_dir": str(dense_dir),
        "pruned_dir": None if pruned_dir is None else str(pruned_dir),
        "density": dens,
        "density_source": source,
        **result,
    }


def rank_errors(dense_dir: str, pruned_dir: str, rank: int | None = None, keep: float | None = None) -> dict[str, Any]:
    """Every target matrix at one rank: relative error of the best rank-``k`` fit of T, of T
    magnitude-pruned (UP_zero) to the pruned model's per-matrix density, and of the pruned model's
    matrix (UP_first), plus the fraction of rows and columns the pruning emptied completely.

    ``rank``: a fixed ``k``; or ``keep``: each matrix's uniform budget rank ``keep * m n / (m + n)``.
    Returns ``{"rank", "keep", "modules": {name: {...}}, "mean": {...}}``: the single-matrix figure of
    :func:`analyze_models` summarised over the whole model.
    """
    from .layers import LowRankLinear
    from .models import find_targets
    from .prune import prune_once
    from .ranks.budget import check_keep, uniform_plan

    check((rank is None) != (keep is None), "give exactly one of --rank or --keep")
    check(rank is None or rank >= 1, f"--rank must be >= 1, got {rank}")
    if keep is not None:
        keep = check_keep(keep)
    dense, pruned = _load(dense_dir, "dense model"), _load(pruned_dir, "pruned model")
    label1 = _pruned_label(pruned_dir)
    rows: dict[str, dict[str, float]] = {}
    for name in find_targets(dense):
        W, W1 = _weight(dense, name), _weight(pruned, name)
        check(tuple(W1.shape) == tuple(W.shape), f"{name} has shape {tuple(W1.shape)} in {pruned_dir}")
        m, n = W.shape
        if rank is None:  # this matrix's own budget rank at ``keep``
            k = uniform_plan({name: (m, n)}, keep, LowRankLinear)[name]["rank"]
        else:
            k = min(rank, m, n)
        dens, _ = _pruned_density(pruned_dir, name, W1)
        prune_once(dense, [name], "magnitude", dens, scope="per_matrix")
        W0 = _weight(dense, name)
        zero = W1 == 0
        rows[name] = {
            "rank": k, "density": dens,
            LABEL_DENSE: float(spectrum_report(W)["err"][k]),
            LABEL_ZERO: float(spectrum_report(W0)["err"][k]),
            label1: float(spectrum_report(W1)["err"][k]),
            "empty rows+cols": float(zero.all(1).sum() + zero.all(0).sum()) / (m + n),
        }
    keys = [key for key in next(iter(rows.values())) if key != "rank"]
    mean = {key: sum(r[key] for r in rows.values()) / len(rows) for key in keys}
    return {"dense_dir": str(dense_dir), "pruned_dir": str(pruned_dir), "rank": rank, "keep": keep,
            "modules": rows, "mean": mean}


__all__ = [
    "analyze_models",
    "rank_errors",
    "error_at_fraction",
    "lowrank_analysis",
    "matrix_summary",
    "plot_spectra",
    "rank_for_energy",
    "rank_for_error",
    "select_module",
    "spectrum_report",
]
