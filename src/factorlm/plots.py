"""The one-page picture of a compression run (``report.png`` in every ``compress`` output folder).

Three panels, all read from the saved metadata (a pure function of ``factorlm.json``'s content):

1. **Score**: the task's main metric after every phase (dense teacher, intermediate states, final)
   with the majority-class baseline as a dashed line, so a collapse is visible at a glance.
2. **Size and compute**: target weights, whole-model parameters and FLOPs per sequence, compressed as a
   percentage of dense.
3. **Measured latency**: dense source vs compressed, per dtype (fp32, bf16 where native), with the
   speed-up written on the bars and the FLOP-ratio limit in the title.

Only matplotlib's Agg canvas is used (no global backend change, no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["report_png", "lm_report_png"]

_DENSE, _COMP, _BASE, _WARN = "#7f8c9a", "#2a7ab9", "#c0392b", "#c0392b"


def _main_value(metrics: dict[str, Any], main: str) -> float | None:
    v = metrics.get(main)
    if v is None:
        vals = [x for k, x in metrics.items() if k.endswith("_" + main) and isinstance(x, (int, float))]
        v = sum(vals) / len(vals) if vals else None
    return float(v) if isinstance(v, (int, float)) else None


def _share_panel(ax, acc: dict[str, Any], flops: dict[str, Any], flops_label: str) -> None:
    """Horizontal bars: the compressed share of dense of the target weights, the model's parameters
    and the FLOPs (``acc``: the accounting; ``flops``: ``{"dense", "final"}``)."""
    rows = []
    if acc.get("target_weights_before"):
        rows.append(("target weights", acc["target_weights_after"] / acc["target_weights_before"]))
    if acc.get("model_params_before"):
        rows.append(("model parameters", acc["model_params_after"] / acc["model_params_before"]))
    if flops.get("dense") and flops.get("final"):
        rows.append((flops_label, flops["final"] / flops["dense"]))
    if rows:
        names, fr = zip(*rows)
        y = range(len(rows))
        ax.barh(y, [1.0] * len(rows), color="#e4e8ec")
        ax.barh(y, fr, color=_COMP)
        for i, f in enumerate(fr):
            ax.text(min(f, 0.98), i, f" {f:.0%}", va="center", ha="left" if f < 0.8 else "right",
                    color="black" if f < 0.8 else "white", fontsize=9)
        ax.set_yticks(list(y), names, fontsize=9)
        ax.set_xlim(0, 1)
        ax.invert_yaxis()
    ax.set_title("compressed, % of dense", fontsize=10)


def report_png(meta: dict[str, Any], path: str | Path) -> Path:
    """Draw the run summary of ``meta`` (a ``factorlm.json`` dict) to ``path``; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    spec = meta.get("task_spec") or {}
    main = spec.get("main_metric") or "accuracy"
    scores = meta.get("scores") or {}
    lat = meta.get("latency") or {}
    dtypes = {k: v for k, v in (lat.get("dtypes") or {}).items() if isinstance(v, dict) and "dense" in v}
    ncols = 3 if dtypes else 2
    fig = Figure(figsize=(4.6 * ncols, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    title = f"{meta.get('method', '?')} on {meta.get('task', '?')}"
    recipe = meta.get("recipe") or {}
    keep = recipe.get("keep")
    if recipe.get("ranks"):
        title += f", per-matrix ranks from {Path(str(recipe['ranks'])).name}"
    elif keep and recipe.get("rank") is None:
        title += f", keep {keep:g} of the target weights"
    if meta.get("warnings"):
        title += f"  -  {len(meta['warnings'])} warning(s): see factorlm.json"
    fig.suptitle(title, fontsize=11, color=_WARN if meta.get("warnings") else "black")

    # 1. score per phase
    ax = axes[0]
    phases = [(p, _main_value(m, main)) for p, m in scores.items() if isinstance(m, dict)]
    phases = [(p, v) for p, v in phases if v is not None]
    if phases:
        names, vals = zip(*phases)
        colors = [_DENSE if p == "dense" else (_COMP if p == "final" else "#9dc3e6") for p in names]
        bars = ax.bar(range(len(vals)), vals, color=colors)
        ax.set_xticks(range(len(vals)), names, rotation=30, ha="right", fontsize=8)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        base = _main_value(meta.get("baseline") or {}, main)
        if base is not None:
            from .summary import baseline_names

            name = "majority class" if baseline_names(meta.get("task"))[0] == "majority" else "trivial reader"
            ax.axhline(base, color=_BASE, ls="--", lw=1, label=f"{name} {base:.3f}")
            ax.legend(fontsize=8, loc="lower left")
        lo = min(list(vals) + ([base] if base is not None else []))
        from .config import is_qa_task

        unit = 100.0 if is_qa_task(meta.get("task") or "") else 1.0  # SQuAD scores are in percent
        ax.set_ylim(max(0.0, lo - 0.1 * unit) if lo > 0 else lo - 0.1 * unit, max(vals) + 0.08 * unit)
    ax.set_title(f"dev {main} after each phase", fontsize=10)

    # 2. size and compute, % of dense
    ax = axes[1]
    _share_panel(ax, meta.get("accounting") or {}, meta.get("flops_per_sequence") or {}, "FLOPs / sequence")

    # 3. measured latency
    if dtypes:
        ax = axes[2]
        labels = list(dtypes)
        x = range(len(labels))
        d = [dtypes[k]["dense"]["median_ms"] for k in labels]
        c = [dtypes[k]["compressed"]["median_ms"] for k in labels]
        ax.bar([i - 0.2 for i in x], d, width=0.4, color=_DENSE, label="dense")
        ax.bar([i + 0.2 for i in x], c, width=0.4, color=_COMP, label="compressed")
        for i, k in enumerate(labels):
            ax.text(i + 0.2, c[i], f"{d[i] / c[i]:.2f}x", ha="center", va="bottom", fontsize=9)
        ax.set_xticks(list(x), labels)
        ax.set_ylabel("ms per batch (median)", fontsize=9)
        ax.legend(fontsize=8)
        limit = f", FLOP limit {lat['flop_ratio']:.2f}x" if lat.get("flop_ratio") else ""
        ax.set_title(f"latency, batch {lat.get('batch_size')} x {lat.get('seq_len')}{limit}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def lm_report_png(meta: dict[str, Any], path: str | Path) -> Path:
    """The picture of a ``--task lm`` run: perplexity per stage (log scale, dense as a dashed line),
    size and compute as a share of dense, and measured prefill / decode tokens/s."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scores = {k: v.get("perplexity") for k, v in (meta.get("scores") or {}).items() if isinstance(v, dict)}
    scores = {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))}
    lat = {k: v for k, v in (meta.get("latency") or {}).items() if isinstance(v, dict) and "dense" in v}
    ncols = 3 if lat else 2
    fig = Figure(figsize=(4.6 * ncols, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    recipe = meta.get("recipe") or {}
    import re

    source = re.sub(r"-[0-9a-f]{10}$", "", Path(str(meta.get("base_model", "?"))).name)  # a GGUF cache folder's key
    title = f"{meta.get('method', '?')} on {source}"
    if recipe.get("keep") and recipe.get("rank") is None:
        title += f", keep {recipe['keep']:g} of the target weights ({recipe.get('rank_policy', 'uniform')} ranks)"
    if meta.get("warnings"):
        title += "  -  WARNING: see factorlm.json"
    fig.suptitle(title, fontsize=11, color=_WARN if meta.get("warnings") else "black")

    ax = axes[0]
    if scores:
        names = list(scores)
        vals = [scores[n] for n in names]
        colors = [_DENSE if n == "dense" else (_COMP if n == "final" else "#9dc3e6") for n in names]
        bars = ax.bar(range(len(vals)), vals, color=colors)
        ax.set_yscale("log")
        ax.set_xticks(range(len(vals)), names, rotation=30, ha="right", fontsize=8)
        dense = scores.get("dense")
        for b, v in zip(bars, vals):
            rel = f"\n{v / dense:.2f}x" if dense and b is not bars[0] else ""
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}{rel}", ha="center", va="bottom", fontsize=8)
        if dense:
            ax.axhline(dense, color=_DENSE, ls="--", lw=1)
        ax.set_ylim(min(vals) * 0.7, max(vals) * 2.5)
    text = ((meta.get("method_info") or {}).get("text") or {}).get("evaluation") or {}
    ax.set_title(f"perplexity on {text.get('source', 'held-out text')} (lower is better)", fontsize=10)

    ax = axes[1]
    _share_panel(ax, meta.get("accounting") or {}, meta.get("flops_per_token") or {}, "FLOPs / token")

    if lat:
        ax = axes[2]
        labels, dvals, cvals = [], [], []
        for dt, r in lat.items():
            for kind in ("prefill", "decode"):
                labels.append(f"{kind}\n{dt}")
                dvals.append(r["dense"][f"{kind}_tokens_per_s"])
                cvals.append(r["compressed"][f"{kind}_tokens_per_s"])
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], dvals, width=0.4, color=_DENSE, label="dense")
        ax.bar([i + 0.2 for i in x], cvals, width=0.4, color=_COMP, label="compressed")
        for i in x:
            ax.text(i + 0.2, cvals[i], f"{cvals[i] / dvals[i]:.2f}x", ha="center", va="bottom", fontsize=9)
        ax.set_yscale("log")
        ax.set_ylim(min(dvals + cvals) * 0.5, max(dvals + cvals) * 6)
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_ylabel("tokens / s (median)", fontsize=9)
        ax.legend(fontsize=8, loc="upper right", ncols=2)
        ax.set_title("measured generation speed", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path
