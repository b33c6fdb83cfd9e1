"""Extractive QA benchmark: MiniLM-L6 on SQuAD v1.1, dense teacher vs SVD_Ft, FWSVD_Ft, LPAF, RankDyna.

Data: this machine has only SQuAD v1.1 *dev* (48 articles, 10,570 questions), so the task is that
file split by article (``--split-by-article 0.2``: 38 articles train, 10 dev, no article on both
sides; the same split for every seed).  Model selection (keep-best) uses whole held-out *training*
articles, never the reported dev articles.

Equal compute: every method but RankDyna starts from the same cached dense teacher; the
compression itself gets the same number of training epochs for every method: LPAF prunes for one
epoch and re-trains for one, so SVD_Ft and FWSVD_Ft fine-tune for two; RankDyna, which starts from
the pre-trained model, gets the teacher's epochs plus those two.  Equal distillation: none.  LPAF's
pruning phase distils from the teacher by default (KL on the start and end distributions, as
movement pruning does); the comparison runs it with ``distill=0`` like every other method, and its
default (``LPAF_KD``) is a separate, labelled row.

Resumable: each (variant, keep, seed) writes ``benchmarks/results/runs_qa/<id>.json`` and is skipped
when it exists; two processes can share the grid (``--threads 1`` each): a run is claimed by an
exclusive ``<id>.claim`` file first.  ``--table-only`` rebuilds the table, JSON and PNG.

    python benchmarks/qa.py --threads 1 &      # twice, side by side
    python benchmarks/qa.py --quick            # one small cell, minutes: checks the pipeline
    python benchmarks/qa.py --table-only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from premise import claim  # noqa: E402
from quality import compress_steps, parse_variant, with_reused_pruning  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
RUNS = RESULTS / "runs_qa"
SQUAD_DEV = Path(os.environ.get("FACTORLM_SQUAD_DEV", ROOT.parents[1] / "shared" / "data" / "squad" / "dev-v1.1.json"))

# CPU-sized (stated in BENCHMARKS.md): 3,000 training questions of the 38 training articles, windows of
# 256 tokens, 1,000 dev questions of the 10 held-out articles, bf16 autocast.
SETTINGS = dict(task="squad", dev_file=str(SQUAD_DEV), split_by_article=0.2, max_length=256, doc_stride=96,
                max_train_samples=3000, max_eval_samples=1000, selection_size=0.1, batch_size=16,
                eval_batch_size=64, learning_rate=1e-4, epochs=1.0, teacher_epochs=2.0, teacher_learning_rate=1e-4,
                warmup_ratio=0.06, mixed_precision="bf16", latency=False)
QUICK = dict(max_train_samples=400, max_eval_samples=200, teacher_epochs=1.0)

# LPAF's pruning distils from the teacher by default; no other method here distils, so the comparison
# runs it without (equal distillation: none for every method).  LPAF_KD is its default, reported apart.
LPAF = "lpaf:distill=0,pruned_model=squad-k{keep}-s{seed}-nokd"
LPAF_KD = "lpaf:pruned_model=squad-k{keep}-s{seed}"
VARIANTS = ["svd:epochs=2", "fwsvd:epochs=2", LPAF, "rankdyna:epochs=4"]
LABELS = {"svd:epochs=2": "SVD_Ft", "fwsvd:epochs=2": "FWSVD_Ft", LPAF: "LPAF (pruning without distillation)",
          LPAF_KD: "LPAF, distilled pruning (its default; the only distilled row)",
          "rankdyna:epochs=4": "RankDyna (from the pre-trained model)"}


def run_id(variant: str, keep: float, seed: int, quick: bool) -> str:
    safe = variant.replace(":", "_").replace(",", "_").replace("=", "-").replace("{", "").replace("}", "")
    return f"{'quick__' if quick else ''}squad__{safe}__k{keep:g}__s{seed}"


def run_one(variant: str, keep: float, seed: int, args) -> dict:
    from factorlm import RunConfig, compress

    method, cfg_over, opts = parse_variant(variant)
    for k in ("pruned_model", "save_pruned"):
        if isinstance(opts.get(k), str):
            tag = (("quick-" if args.quick else "") + (f"ms{args.max_steps}-" if args.max_steps else "")
                   + opts[k].format(keep=f"{keep:g}", seed=seed))  # a smoke run's pruning is never re-used
            opts[k] = str(RESULTS / "cache" / "pruned" / tag)
    if "pruned_model" in opts and not Path(opts["pruned_model"]).is_dir():
        opts["save_pruned"] = opts.pop("pruned_model")  # the first LPAF run of (keep, seed) prunes and caches
    settings = {**SETTINGS, **(QUICK if args.quick else {}), **cfg_over}
    if args.max_steps:
        settings["max_steps"] = args.max_steps
    config = RunConfig(method=method, keep=keep, seed=seed, method_options=opts, progress=False,
                       cache_dir=str(RESULTS / "cache"), **settings)
    t0 = time.time()
    report = compress(config, save=False, quiet=not args.verbose)
    return {
        "task": "squad", "variant": variant, "method": method, "keep": keep, "seed": seed, "quick": args.quick,
        "main_metric": report.main_metric, "score": report.final,
        "exact": report.scores["final"].get("exact"), "f1": report.scores["final"].get("f1"),
        "dense": report.scores.get("dense", {}), "phases": with_reused_pruning(report.scores, opts.get("pruned_model")),
        "accounting": report.accounting, "train_steps": report.total_train_steps, "wall_s": round(time.time() - t0, 1),
        "warnings": report.warnings, "baseline": report.baseline, "config": config.to_dict(),
        "machine": f"CPU, {args.threads or 'default'} thread(s)",
    }


def _ms(xs: list[float]) -> str:
    if not xs:
        return ""
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"


def _sizes(config: dict) -> str:
    """What the runs trained, selected and were scored on (questions and articles)."""
    from factorlm.data import load_task_data, resolve_task

    task = resolve_task("squad", dev_file=config["dev_file"])
    d = load_task_data(task, dev_file=config["dev_file"], split_by_article=config["split_by_article"],
                       max_train_samples=config["max_train_samples"], max_eval_samples=config["max_eval_samples"],
                       seed=config["seed"], selection_size=config["selection_size"])
    arts = lambda ex: len({e.title for e in ex})  # noqa: E731
    return (f"train {len(d.train):,} questions of {arts(d.train)} articles, selection {len(d.select):,} of "
            f"{arts(d.select)} other training articles, dev {len(d.evals['dev']):,} of {arts(d.evals['dev'])} held-out articles")


def table(runs: list[dict]) -> str:
    keeps = sorted({r["keep"] for r in runs}, reverse=True)
    seeds = sorted({r["seed"] for r in runs})
    dense = {}
    for r in runs:
        if r["dense"].get("f1") is not None and r["method"] != "rankdyna":
            dense[r["seed"]] = r["dense"]
    base = next((r["baseline"] for r in runs if r.get("baseline")), {})
    t_steps = next((r["dense"].get("steps") for r in runs if r["dense"].get("steps") and r["method"] != "rankdyna"), None)
    lines = [f"SQuAD v1.1 dev split by article, MiniLM-L6; {_sizes(runs[0]['config'])}; "
             f"seeds {', '.join(map(str, seeds))}; EM / F1 on the dev articles (mean ± std over seeds)", ""]
    lines.append("| method | " + " | ".join(f"keep {k:g} EM | keep {k:g} F1" for k in keeps)
                 + " | compression steps | wall s (one run) |")
    lines.append("|---|" + "---|" * (2 * len(keeps) + 2))
    if dense:
        d = list(dense.values())
        lines.append("| dense teacher | " + " | ".join(f"{_ms([x['exact'] for x in d])} | {_ms([x['f1'] for x in d])}"
                                                       for _ in keeps) + f" | {int(t_steps)} (teacher) | |")
    if base:
        lines.append("| trivial reader (first words) | " + " | ".join(f"{base['exact']:.1f} | {base['f1']:.1f}" for _ in keeps)
                     + " | 0 | |")
    for v in dict.fromkeys(r["variant"] for r in runs):
        cells, steps, walls = [], set(), []
        for k in keeps:
            rs = [r for r in runs if r["variant"] == v and r["keep"] == k]
            cells.append(f"{_ms([r['exact'] for r in rs])} | {_ms([r['f1'] for r in rs])}")
            steps |= {compress_steps(r) for r in rs}
            walls += [r["wall_s"] for r in rs]
        wall = f"{statistics.mean(walls):.0f}" if walls else ""
        lines.append(f"| {LABELS.get(v, v)} | " + " | ".join(cells) + f" | {'/'.join(map(str, sorted(steps)))} | {wall} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.4))
    for v in dict.fromkeys(r["variant"] for r in runs):
        keeps = sorted({r["keep"] for r in runs if r["variant"] == v})
        means = [statistics.mean([r["f1"] for r in runs if r["variant"] == v and r["keep"] == k]) for k in keeps]
        errs = [statistics.stdev(x) if len(x := [r["f1"] for r in runs if r["variant"] == v and r["keep"] == k]) > 1 else 0
                for k in keeps]
        ax.errorbar(keeps, means, yerr=errs, marker="o", capsize=3, label=LABELS.get(v, v))
    dense = [r["dense"]["f1"] for r in runs if r["dense"].get("f1") is not None and r["method"] != "rankdyna"]
    if dense:
        ax.axhline(statistics.mean(dense), color="k", ls="--", lw=1, label=f"dense teacher {statistics.mean(dense):.1f}")
    base = next((r["baseline"] for r in runs if r.get("baseline")), {})
    if base:
        ax.axhline(base["f1"], color="grey", ls=":", lw=1, label=f"first words of the context {base['f1']:.1f}")
    ax.set_xlabel("fraction of encoder weights kept")
    ax.set_ylabel("F1 on the held-out articles")
    ax.set_title("MiniLM-L6 on SQuAD v1.1 (dev split by article)")
    ax.invert_xaxis()
    ax.set_xticks(sorted({r["keep"] for r in runs}))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=VARIANTS)
    p.add_argument("--keeps", nargs="+", type=float, default=[0.5, 0.25])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--quick", action="store_true", help="400 training questions, one seed, keep 0.25, LPAF and SVD_Ft")
    p.add_argument("--max-steps", type=int, help="cap every phase (smoke test of the benchmark itself)")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (two benchmarks side by side with 1)")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not SQUAD_DEV.is_file():
        sys.exit(f"SQuAD dev-v1.1.json not found at {SQUAD_DEV} (set FACTORLM_SQUAD_DEV)")
    if args.quick:
        args.variants, args.keeps, args.seeds = ["svd:epochs=2", LPAF], [0.25], [0]
    global RUNS
    if args.max_steps:  # a smoke test of the benchmark: its files never mix with the real runs
        RUNS = RUNS.with_name(f"{RUNS.name}_smoke_ms{args.max_steps}")
    RUNS.mkdir(parents=True, exist_ok=True)
    grid = [(v, k, s) for s in args.seeds for k in args.keeps for v in args.variants]
    if not args.table_only:
        for v, k, s in grid:
            f = RUNS / f"{run_id(v, k, s, args.quick)}.json"
            if f.exists() or not claim(f):
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {v} keep={k} seed={s}", flush=True)
            try:
                res = run_one(v, k, s, args)
            except Exception as e:  # noqa: BLE001 - keep going, report at the end
                print(f"   FAILED: {type(e).__name__}: {e}", flush=True)
                f.with_suffix(".claim").unlink(missing_ok=True)
                continue
            f.write_text(json.dumps(res, indent=1, default=str))
            f.with_suffix(".claim").unlink(missing_ok=True)
            print(f"   EM {res['exact']:.1f} F1 {res['f1']:.1f} (dense {res['dense'].get('f1')}) "
                  f"steps={res['train_steps']} {res['wall_s']}s", flush=True)
    wanted = {run_id(v, k, s, args.quick) for v, k, s in grid}
    runs = [json.loads(f.read_text()) for f in sorted(RUNS.glob("*.json")) if f.stem in wanted]
    runs.sort(key=lambda r: (args.variants.index(r["variant"]) if r["variant"] in args.variants else 99, -r["keep"]))
    if not runs:
        sys.exit("no finished runs")
    name = ("qa_quick" if args.quick else "qa") + (f"_smoke_ms{args.max_steps}" if args.max_steps else "")
    md = table(runs)
    print(md)
    (RESULTS / f"{name}.md").write_text(md + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(runs, indent=1, default=str))
    plot(runs, RESULTS / f"{name}.png")


if __name__ == "__main__":
    main()
