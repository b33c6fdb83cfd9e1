"""Does the fast training configuration keep the score? (issue 11, part 1)

A dense MiniLM-L6 teacher fine-tuned on a task's full training set (10% held out for keep-best) in
``fp32`` (random batches, the previous default) and in ``bf16-grouped`` (``--mixed-precision bf16
--group-by-length``), several seeds each; dev score mean +- std, and the wall time of the fine-tune.

    python benchmarks/train_precision.py --threads 1 --task mrpc --seeds 0 1 2
    python benchmarks/train_precision.py --table-only

Settings are the teacher settings of ``benchmarks/premise.py`` (``TEACHERS``, ``COMMON``), so the
``bf16-grouped`` seed-0 run is the recipe of the premise benchmark's teacher.  Resumable
(``results/runs_precision/<task>__<mode>__s<seed>.json``, ``.claim`` files for two processes).
Writes ``results/train_precision.{md,json}``.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from premise import COMMON, GLUE, RESULTS, TEACHERS, run_grid  # noqa: E402

RUNS = RESULTS / "runs_precision"
MODES = {"fp32": dict(mixed_precision="no", group_by_length=False),
         "bf16-grouped": dict(mixed_precision="bf16", group_by_length=True)}


def run_one(task: str, mode: str, seed: int) -> dict:
    from factorlm import RunConfig, finetune

    t = TEACHERS[task]
    settings = {**COMMON, **MODES[mode], "seed": seed, "epochs": t["teacher_epochs"],
                "learning_rate": t["teacher_learning_rate"]}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(task=task, data_dir=str(GLUE), output=f"{tmp}/m", cache_dir=tmp, **settings)
        t0 = time.time()
        report = finetune(cfg, quiet=True)
        wall = round(time.time() - t0, 1)
    final = report.scores["final"]
    return {"task": task, "mode": mode, "seed": seed, "main_metric": report.main_metric,
            "score": report.final, "dev": {k: v for k, v in final.items() if isinstance(v, float)},
            "steps": final.get("steps"), "wall_s": wall,
            "warnings": report.warnings, "config": cfg.to_dict()}


def table(runs: list[dict]) -> str:
    lines = ["| task | mode | seeds | dev score x100 (mean +- std) | per seed | steps | wall (min, mean) |",
             "|---|---|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in runs):
        for mode in MODES:
            rs = sorted((r for r in runs if r["task"] == task and r["mode"] == mode), key=lambda r: r["seed"])
            if not rs:
                continue
            s = [100 * r["score"] for r in rs]
            sd = statistics.stdev(s) if len(s) > 1 else float("nan")
            lines.append(f"| {task} ({rs[0]['main_metric']}) | {mode} | {len(rs)} | {statistics.mean(s):.1f} +- {sd:.1f} | "
                         + ", ".join(f"{x:.1f}" for x in s) + f" | {rs[0]['steps']} | "
                         + f"{statistics.mean(r['wall_s'] for r in rs) / 60:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="mrpc", choices=list(TEACHERS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    RUNS.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        cells = [(RUNS / f"{args.task}__{mode}__s{seed}.json", f"{args.task} {mode} seed {seed}",
                  functools.partial(run_one, args.task, mode, seed)) for seed in args.seeds for mode in args.modes]
        run_grid(cells, lambda r: f"{r['main_metric']}={r['score']:.4f} {r['wall_s']}s")
    runs = [json.loads(f.read_text()) for f in sorted(RUNS.glob("*.json"))]
    if not runs:
        sys.exit("no finished runs")
    md = table(runs)
    print(md)
    (RESULTS / "train_precision.md").write_text(md + "\n")
    (RESULTS / "train_precision.json").write_text(json.dumps(runs, indent=1, default=str))


if __name__ == "__main__":
    main()
