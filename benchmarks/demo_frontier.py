"""The demo's frontier picture (issue 30, item 7): the model ``make demo`` just compressed, on a
score-vs-stored-weights plane beside every method's *measured* points on the same task from
``benchmarks/results/runs_protocol`` (the protocol grid: full training set, 3 seeds, mean +- std),
labelled as such -- the demo itself trains on a subset for ~10 minutes, so its point is not one of them.

Stored weights are the share of the target matrices' weights the model keeps (factors count
``rank * (in + out)``); the pruned (sparse) model of LPAF's step 1 is drawn at its honest storage:
bf16 values plus a 1-bit mask per entry, ``density + 1/16`` of the dense bf16 bytes.

    python benchmarks/demo_frontier.py runs/demo          # -> runs/demo/frontier.png
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

RUNS = Path(__file__).resolve().parent / "results" / "runs_protocol"
MASK_BITS = 1 / 16  # one bit per entry next to a 16-bit value


#: the methods drawn (the comparison's rows; ablations and diagnostics stay in BENCHMARKS.md)
SHOWN = ("SVD_Ft_KD", "FWSVD_Ft_KD", "LPAF_KD", "RankDyna", "Whiten_KD", "KFAC_global")


def measured_points(task: str):
    """``({label: [(stored share, mean score, std, seeds)]}, metric)`` over the protocol runs of ``task``:
    per cell the teacher generation with the most seeds (a ``--tag``ged grid such as ``xeon__`` on a tie),
    per keep the mean over seeds (RankDyna's stored share varies by seed: its mean)."""
    runs = []
    for f in sorted(RUNS.glob("*.json")):
        r = json.loads(f.read_text())
        if r.get("task") == task and not r.get("quick") and not r.get("max_steps") and r.get("name") in SHOWN:
            head = f.stem.split("__")[0]
            r["_gen"] = head if head != task else ""
            runs.append(r)
    if not runs:
        return {}, None
    metric = runs[0]["main_metric"]
    by_gen: dict[tuple[str, float], dict[str, list[dict]]] = {}
    for r in runs:
        by_gen.setdefault((r["name"], r["keep"]), {}).setdefault(r["_gen"], []).append(r)
    # per cell the generation with the most seeds (a tie: the tagged, newer one)
    cells = {k: max(g.values(), key=lambda rs: (len(rs), rs[0]["_gen"])) for k, g in by_gen.items()}
    runs = [r for rs in cells.values() for r in rs]
    out: dict[str, list] = {}
    for (name, keep), rs in sorted(cells.items()):
        if len(rs) < 2:
            continue  # a measured point is a mean over seeds
        xs = [100 * r["score"] for r in rs]
        share = statistics.mean(r["accounting"]["target_weights_after"] / r["accounting"]["target_weights_before"] for r in rs)
        gen = f", {rs[0]['_gen']} grid" if rs[0]["_gen"] else ""
        out.setdefault(f"{name}{gen}", []).append((share, statistics.mean(xs), statistics.stdev(xs), len(xs)))
        pruned = [100 * r["phases"]["pruned"][metric] for r in rs if (r.get("phases") or {}).get("pruned", {}).get(metric) is not None]
        if name == "LPAF_KD" and len(pruned) >= 2:
            out.setdefault(f"pruned (sparse) model of LPAF_KD's step 1, values + 1-bit mask{gen}", []).append(
                (keep + MASK_BITS, statistics.mean(pruned), statistics.stdev(pruned), len(pruned)))
    teachers = {(r["_gen"], r["seed"]): 100 * r["dense_score"] for r in runs if r.get("dense_score") is not None}
    if teachers:
        d = list(teachers.values())
        out["dense teachers (every generation)"] = [(1.0, statistics.mean(d), statistics.stdev(d) if len(d) > 1 else 0.0, len(d))]
    return out, metric


def main(folder: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = json.loads((Path(folder) / "factorlm.json").read_text())
    task = meta["task"]
    main_metric = (meta.get("task_spec") or {}).get("main_metric", "accuracy")
    points, metric = measured_points(task)
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    for j, (name, pts) in enumerate(sorted(points.items())):
        xs, ys, es, ns = zip(*sorted(pts))
        ax.errorbar([100 * x for x in xs], ys, yerr=es, marker="o", ms=4, capsize=2, lw=1, color=f"C{j % 10}",
                    label=f"{name} (measured: protocol, {max(ns)} seeds)")
    acc = meta.get("accounting") or {}
    share = acc.get("target_weights_after", 0) / max(acc.get("target_weights_before", 1), 1)
    final = 100 * float((meta.get("scores") or {}).get("final", {}).get(main_metric, float("nan")))
    dense = 100 * float((meta.get("scores") or {}).get("dense", {}).get(main_metric, float("nan")))
    ax.scatter([100 * share], [final], marker="*", s=260, color="crimson", zorder=5,
               label=f"this demo: {meta.get('method')} {final:.1f} (its own dense {dense:.1f}; subset, short training)")
    ax.scatter([100], [dense], marker="*", s=160, color="grey", zorder=5, label="this demo's dense model")
    ax.set_xlabel("stored weights, % of the target matrices' dense weights")
    ax.set_ylabel(f"{metric or main_metric} x100 on dev")
    ax.set_title(f"{task}: the demo's model beside the measured frontier (BENCHMARKS.md)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(folder) / "frontier.png"
    fig.savefig(path, dpi=120)
    print(f"frontier picture: {path}")
    return path


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
