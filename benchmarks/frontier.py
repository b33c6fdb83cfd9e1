"""Score-vs-latency frontier: every quality run (task x method x budget) placed at its measured latency.

    python benchmarks/frontier.py                                   # results/speed.json, best bf16 config
    python benchmarks/frontier.py --config fp32                     # fp32 eager latencies instead
    python benchmarks/frontier.py --speed benchmarks/results/speed_quick.json      # -> frontier_quick.*
    python benchmarks/frontier.py --speed results/speed.json results/speed_structures.json  # + Monarch, block-wise

Why the latency comes from ``speed.json`` and not from the quality runs: the forward latency of a
factorized model depends only on its *layout* -- the structure (low rank, Monarch, block-wise) and
the budget ``keep``, which fix the shapes of every factor -- not on the method that chose the factor
values (SVD, FWSVD, LPAF, RankDyna...) nor on its training.  So one timing per (structure, keep),
taken by ``benchmarks/speed.py`` on MiniLM-L6 in one quiet round-robin process (batch 32 x 128),
serves every method; timing each quality run separately on a shared machine would only add noise.
Approximations, stated in frontier.md: RankDyna's non-uniform ranks have the same parameter and
matmul-FLOP count as the uniform plan of the same keep (a rank-r factor pair costs r (in + out)
multiply-adds per token either way) and are placed at the uniform plan's latency; runs whose layout
was not timed (another model, ``include``/``exclude`` subsets such as FFN-only, a structure absent
from the speed files: ``speed.py`` times low rank only unless ``--structures`` says more, e.g.
``speed.py --models minilm --batches 32 --structures monarch blockwise --name speed_structures``)
are left out and listed.  The quality runs' own sequence length (64 or 128) does not
matter: the reference shape is the same for every point of a task.

Quality records: ``results/runs/*.json`` and the ``results/*.json`` run lists written by
``quality.py`` (records with task / variant / keep / score / dense), de-duplicated by (task,
variant, keep).  Latency: ``speed.json`` as written by ``speed.py`` (cells per model / batch /
config), or the older ``{"env", "rows"}`` format (fp32 eager only).  ``--config``: ``best-bf16``
(default: the fastest bf16-family configuration of each variant, e.g. bf16 eager or compiled),
``best-fp32``, or one configuration name (``fp32``, ``ort-int8``...).  Writes ``--name``.png / .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
MODEL = "minilm"


# -- latency ------------------------------------------------------------------------------------------
def load_latency(path: Path, config: str, batch: int, seq: int) -> tuple[dict, str]:
    """``{(structure, keep): ms}`` (dense: ``("dense", None)``) and a description of what was taken."""
    data = json.loads(path.read_text())
    if "rows" in data and "cells" not in data:  # the older speed.py: fp32 eager only
        if config not in ("fp32", "best-fp32"):
            print(f"{path} is an older speed.json (fp32 eager only): --config {config} -> fp32", file=sys.stderr)
        rows = [r for r in data["rows"] if r["batch"] == batch and r["seq"] == seq]
        if not rows:
            sys.exit(f"{path}: no rows at batch {batch} x {seq}")
        lat = {(r["structure"], r["keep"]): r["latency_ms"] for r in rows}
        return lat, f"fp32 eager (older speed.json), batch {batch} x {seq}, {data['env'].get('threads')} threads"
    cells = [c for c in data["cells"] if c["model"] == MODEL and "median_ms" in c]
    shapes = sorted({(c["batch"], c["seq"]) for c in cells}, key=lambda s: (s != (batch, seq), -s[0] * s[1]))
    if not shapes:
        sys.exit(f"{path}: no measured {MODEL} cells")
    b, s = shapes[0]  # the asked shape, else the largest measured one (e.g. a --quick run)
    cells = [c for c in cells if (c["batch"], c["seq"]) == (b, s)]
    if config.startswith("best-"):
        fam = config.split("-", 1)[1]
        pool = [c for c in cells if c["family"] == fam]
        if not pool and fam == "bf16":
            print("no bf16 cells in the speed results (no native bf16?): using the fp32 family", file=sys.stderr)
            fam, pool = "fp32", [c for c in cells if c["family"] == "fp32"]
        what = f"fastest {fam}-family configuration per variant"
    else:
        pool = [c for c in cells if c["config"] == config]
        what = f"{config}"
    if not pool:
        sys.exit(f"{path}: no {MODEL} cells for --config {config}")
    lat, used = {}, {}
    for c in pool:
        key = ("dense", None) if c["variant"] == "dense" else (c["structure"], c["keep"])
        if key not in lat or c["median_ms"] < lat[key]:
            lat[key], used[key] = c["median_ms"], c["config"]
    configs = ", ".join(sorted(set(used.values())))
    return lat, (f"{what} ({configs}), batch {b} x {s}, {data['env'].get('threads')} threads"
                 + (" [--quick smoke run]" if data.get("settings", {}).get("quick") else ""))


# -- quality runs ----------------------------------------------------------------------------------------
def load_runs(results: Path) -> list[dict]:
    runs: dict[tuple, dict] = {}
    files = sorted(results.glob("*.json")) + sorted((results / "runs").glob("*.json"))  # runs/ last: they win
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for r in data if isinstance(data, list) else [data]:
            if isinstance(r, dict) and {"task", "variant", "keep", "score"} <= r.keys() and r.get("score") is not None:
                runs[(r["task"], r["variant"], r["keep"])] = r
    return list(runs.values())


def layout(run: dict) -> tuple[tuple | None, str | None]:
    """The timed layout of a run, ``(structure, keep)``, or ``None`` and why it has none."""
    cfg = run.get("config") or {}
    if cfg.get("model") not in (None, "", "minilm", "default"):
        return None, f"model {cfg['model']} (latency timed on MiniLM-L6 only)"
    if cfg.get("include") or cfg.get("exclude"):
        return None, f"a subset of the layers (include {cfg.get('include')}, exclude {cfg.get('exclude')})"
    return (cfg.get("structure") or "lowrank", run["keep"]), None


def label(variant: str) -> str:
    try:
        sys.path.insert(0, str(ROOT))
        from quality import LABELS  # the quality tables' names of the variants
    except Exception:  # noqa: BLE001 - plain variant names will do
        LABELS = {}
    return LABELS.get(variant, variant)


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (lower latency, higher score), by latency."""
    out, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            out.append((x, y))
            best = y
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speed", type=Path, nargs="+", default=[RESULTS / "speed.json"],
                   help="speed.py results; several files are merged (the first one that has a layout wins)")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the quality results")
    p.add_argument("--config", default="best-bf16", help="best-bf16, best-fp32 or a configuration (fp32, ort-int8...)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--tasks", nargs="+", help="default: every task with runs")
    p.add_argument("--min-keeps", type=int, default=2,
                   help="plot variants run at >= this many budgets (single-budget ablations: table only)")
    p.add_argument("--name", default=None, help="output basename (default: frontier, frontier_quick for a --quick speed run)")
    args = p.parse_args()
    lat, whats = {}, []
    for f in args.speed:
        if not f.is_file():
            sys.exit(f"{f} not found: run benchmarks/speed.py (or --quick) first")
        more, what = load_latency(f, args.config, args.batch, args.seq)
        lat = {**more, **lat}
        whats.append(what)
    lat_what = "; ".join(dict.fromkeys(whats))
    speed_names = ", ".join(f.name for f in args.speed)
    if args.name is None:
        args.name = "frontier_quick" if "--quick" in lat_what else "frontier"
    runs = load_runs(args.results)
    if args.tasks:
        runs = [r for r in runs if r["task"] in args.tasks]
    if not runs:
        sys.exit(f"no quality runs under {args.results}")
    tasks = list(dict.fromkeys(sorted(r["task"] for r in runs)))

    points, skipped = [], {}
    for r in runs:
        key, why = layout(r)
        if key is None:
            skipped.setdefault(why, []).append(f"{r['task']}/{r['variant']}@{r['keep']:g}")
        elif key not in lat:
            skipped.setdefault(f"layout {key[0]} keep {key[1]:g} not in {speed_names}", []).append(
                f"{r['task']}/{r['variant']}")
        else:
            points.append({"task": r["task"], "variant": r["variant"], "label": label(r["variant"]),
                           "keep": r["keep"], "structure": key[0], "latency_ms": lat[key], "score": r["score"],
                           "dense": r.get("dense"), "metric": r.get("main_metric", "score"),
                           "approx": r.get("method") == "rankdyna" or (r.get("config") or {}).get("rank_policy",
                                                                                                 "uniform") != "uniform"})
    dense_ms = lat.get(("dense", None))

    # -- table
    lines = [f"# Score vs latency (MiniLM-L6): {lat_what}", "",
             f"Latency per (structure, keep) from {speed_names} (it does not depend on the method); "
             "scores from the quality runs (x100). Pareto = no other point of the task is both faster and better. "
             "* = non-uniform ranks placed at the uniform plan's latency (same FLOPs)."]
    for task in tasks:
        pts = sorted((q for q in points if q["task"] == task), key=lambda q: (q["latency_ms"], -q["score"]))
        if not pts:
            continue
        dense = next((q["dense"] for q in pts if q["dense"] is not None), None)
        allp = [(q["latency_ms"], q["score"]) for q in pts] + ([(dense_ms, dense)] if dense is not None and dense_ms else [])
        front = set(pareto(allp))
        lines += ["", f"## {task} ({pts[0]['metric']})", "",
                  "| method | keep | latency ms | speed-up vs dense | score | vs dense | Pareto |", "|---|---|---|---|---|---|---|"]
        if dense is not None and dense_ms:
            lines.append(f"| dense | 1 | {dense_ms:.1f} | 1.00x | {100 * dense:.1f} | - | "
                         f"{'yes' if (dense_ms, dense) in front else ''} |")
        for q in pts:
            sp = f"{dense_ms / q['latency_ms']:.2f}x" if dense_ms else "-"
            dv = f"{100 * (q['score'] - dense):+.1f}" if dense is not None else "-"
            lines.append(f"| {q['label']}{' *' if q['approx'] else ''} | {q['keep']:g} | {q['latency_ms']:.1f} | {sp} | "
                         f"{100 * q['score']:.1f} | {dv} | {'yes' if (q['latency_ms'], q['score']) in front else ''} |")
    if skipped:
        lines += ["", "Left out (no timed layout):"]
        lines += [f"- {why}: {', '.join(sorted(set(w)))}" for why, w in skipped.items()]
    md = "\n".join(lines)
    print(md, flush=True)

    # -- plot
    from matplotlib.figure import Figure

    shown = [t for t in tasks if any(q["task"] == t for q in points)]
    if not shown:
        sys.exit("no quality run has a timed layout: nothing to plot")
    ncol = min(3, len(shown))
    nrow = -(-len(shown) // ncol)
    fig = Figure(figsize=(5.5 * ncol, 4.3 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    markers = "osD^vP<>hX*p"
    for ax, task in zip(axes, shown):
        pts = [q for q in points if q["task"] == task]
        keeps_of = {}
        for q in pts:
            keeps_of.setdefault(q["variant"], set()).add(q["keep"])
        need = min(args.min_keeps, len({q["keep"] for q in pts}))  # a speed run with fewer budgets: all variants
        variants = [v for v in dict.fromkeys(q["variant"] for q in pts) if len(keeps_of[v]) >= need]
        others = [q for q in pts if q["variant"] not in variants]
        if others:
            ax.plot([q["latency_ms"] for q in others], [100 * q["score"] for q in others], "x", ms=4, color="0.6",
                    label=f"single-budget variants ({len({q['variant'] for q in others})}, see table)")
        for i, v in enumerate(variants):
            vp = sorted((q for q in pts if q["variant"] == v), key=lambda q: q["latency_ms"])
            ax.plot([q["latency_ms"] for q in vp], [100 * q["score"] for q in vp], marker=markers[i % len(markers)],
                    ms=5, lw=0.8, alpha=0.85, label=vp[0]["label"])
            for q in vp:
                ax.annotate(f"{q['keep']:g}", (q["latency_ms"], 100 * q["score"]), fontsize=5,
                            xytext=(2, 2), textcoords="offset points")
        dense = next((q["dense"] for q in pts if q["dense"] is not None), None)
        allp = [(q["latency_ms"], q["score"]) for q in pts]
        if dense is not None and dense_ms:
            ax.plot([dense_ms], [100 * dense], marker="*", ms=14, color="k", ls="", label="dense")
            allp.append((dense_ms, dense))
        front = pareto(allp)
        ax.step([x for x, _ in front], [100 * y for _, y in front], where="post", color="grey", ls="--", lw=1,
                label="Pareto frontier (all points)")
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("latency, ms (batch 32 x 128)" if "32 x 128" in lat_what else "latency, ms")
        ax.set_ylabel(f"{pts[0]['metric']} x100")
        ax.legend(fontsize=6)
    for ax in axes[len(shown):]:
        ax.set_axis_off()
    fig.suptitle(f"Score vs latency, MiniLM-L6 - latency: {lat_what}", fontsize=9)
    fig.tight_layout()
    args.results.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.results / f"{args.name}.png", dpi=120)
    (args.results / f"{args.name}.md").write_text(md + "\n")
    print(f"wrote {args.results / args.name}.png / .md", file=sys.stderr)


if __name__ == "__main__":
    main()
