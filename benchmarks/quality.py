"""Quality benchmark: dense vs compressed methods at several budgets on real tasks (CPU-sized).

Resumable: each (task, method, keep, variant) run writes benchmarks/results/runs/<id>.json and is
skipped when that file exists; dense teachers are cached (benchmarks/results/cache/), so every
method of a task starts from the same fine-tuned teacher.

    python benchmarks/quality.py --tasks rotten_tomatoes sst2 mrpc --methods svd fwsvd --keeps 0.5 0.25 0.16
    python benchmarks/quality.py --table-only      # rebuild table / JSON / PNG from finished runs

Variants are "method" or "method:opt=value,opt=value" (e.g. "lpaf:prune=false"); any RunConfig
field (structure, schedule, rank_policy...) or method option can be set that way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
RUNS = RESULTS / "runs"
GLUE = Path(os.environ.get("FACTORLM_DATA_DIR", ROOT.parents[1] / "shared" / "data" / "glue"))

# CPU-sized settings per task (stated in the closing note): train subset, sequence length, epochs.
# A dense MiniLM training step (batch 32) takes ~3.5 s on the 2-core CPU, so the dense teacher
# gets 2-3 epochs of a train subset and every compression phase (pruning, each fine-tune) 1 epoch.
TASKS = {
    "rotten_tomatoes": dict(max_train_samples=4000, max_length=64, teacher_epochs=3.0),
    "sst2": dict(max_train_samples=2000, max_length=64, teacher_epochs=2.0, data_dir=str(GLUE)),
    # MRPC: 2 teacher epochs at 5e-5 left the teacher at the majority class, so it gets 6 at 1e-4.
    "mrpc": dict(max_train_samples=2000, max_length=128, teacher_epochs=6.0, teacher_learning_rate=1e-4,
                 data_dir=str(GLUE)),
    "cola": dict(max_train_samples=2000, max_length=64, teacher_epochs=2.0, data_dir=str(GLUE)),
    "stsb": dict(max_train_samples=2000, max_length=128, teacher_epochs=2.0, data_dir=str(GLUE)),
}
COMMON = dict(batch_size=32, eval_batch_size=256, learning_rate=1e-4, epochs=1.0,
              teacher_learning_rate=5e-5, warmup_ratio=0.06, seed=0)

# The grids of the issues: (variants, keeps) groups run in order. "{task}-k{keep}" names the pruned
# model cache: the first LPAF run of a (task, keep) prunes and saves it, the ablations re-use it.
LPAF = "lpaf:pruned_model={task}-k{keep}"
STAGED = "schedule=staged,stages=3"
PRESETS = {
    "lpaf": [(["svd", "fwsvd", LPAF], [0.5, 0.25, 0.16]),
             ([f"{LPAF},finetune=false", f"{LPAF},decomposition=svd", f"{LPAF},mixed_rank=false",
               f"{LPAF},consistency=0", "lpaf:prune=false", "lpaf:importance=magnitude"], [0.25]),
             (["svd:epochs=2", "fwsvd:epochs=2"], [0.25, 0.16])],  # baselines at LPAF's step count
    "structures": [(["svd", "svd:structure=monarch", "svd:structure=blockwise", f"svd:{STAGED}",
                     f"svd:structure=monarch,{STAGED}", f"svd:structure=blockwise,{STAGED}"], [0.5, 0.25, 0.16])],
    "rankdyna": [(["svd", "fwsvd", LPAF, "rankdyna"], [0.5, 0.25, 0.16]),
                 (["rankdyna:epochs=3"], [0.25, 0.16])],  # SST-2: the teacher's 2 epochs + 1 = equal total steps
}
LABELS = {
    "svd": "SVD_Ft", "fwsvd": "FWSVD_Ft", "svd:epochs=2": "SVD_Ft, 2 epochs (LPAF's steps)",
    "fwsvd:epochs=2": "FWSVD_Ft, 2 epochs (LPAF's steps)", LPAF: "LPAF", "rankdyna": "RankDyna (from the pre-trained model)",
    "rankdyna:epochs=3": "RankDyna, 3 epochs",
    f"{LPAF},finetune=false": "LPAF w/o re-training (step 3)",
    f"{LPAF},decomposition=svd": "LPAF, vanilla SVD instead of sparsity-aware",
    f"{LPAF},mixed_rank=false": "LPAF, vanilla fine-tuning instead of mixed-rank",
    f"{LPAF},consistency=0": "LPAF, mixed-rank w/o consistency loss",
    "lpaf:decomposition=em": "LPAF, EM sparsity-aware fit (instead of row-weighted)",
    "lpaf:density=0.5": "LPAF, pruning density v = 0.5 (instead of v = keep)",
    "lpaf:prune_epochs=3,save_pruned={task}-k{keep}-e3": "LPAF, 3 pruning epochs (instead of 1)",
    f"{LPAF},p_init=1.0,p_zero_at=0.8": "LPAF, p_init 1.0 reaching 0 at 80% (instead of 0.5 at 50%)",
    "lpaf:prune=false": "LPAF w/o pruning (step 1)", "lpaf:importance=magnitude": "LPAF, UP_zero (magnitude) pruning",
    "svd:exclude=attention": "SVD_Ft of the FFN only (attention kept dense; keep = share of the FFN weights)",
    "svd:structure=monarch": "Monarch, one-shot", "svd:structure=blockwise": "block-wise, one-shot",
    f"svd:{STAGED}": "low rank, staged", f"svd:structure=monarch,{STAGED}": "Monarch, staged",
    f"svd:structure=blockwise,{STAGED}": "block-wise, staged",
}


def parse_variant(v: str) -> tuple[str, dict, dict]:
    from factorlm.config import RunConfig

    method, _, rest = v.partition(":")
    cfg, opts = {}, {}
    for kv in filter(None, rest.split(",")):
        k, _, val = kv.partition("=")
        val = {"true": True, "false": False}.get(val.lower(), val)
        for cast in (int, float):
            if isinstance(val, str):
                try:
                    val = cast(val)
                except ValueError:
                    pass
        if k in ("include", "exclude"):  # regex lists: one pattern per variant (e.g. exclude=attention)
            val = [val]
        (cfg if k in RunConfig.field_names() else opts)[k] = val
    return method, cfg, opts


def run_id(task: str, variant: str, keep: float | None) -> str:
    safe = variant.replace(":", "_").replace(",", "_").replace("=", "-")
    return f"{task}__{safe}__{'dense' if keep is None else f'k{keep:g}'}"


def run_one(task: str, variant: str, keep: float, args) -> dict:
    from factorlm import RunConfig, compress

    method, cfg_over, opts = parse_variant(variant)
    for k in ("pruned_model", "save_pruned"):  # per-keep paths: "{keep}" in a variant is the budget
        if isinstance(opts.get(k), str):
            smoke = f"ms{args.max_steps}-" if args.max_steps else ""  # a smoke run's pruning is never re-used
            opts[k] = str(RESULTS / "cache" / "pruned" / (smoke + opts[k].format(task=task, keep=f"{keep:g}")))
    if "pruned_model" in opts and not Path(opts["pruned_model"]).is_dir():
        if set(opts) - {"pruned_model"}:  # an ablation of the default LPAF: it needs that run's pruning
            raise RuntimeError(f"run plain LPAF first: {opts['pruned_model']} is not cached yet")
        opts["save_pruned"] = opts.pop("pruned_model")  # first run of this (task, keep): prune and cache
    settings = {**COMMON, **TASKS[task], **cfg_over}
    if args.max_steps:
        settings["max_steps"] = args.max_steps
    config = RunConfig(task=task, method=method, keep=keep, method_options=opts, progress=False,
                       cache_dir=str(RESULTS / "cache"), **settings)
    t0 = time.time()
    report = compress(config, save=False, quiet=not args.verbose)
    return {
        "task": task, "variant": variant, "method": method, "keep": keep, "main_metric": report.main_metric,
        "score": report.final, "dense": report.scores.get("dense", {}).get(report.main_metric),
        "phases": with_reused_pruning(report.scores, opts.get("pruned_model")), "accounting": report.accounting, "flops": report.flops,
        "train_steps": report.total_train_steps, "wall_s": round(time.time() - t0, 1), "info": report.info,
        "warnings": report.warnings, "baseline": report.baseline, "config": config.to_dict(),
    }


def with_reused_pruning(phases: dict, pruned_model: str | None) -> dict:
    """A run that re-uses a cached pruning still owes its steps: copy the pruning phase in, marked."""
    from factorlm.models.io import read_meta

    if not pruned_model or "prune" in phases:
        return phases
    prune = ((read_meta(pruned_model) or {}).get("scores") or {}).get("prune")
    return {**phases, "prune": {**prune, "reused": True}} if prune else phases


def load_runs() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]


def compress_steps(run: dict) -> int:
    """Optimizer steps of the compression itself (the shared dense teacher's steps excluded)."""
    return int(sum(v.get("steps", 0) for k, v in run["phases"].items() if k != "dense"))


def teacher_steps(run: dict) -> int:
    """Steps of the dense teacher the run starts from (0 for RankDyna, which starts pre-trained)."""
    dense = run["phases"].get("dense", {})
    return int(dense.get("steps", 0)) if run["method"] != "rankdyna" else 0


def table(runs: list[dict], order: list[str] | None = None, metric: str | None = None) -> str:
    """Markdown tables, one per task; rows follow ``order`` (variants), columns the budgets.

    ``metric``: a metric other than the task's main one (e.g. MRPC's accuracy), read from the final phase.
    """
    if order:
        runs = sorted(runs, key=lambda r: order.index(r["variant"]) if r["variant"] in order else len(order))
    by = {}
    for r in runs:
        by.setdefault(r["task"], {}).setdefault(r["variant"], {})[r["keep"]] = r
    lines = []
    for task, variants in by.items():
        keeps = sorted({k for v in variants.values() for k in v}, reverse=True)
        any_run = next(iter(next(iter(variants.values())).values()))
        dense = any_run.get("dense")
        main = any_run["main_metric"]
        name = metric if metric and metric in any_run["phases"].get("final", {}) else main

        def value(r):
            return r["phases"].get("final", {}).get(name, r["score"] if name == main else float("nan"))

        dense = any_run["phases"].get("dense", {}).get(name, dense) if name != main else dense
        t_steps = next((r["phases"]["dense"].get("steps") for v in variants.values() for r in v.values()
                        if r["phases"].get("dense", {}).get("steps")), None)
        head = f"\n### {task} ({name} x100; dense teacher {100 * dense:.1f}" if dense else f"\n### {task} ({name} x100"
        lines.append(head + (f", {t_steps:g} teacher steps)" if t_steps else ")"))
        lines.append("| method | " + " | ".join(f"keep {k:g}" for k in keeps)
                     + " | compression steps | total steps (teacher + compression) |")
        lines.append("|---|" + "---|" * (len(keeps) + 2))
        for variant, rs in variants.items():
            cells = [f"{100 * value(rs[k]):.1f}" if k in rs else "" for k in keeps]
            steps = sorted({compress_steps(rs[k]) for k in rs})
            total = sorted({teacher_steps(rs[k]) + compress_steps(rs[k]) for k in rs})
            lines.append(f"| {LABELS.get(variant, variant)} | " + " | ".join(cells)
                         + f" | {'/'.join(map(str, steps))} | {'/'.join(map(str, total))} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in runs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rs = [r for r in runs if r["task"] == task]
        for variant in sorted({r["variant"] for r in rs}):
            pts = sorted((r["keep"], 100 * r["score"]) for r in rs if r["variant"] == variant)
            ax.plot(*zip(*pts), marker="o", label=variant)
        dense = next((r["dense"] for r in rs if r.get("dense")), None)
        if dense:
            ax.axhline(100 * dense, color="k", ls="--", lw=1, label="dense")
        ax.set_title(task)
        ax.set_xlabel("fraction of encoder weights kept")
        ax.set_ylabel(rs[0]["main_metric"])
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["rotten_tomatoes", "sst2", "mrpc"])
    p.add_argument("--preset", choices=sorted(PRESETS), help="an issue's grid of variants and budgets")
    p.add_argument("--methods", nargs="+", default=["svd", "fwsvd"], help="variants, e.g. svd lpaf lpaf:prune=false")
    p.add_argument("--keeps", nargs="+", type=float, default=[0.5, 0.25, 0.16], help="budgets (filters a preset's)")
    p.add_argument("--max-steps", type=int, help="cap every phase (smoke test of the benchmark itself)")
    p.add_argument("--name", default="quality", help="basename of the JSON/PNG/MD outputs")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--metric", help="tabulate this metric of the final phase instead of the main one (e.g. accuracy)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (run two benchmarks side by side with 1)")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    global RUNS
    if args.max_steps:  # a smoke test of the benchmark: its files never mix with the real runs
        RUNS = RUNS.with_name(f"{RUNS.name}_smoke_ms{args.max_steps}")
        args.name += f"_smoke_ms{args.max_steps}"
    RUNS.mkdir(parents=True, exist_ok=True)
    groups = PRESETS[args.preset] if args.preset else [(args.methods, args.keeps)]
    groups = [(vs, [k for k in ks if k in args.keeps]) for vs, ks in groups]
    grid = [(t, v, k) for t in args.tasks for vs, ks in groups for v in vs for k in ks]
    if not args.table_only:
        for task, variant, keep in grid:
            f = RUNS / f"{run_id(task, variant, keep)}.json"
            if f.exists():
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {task} {variant} keep={keep}", flush=True)
            try:
                res = run_one(task, variant, keep, args)
            except Exception as e:  # noqa: BLE001 - keep going, report at the end
                print(f"   FAILED: {type(e).__name__}: {e}", flush=True)
                continue
            f.write_text(json.dumps(res, indent=1, default=str))
            print(f"   {res['main_metric']}={res['score']:.4f} (dense {res['dense']}) steps={res['train_steps']} "
                  f"{res['wall_s']}s", flush=True)
    wanted = {run_id(*g) for g in grid}
    runs = [r for r in load_runs() if run_id(r["task"], r["variant"], r["keep"]) in wanted]
    runs.sort(key=lambda r: args.tasks.index(r["task"]))  # stable: tables in the order of --tasks
    if not runs:
        sys.exit("no finished runs")
    md = table(runs, order=list(dict.fromkeys(v for _, v, _ in grid)), metric=args.metric)
    print(md)
    (RESULTS / f"{args.name}.md").write_text(md + "\n")
    (RESULTS / f"{args.name}.json").write_text(json.dumps(runs, indent=1, default=str))
    if not args.metric:  # the plot shows the main metric
        plot(runs, RESULTS / f"{args.name}.png")
    if not args.max_steps:
        plot_rank_maps(runs)


def plot_rank_maps(runs: list[dict]) -> None:
    """RankDyna's final rank per matrix (layer x module heat map) and budget curve, one pair per run."""
    from factorlm.ranks.rankdyna import plot_budget, plot_ranks

    for r in runs:
        info = r.get("info") or {}
        if r["method"] == "rankdyna" and info.get("ranks"):
            stem = RESULTS / "rankdyna" / f"{r['task']}-k{r['keep']:g}"
            stem.parent.mkdir(parents=True, exist_ok=True)
            plot_ranks(info["ranks"], f"{stem}-ranks.png", title=f"RankDyna ranks, {r['task']}, keep {r['keep']:g}")
            if info.get("budget_history"):
                plot_budget(info["budget_history"], f"{stem}-budget.png", title=f"RankDyna budget, {r['task']}")


if __name__ == "__main__":
    main()
