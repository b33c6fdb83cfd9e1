"""LPAF's premise at scale (issue 11, part 3; the paper's Figure 3 and Appendix A): does first-order
pruning leave matrices that a low-rank fit approximates better than the dense teacher's, with the
score kept?

    python benchmarks/premise.py --threads 1 --tasks mrpc                    # the full grid on MRPC
    python benchmarks/premise.py --threads 1 --tasks stsb --epochs 1 3       # two processes share a grid
    python benchmarks/premise.py --table-only

For each task (its full training set minus the 10% held out for selection): one dense teacher
(``TEACHERS``), then for each criterion (``movement`` = Sanh et al., ``platon`` = Zhang et al.,
``magnitude`` = gradual magnitude pruning, Zhu & Gupta) x density (share of each target matrix's
weights kept) x schedule (epochs of the pruning phase, cubic schedule, distilled from the teacher:
``factorlm compress --method prune`` defaults otherwise), the pruned model's dev score and the mean
over all 36 target matrices of the relative error ||W - W_k||_F / ||W||_F of its best rank-k fit, k =
each matrix's uniform budget rank at keep 0.25 and 0.16 (``factorlm.analysis.rank_errors``), beside
the same error of the teacher's matrix (``T``) and of the teacher magnitude-pruned in one shot to the
same density (``UP_zero``).

Every run trains with ``--mixed-precision bf16 --group-by-length`` (the speed-ups of part 1), batch
32, lr 1e-4, seed 0.  Resumable (``results/runs_premise/<id>.json``; a ``.claim`` file marks a run in
progress so two processes can share a grid).  Writes ``results/premise.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
RUNS = RESULTS / "runs_premise"
GLUE = Path(os.environ.get("FACTORLM_DATA_DIR", ROOT.parents[1] / "shared" / "data" / "glue"))

COMMON = dict(batch_size=32, eval_batch_size=256, learning_rate=1e-4, warmup_ratio=0.06, seed=0,
              mixed_precision="bf16", group_by_length=True, max_length=128, latency=False, progress=False)
TEACHERS = {  # full training sets; MRPC needs the higher lr (5e-5 left it at the majority class)
    "mrpc": dict(teacher_epochs=4.0, teacher_learning_rate=1e-4),
    "stsb": dict(teacher_epochs=3.0, teacher_learning_rate=1e-4),
}
KEEPS = (0.25, 0.16)


def claim(f: Path) -> bool:
    """True when this process may compute the run whose result is ``f``: not done yet, and not claimed
    by another process (an exclusive ``.claim`` file, removed by the claimer when it is done)."""
    if f.exists():
        return False
    try:
        os.close(os.open(f.with_suffix(".claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def run_grid(cells, describe) -> None:
    """Run each ``(result file, name, run)`` not done nor claimed yet (see :func:`claim`), writing its
    result dict as JSON; a failure is printed and the grid goes on."""
    for f, name, run in cells:
        if not claim(f):
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        try:
            res = run()
            f.write_text(json.dumps(res, indent=1, default=str))
            print(f"   {describe(res)}", flush=True)
        except Exception as e:  # noqa: BLE001 - keep going
            print(f"   FAILED: {type(e).__name__}: {e}", flush=True)
        finally:
            f.with_suffix(".claim").unlink(missing_ok=True)


def run_id(task: str, crit: str, density: float, epochs: float) -> str:
    return f"{task}__{crit}__d{density:g}__e{epochs:g}"


def config(task: str, **over):
    from factorlm import RunConfig

    return RunConfig(task=task, data_dir=str(GLUE), cache_dir=str(RESULTS / "cache"), **COMMON, **TEACHERS[task],
                     **over)


def run_one(task: str, crit: str, density: float, epochs: float) -> dict:
    from factorlm import compress
    from factorlm.analysis import rank_errors

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(task, method="prune", keep=density, output=f"{tmp}/pruned", epochs=epochs,
                     method_options={"importance": crit, "density": density, "prune_epochs": epochs})
        t0 = time.time()
        report = compress(cfg, quiet=True)
        wall = round(time.time() - t0, 1)
        teacher = (report.teacher or {}).get("cache")
        if not teacher:
            raise RuntimeError("the dense teacher was not cached (see the run's warnings)")
        errors = {f"{k:g}": rank_errors(teacher, f"{tmp}/pruned", keep=k)["mean"] for k in KEEPS}
    return {"task": task, "criterion": crit, "density": density, "epochs": epochs,
            "main_metric": report.main_metric, "score": report.final,
            "dense": report.scores["dense"][report.main_metric], "steps": report.scores["prune"].get("steps"),
            "wall_s": wall, "errors": errors, "teacher": report.teacher, "warnings": report.warnings,
            "baseline": report.baseline, "collapsed": bool(report.health.get("collapsed")),
            "config": cfg.to_dict()}


def table(runs: list[dict]) -> str:
    out = []
    for task in dict.fromkeys(r["task"] for r in runs):
        rs = sorted((r for r in runs if r["task"] == task), key=lambda r: (r["density"], r["criterion"], r["epochs"]))
        r0 = rs[0]
        e0 = {k: r0["errors"][k] for k in r0["errors"]}
        lab_t = next(c for c in e0["0.25"] if c.startswith("T "))
        base = next((r["baseline"].get(r0["main_metric"]) for r in rs if r.get("baseline")), None)
        out.append(f"### {task} ({r0['main_metric']} x100; dense teacher {100 * r0['dense']:.1f}"
                   + (f"; majority class {100 * base:.1f}" if base is not None else "") + ")\n")
        out.append("mean relative error of the best rank-k fit over the 36 target matrices (lower = more low-rank); "
                   f"dense teacher T: {e0['0.25'][lab_t]:.3f} at keep 0.25, {e0['0.16'][lab_t]:.3f} at keep 0.16\n")
        out.append("| density | criterion | epochs | steps | score | err k@0.25 | UP_zero k@0.25 | err k@0.16 | "
                   "UP_zero k@0.16 | empty rows+cols |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in rs:
            cells = []
            for k in ("0.25", "0.16"):
                e = r["errors"][k]
                mine = next(c for c in e if c.startswith("UP_first") or c.startswith("pruned"))
                zero = next(c for c in e if c.startswith("UP_zero"))
                cells += [f"{e[mine]:.3f}", f"{e[zero]:.3f}"]
            collapsed = r.get("collapsed", any("collapsed" in w for w in r.get("warnings", [])))
            out.append(f"| {r['density']:g} | {r['criterion']} | {r['epochs']:g} | {r['steps']} | "
                       f"{100 * r['score']:.1f}{' (one class)' if collapsed else ''} | " + " | ".join(cells)
                       + f" | {r['errors']['0.25']['empty rows+cols']:.3f} |")
        out.append("")
    return "\n".join(out)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in runs))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.8), squeeze=False)
    marks = {"movement": "o", "platon": "s", "magnitude": "^"}
    for ax, task in zip(axes[0], tasks):
        rs = [r for r in runs if r["task"] == task]
        t_err = next(v for c, v in rs[0]["errors"]["0.25"].items() if c.startswith("T "))
        for r in rs:
            e = r["errors"]["0.25"]
            mine = next(v for c, v in e.items() if c.startswith("UP_first") or c.startswith("pruned"))
            color = {0.1: "tab:red", 0.25: "tab:blue"}.get(r["density"], "tab:gray")
            ax.scatter(mine, 100 * r["score"], marker=marks.get(r["criterion"], "x"), color=color,
                       s=30 + 12 * r["epochs"], alpha=0.8)
            ax.annotate(f"{r['criterion'][:4]} {r['epochs']:g}ep", (mine, 100 * r["score"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.axvline(t_err, color="k", ls="--", lw=1, label=f"dense teacher's matrices ({t_err:.3f})")
        ax.axhline(100 * rs[0]["dense"], color="k", ls=":", lw=1, label=f"dense teacher's score ({100 * rs[0]['dense']:.1f})")
        ax.set_xlabel("mean relative error of the rank-k fit, k at keep 0.25 (left = more low-rank)")
        ax.set_ylabel(f"{rs[0]['main_metric']} of the pruned model (x100)")
        ax.set_title(f"{task}: red = density 0.10, blue = 0.25; marker size = epochs")
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle("LPAF's premise: does pruning leave low-rank matrices, with the score kept?")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["mrpc", "stsb"], choices=list(TEACHERS))
    p.add_argument("--criteria", nargs="+", default=["movement", "platon", "magnitude"])
    p.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.25])
    p.add_argument("--epochs", nargs="+", type=float, default=[1, 3, 10])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    RUNS.mkdir(parents=True, exist_ok=True)
    grid = [(t, c, d, e) for t in args.tasks for e in args.epochs for d in args.densities for c in args.criteria]
    if not args.table_only:
        if not GLUE.is_dir():
            sys.exit(f"GLUE data not found under {GLUE} (set FACTORLM_DATA_DIR)")
        run_grid([(RUNS / f"{run_id(*cell)}.json", run_id(*cell), functools.partial(run_one, *cell)) for cell in grid],
                 lambda r: f"{r['main_metric']}={r['score']:.4f} (dense {r['dense']:.4f}) "
                           f"err@0.25={json.dumps(r['errors']['0.25'])} {r['wall_s']}s")
    runs = [json.loads(f.read_text()) for f in sorted(RUNS.glob("*.json"))]
    runs = [r for r in runs if r["task"] in args.tasks]
    if not runs:
        sys.exit("no finished runs")
    md = table(runs)
    print(md)
    (RESULTS / "premise.md").write_text(md + "\n")
    (RESULTS / "premise.json").write_text(json.dumps(runs, indent=1, default=str))
    plot(runs, RESULTS / "premise.png")


if __name__ == "__main__":
    main()
