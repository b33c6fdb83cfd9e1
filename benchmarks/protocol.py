"""Issue 11, part 4: the comparison grid under the protocol of BENCHMARKS.md ("Protocol for quality
tables from issue 11 on"): MiniLM-L6 on MRPC, STS-B, rotten_tomatoes and SST-2 (CoLA on request),
dense teacher vs SVD_Ft, FWSVD_Ft, LPAF and RankDyna at keep 0.25 and 0.16, seeds 0, 1 and 2.

Data: each task's full training set; the session itself holds 10% of it (at most 2,000 examples,
drawn with the run's seed) out as the selection slice that keep-best selects on, and every score is
on the full dev set (rotten_tomatoes: its dev split).  SST-2 trains on 20,000 examples: the library
draws them with ``subsample(rest, 20000, seed)`` (``factorlm.data.loaders.load_task_data``), so it
is *a seeded 20,000-example subset per seed* (seed 0, 1 and 2 train on different subsets, as they
hold out different selection slices), not one fixed subset.

Training (every run): batch 32, lr 1e-4, warm-up 6%, length-grouped batches, bf16 autocast where the
machine has native bf16 (``mixed_precision="auto"``: AMX / AVX-512 BF16 CPUs, bf16 GPUs; fp32
elsewhere, where emulated bf16 is several times slower; each row records its machine and precision),
max length 128 (MRPC, STS-B) or 64 (CoLA, SST-2, rotten_tomatoes).  Teachers: 4 epochs at lr 1e-4
for MRPC, 3 for the others; they are cached by a key over everything that shapes them, so every
method of a (task, seed) starts from the same teacher (MRPC and STS-B seed 0 re-use premise.py's).

Equal compute: every compression gets two epochs after the teacher.  SVD_Ft and FWSVD_Ft fine-tune
for two; LPAF prunes for one and re-trains (mixed-rank) for one; RankDyna, which starts from the
pre-trained model and has no teacher, gets the teacher's epochs plus those two.  Equal distillation:
none in the default grid.  LPAF's pruning distils from the teacher by default, so the grid runs it
with ``distill=0``.  The distilled grid (``--kd``: ``SVD_Ft_KD``, ``FWSVD_Ft_KD``, ``LPAF_KD``) gives
every compression step the same KL-to-the-teacher term (weight 1, temperature 2): SVD_Ft and
FWSVD_Ft fine-tune with ``finetune_distill=1``; LPAF prunes with its default distillation and
re-trains with ``finetune_distill=1``.  RankDyna has no teacher and no distilled row.
The first LPAF run of a (task, keep, seed) prunes and caches the pruned model
(``results/cache/pruned/<task>-k<keep>-s<seed>-full``); the ablations at keep 0.25 (``--ablations``:
w/o pruning, vanilla SVD instead of sparsity-aware, vanilla instead of mixed-rank fine-tuning) re-use
it, so they differ from LPAF only in the step they ablate (w/o pruning trains one epoch fewer: the
compression-steps column says so).  ``--kd --variants LPAF_KD_ft2`` is a diagnostic outside equal
compute, named so: LPAF_KD's cached pruned model re-trained (mixed-rank, distilled) for the
baselines' two epochs instead of one, to test whether the halved re-training budget is what LPAF loses.

Grid order: seed-major, then task, keep and variant, so a partial grid holds complete seeds.
Resumable: each cell writes ``benchmarks/results/runs_protocol/<id>.json`` and is skipped when it
exists; two processes share the grid (``--threads 1`` each): a run is claimed by an exclusive
``<id>.claim`` file first.  Tables report mean +- sample std over seeds; a comparison gives the
per-seed (paired) differences, the two-sided paired t-test's p over seeds and, for runs that kept
their dev predictions (from issue 30 on), a paired bootstrap p over dev examples (``paired.py``);
"significant" only for p < 0.05.  Writes ``results/protocol.{md,json,png}``
(``--ablations``: ``protocol_ablations.*``; ``--kd``: ``protocol_kd.*``; ``--quick``: ``protocol_quick.*``).
A run writes its own grid to ``<table>_latest.*`` and adds its cells of the methods ``<table>.md``
already shows to that table, which never shrinks; ``--table-only`` rewrites ``<table>.*`` with
exactly the grid it is given (to add a method's column, or to narrow the table on purpose).

    python benchmarks/protocol.py --threads 1 &      # twice, side by side
    python benchmarks/protocol.py --quick            # one small MRPC cell, minutes: checks the pipeline
    python benchmarks/protocol.py --table-only
    python benchmarks/protocol.py --ablations --threads 1 &    # LPAF's ablations at keep 0.25
    python benchmarks/protocol.py --kd --threads 1   # the distilled grid: SVD_Ft_KD, FWSVD_Ft_KD, LPAF_KD
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from premise import claim  # noqa: E402
from qa import _ms  # noqa: E402
from quality import compress_steps, parse_variant, teacher_steps, with_reused_pruning  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
RUNS = RESULTS / "runs_protocol"
GLUE = Path(os.environ.get("FACTORLM_DATA_DIR", ROOT.parents[1] / "shared" / "data" / "glue"))

COMMON = dict(batch_size=32, eval_batch_size=256, learning_rate=1e-4, epochs=1.0, warmup_ratio=0.06,
              teacher_learning_rate=1e-4, selection_size=0.1, mixed_precision="auto", group_by_length=True,
              latency=False, progress=False)
# full training sets (SST-2: a seeded 20,000-example subset per seed); floats as premise.py writes them,
# so the teacher cache keys match its MRPC and STS-B teachers
TASKS = {
    "mrpc": dict(max_length=128, teacher_epochs=4.0, data_dir=str(GLUE)),
    "stsb": dict(max_length=128, teacher_epochs=3.0, data_dir=str(GLUE)),
    "cola": dict(max_length=64, teacher_epochs=3.0, data_dir=str(GLUE)),
    "sst2": dict(max_length=64, teacher_epochs=3.0, max_train_samples=20000, data_dir=str(GLUE)),
    "rotten_tomatoes": dict(max_length=64, teacher_epochs=3.0),
}
QUICK = dict(max_train_samples=400, teacher_epochs=1.0)

# "{task}-k{keep}-s{seed}-full" names the pruned-model cache: the first LPAF run of a (task, keep, seed)
# prunes (1 epoch, no distillation) and saves it; the ablations re-use it.  "{rankdyna_epochs}" is the
# task's teacher epochs + 2 (RankDyna has no teacher: it gets the teacher's steps too).
LPAF = "lpaf:distill=0,pruned_model={task}-k{keep}-s{seed}-full"
VARIANTS = {
    "SVD_Ft": "svd:epochs=2",
    "FWSVD_Ft": "fwsvd:epochs=2",
    "LPAF": LPAF,
    "RankDyna": "rankdyna:epochs={rankdyna_epochs}",
    # opt-in: each triplet costs its in+out weights, so RankDyna stores <= keep like the uniform methods
    "RankDyna_weights": "rankdyna:epochs={rankdyna_epochs},budget_unit=weights",
    # diagnostics: SVD_Ft with the per-matrix ranks RankDyna learned for the same (task, keep, seed)
    # (``--ranks`` its run JSON; it stores what RankDyna stores, so more than keep under the triplet budget)
    "SVD_Ft_rd_ranks": "svd:epochs=2,ranks={rankdyna_ranks}",
    "SVD_Ft_KD_rd_ranks": "svd:epochs=2,finetune_distill=1,ranks={rankdyna_ranks}",
    # the same with RankDyna_weights' ranks: they store <= keep, as the uniform plan does
    "SVD_Ft_rdw_ranks": "svd:epochs=2,ranks={rankdyna_weights_ranks}",
    # one-shot non-uniform allocation from the teacher's (Fisher-weighted) spectra, within keep
    "SVD_Ft_global": "svd:epochs=2,rank_policy=global",
    "FWSVD_Ft_global": "fwsvd:epochs=2,rank_policy=global",
    "SVD_Ft_KD": "svd:epochs=2,finetune_distill=1",
    "FWSVD_Ft_KD": "fwsvd:epochs=2,finetune_distill=1",
    "LPAF_KD": "lpaf:finetune_distill=1,pruned_model={task}-k{keep}-s{seed}-full-kd",
    "LPAF_KD_plain_svd": "lpaf:finetune_distill=1,decomposition=svd,pruned_model={task}-k{keep}-s{seed}-full-kd",
    "LPAF_KD_vanilla_ft": "lpaf:finetune_distill=1,mixed_rank=false,pruned_model={task}-k{keep}-s{seed}-full-kd",
    # issue 30: Omega = sqrt(normalised score), and pruning to density 0.10 before factorizing at keep 0.25
    "LPAF_KD_omega_sqrt": "lpaf:finetune_distill=1,omega=scores_sqrt,pruned_model={task}-k{keep}-s{seed}-full-kd",
    "LPAF_KD_density0.1": "lpaf:finetune_distill=1,density=0.1",
    "LPAF_KD_no_ft": "lpaf:finetune=false,finetune_distill=1,pruned_model={task}-k{keep}-s{seed}-full-kd",
    # diagnostic, unequal compute: LPAF_KD's pruned model re-trained for the baselines' two epochs (three in all)
    "LPAF_KD_ft2": "lpaf:finetune_distill=1,epochs=2,prune_epochs=1,pruned_model={task}-k{keep}-s{seed}-full-kd",
    # issue 30: the baselines with LPAF_KD_ft2's three epochs after the teacher (budget split vs extra compute)
    "SVD_Ft_KD_3ep": "svd:epochs=3,finetune_distill=1",
    "FWSVD_Ft_KD_3ep": "fwsvd:epochs=3,finetune_distill=1",
    # issue 30: SVD-LLM whitening on the encoder's own activations (uniform ranks), distilled as the KD rows
    "Whiten_KD": "whiten:epochs=2,finetune_distill=1",  # SVD-LLM's per-matrix ratio ranks (its default from issue 30 on)
    # the same with one shared rank for all matrices (SVD_Ft's plan; what whiten did before its ratio default)
    "Whiten_KD_shared": "whiten:epochs=2,finetune_distill=1,ratio_ranks=false",
    # issue 30: factorlm's recipe (two-sided K-FAC whitening + one global plan by estimated loss per stored
    # weight, within keep + distillation weight 1, its default)
    "KFAC_global": "kfac-global:epochs=2",
    "KFAC_global_triplet": "kfac-global:epochs=2,rank_price=triplet",  # rank_price: a RunConfig field
    "Whiten_KD_global": "whiten:epochs=2,finetune_distill=1,rank_policy=global",
    # issue 30, the factorization study's claims: staged factorization (one stage per layer, 1 epoch over
    # the stages + the final 1-epoch fine-tune = SVD_Ft_KD's 2 epochs) and Monarch (4 blocks) at equal steps
    "SVD_Ft_KD_staged": "svd:epochs=1,schedule=staged,finetune_distill=1",
    "Monarch_Ft_KD": "svd:epochs=2,structure=monarch,finetune_distill=1",
    "LPAF_no_prune": "lpaf:distill=0,prune=false",
    "LPAF_plain_svd": f"{LPAF},decomposition=svd",
    "LPAF_vanilla_ft": f"{LPAF},mixed_rank=false",
}
DEFAULT = ["SVD_Ft", "FWSVD_Ft", "LPAF", "RankDyna"]
KD = ["SVD_Ft_KD", "FWSVD_Ft_KD", "LPAF_KD"]
KD_ABLATIONS = ["LPAF_KD_plain_svd", "LPAF_KD_vanilla_ft", "LPAF_KD_no_ft", "LPAF_KD_omega_sqrt", "LPAF_KD_density0.1"]  # at keep 0.25, re-using LPAF_KD's pruning
# the recipe's comparisons: every seed method at equal steps and distillation, then its ablations
RECIPE_COMPARED = ["SVD_Ft_KD", "FWSVD_Ft_KD", "LPAF_KD", "RankDyna", "RankDyna_weights", "Whiten_KD", "Whiten_KD_shared",
                   "Whiten_KD_global", "KFAC_global_triplet"]
ABLATIONS = ["LPAF_no_prune", "LPAF_plain_svd", "LPAF_vanilla_ft"]
ABLATION_GRID = ["SVD_Ft", "FWSVD_Ft", "LPAF", *ABLATIONS]  # SVD_Ft, FWSVD_Ft, LPAF: the main grid's runs
COMPARED = ["SVD_Ft", "FWSVD_Ft", *ABLATIONS]  # LPAF is compared with each of these present in a table
LABELS = {
    "SVD_Ft": "SVD_Ft (2 epochs)", "FWSVD_Ft": "FWSVD_Ft (2 epochs)",
    "LPAF": "LPAF (prune 1 epoch without distillation + mixed-rank 1 epoch)",
    "RankDyna": "RankDyna (from the pre-trained model; teacher's epochs + 2)",
    "RankDyna_weights": "RankDyna, budget in weights (stores <= keep; opt-in, not the paper's)",
    "SVD_Ft_rd_ranks": "SVD_Ft with RankDyna's learned ranks (diagnostic)",
    "SVD_Ft_KD_rd_ranks": "SVD_Ft + KD with RankDyna's learned ranks (diagnostic)",
    "SVD_Ft_rdw_ranks": "SVD_Ft with RankDyna_weights' learned ranks (diagnostic; stores <= keep)",
    "SVD_Ft_global": "SVD_Ft, --rank-policy global (ranks from the teacher's spectra)",
    "FWSVD_Ft_global": "FWSVD_Ft, --rank-policy global (ranks from Fisher-weighted spectra)",
    "SVD_Ft_KD": "SVD_Ft + KD (2 epochs)", "FWSVD_Ft_KD": "FWSVD_Ft + KD (2 epochs)",
    "LPAF_KD": "LPAF + KD (distilled pruning, its default, + distilled mixed-rank)",
    "LPAF_KD_vanilla_ft": "LPAF + KD, vanilla fine-tuning instead of mixed-rank (ablation)",
    "LPAF_KD_no_ft": "LPAF + KD w/o step 3 (the factorized pruned model; ablation)",
    "LPAF_KD_plain_svd": "LPAF + KD, vanilla SVD instead of sparsity-aware (ablation)",
    "LPAF_KD_omega_sqrt": "LPAF + KD, Omega = sqrt(normalised score) (not the paper's)",
    "LPAF_KD_density0.1": "LPAF + KD, pruned to density 0.10, factorized at keep (the paper pairs densities with ranks)",
    "LPAF_KD_ft2": "LPAF + KD, mixed-rank for 2 epochs (diagnostic: one epoch more than the equal budget)",
    "SVD_Ft_KD_3ep": "SVD_Ft + KD (3 epochs, LPAF_KD_ft2's budget; Intel Xeon, its own re-trained teacher: not paired with the rows above)",
    "FWSVD_Ft_KD_3ep": "FWSVD_Ft + KD (3 epochs, LPAF_KD_ft2's budget; Intel Xeon, its own re-trained teacher: not paired with the rows above)",
    "Whiten_KD": "Whiten + KD (SVD-LLM whitening on the task's activations, uniform ranks; 2 epochs)",
    "Whiten_KD_shared": "Whiten + KD, one shared rank for all matrices (SVD_Ft's plan, not SVD-LLM's ratio)",
    "KFAC_global": "kfac-global (factorlm recipe: K-FAC whitening, global loss-aware ranks within keep, KD; 2 epochs)",
    "KFAC_global_triplet": "kfac-global, ranks priced per triplet (ablation)",
    "Whiten_KD_global": "Whiten + KD, --rank-policy global (whitened spectra, energy-normalised; ablation)",
    "SVD_Ft_KD_staged": "SVD_Ft + KD, staged (a stage per layer over 1 epoch, then 1 epoch; KD in every fine-tune)",
    "Monarch_Ft_KD": "Monarch (P L P^T R, 4 blocks) + fine-tuning + KD (2 epochs)",
    "LPAF_no_prune": "LPAF w/o pruning (step 1; 1 epoch)",
    "LPAF_plain_svd": "LPAF, vanilla SVD instead of sparsity-aware",
    "LPAF_vanilla_ft": "LPAF, vanilla fine-tuning instead of mixed-rank",
}


class Deferred(Exception):
    """A run that needs another run's output first: an ablation whose LPAF pruned model is not cached
    yet (another process may be pruning it), or a ``*_rd_ranks`` diagnostic before RankDyna's run."""


def resolve(name: str, task: str, quick: bool) -> str:
    """The variant string of ``name`` (a key of VARIANTS or a raw variant) for ``task``."""
    epochs = {**TASKS[task], **(QUICK if quick else {})}["teacher_epochs"] + 2
    return VARIANTS.get(name, name).replace("{rankdyna_epochs}", f"{epochs:g}")


def prefix(args) -> str:
    """Run ids and pruned-model caches of a smoke (--quick / --max-steps) never mix with real ones; a
    ``--tag`` (a teacher generation: teachers re-trained on another machine differ) keeps its own grid."""
    return ((f"{args.tag}__" if getattr(args, "tag", None) else "") + ("quick__" if args.quick else "")
            + (f"ms{args.max_steps}__" if args.max_steps else ""))


def run_id(task: str, name: str, keep: float, seed: int, args) -> str:
    v = resolve(name, task, args.quick)
    safe = v.replace(":", "_").replace(",", "_").replace("=", "-").replace("{", "").replace("}", "")
    return f"{prefix(args)}{task}__{safe}__k{keep:g}__s{seed}"


def machine(threads: int | None, precision: str) -> str:
    """The device, its thread count and the training precision, e.g. ``AMD EPYC, 1 thread(s), fp32``."""
    import platform

    import torch

    from factorlm.config import resolve_mixed_precision

    prec = "bf16" if resolve_mixed_precision(precision) == "bf16" else "fp32"  # "auto" as the run resolved it
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {prec}"
    cpu = platform.processor() or "CPU"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {threads or torch.get_num_threads()} thread(s), {prec}"


def run_one(task: str, name: str, keep: float, seed: int, args, may_prune: bool = False) -> dict:
    from factorlm import RunConfig, compress
    from factorlm.train.evaluate import main_score

    variant = resolve(name, task, args.quick)
    method, cfg_over, opts = parse_variant(variant)
    for k in ("pruned_model", "save_pruned"):
        if isinstance(opts.get(k), str):
            tag = prefix(args).replace("__", "-") + opts[k].format(task=task, keep=f"{keep:g}", seed=seed)
            opts[k] = str(RESULTS / "cache" / "pruned" / tag)
    if "pruned_model" in opts and not Path(opts["pruned_model"]).is_dir():
        if set(opts) - {"pruned_model", "distill", "finetune_distill"} and not may_prune:  # an ablation: wait for LPAF's pruning
            raise Deferred(f"LPAF's pruned model {opts['pruned_model']} is not cached yet")
        opts["save_pruned"] = opts.pop("pruned_model")  # the first run of (task, keep, seed) prunes and caches
    source = {"{rankdyna_ranks}": "RankDyna", "{rankdyna_weights_ranks}": "RankDyna_weights"}.get(cfg_over.get("ranks"))
    if source:  # the allocation of that RankDyna variant's run of this cell
        rd = RUNS / f"{run_id(task, source, keep, seed, args)}.json"
        if not rd.is_file():
            raise Deferred(f"RankDyna's run {rd.name} is not finished (run --variants RankDyna first)")
        if "ranks" not in json.loads(rd.read_text()):
            raise RuntimeError(f"RankDyna's run {rd.name} predates the recorded ranks: move it aside and re-run it")
        cfg_over["ranks"] = str(rd)
    settings = {**COMMON, **TASKS[task], **(QUICK if args.quick else {}), **cfg_over}
    if args.max_steps:
        settings["max_steps"] = args.max_steps
    if args.mixed_precision:
        settings["mixed_precision"] = args.mixed_precision
    config = RunConfig(task=task, method=method, keep=keep, seed=seed, method_options=opts,
                       cache_dir=str(RESULTS / "cache"), **settings)
    t0 = time.time()
    report = compress(config, save=False, quiet=not args.verbose)
    dense = report.scores.get("dense", {})
    return {
        "task": task, "name": name, "variant": variant, "method": method, "keep": keep, "seed": seed,
        "quick": args.quick, "max_steps": args.max_steps, "main_metric": report.main_metric, "score": report.final,
        "dense": dense, "dense_score": main_score(dense, report.main_metric) if dense and method != "rankdyna" else None,
        "phases": with_reused_pruning(report.scores, opts.get("pruned_model")), "accounting": report.accounting,
        "train_steps": report.total_train_steps, "wall_s": round(time.time() - t0, 1), "warnings": report.warnings,
        "health": report.health, "baseline": report.baseline, "teacher": report.teacher, "config": config.to_dict(),
        "machine": machine(args.threads, config.mixed_precision),
        # the final model's dev predictions per example: paired bootstraps over the dev set
        "dev_predictions": getattr(report, "predictions", None),
        # RankDyna's allocation (matrix -> kept rank; the matrices stored dense past break-even)
        **({"ranks": report.info["ranks"], "dense_modules": report.info.get("dense", [])}
           if "ranks" in report.info else {}),
    }


def _sizes(task: str, config: dict) -> str:
    """Training set used, selection slice and dev set (of the run whose config this is)."""
    from factorlm.data import load_task_data, resolve_task

    t = resolve_task(task)
    kw = dict(data_dir=config.get("data_dir"), max_eval_samples=config.get("max_eval_samples"),
              seed=config["seed"], selection_size=config["selection_size"])
    d = load_task_data(t, max_train_samples=config.get("max_train_samples"), **kw)
    dev = ", ".join(f"{s} {len(ex):,}" for s, ex in d.evals.items())
    if config.get("max_train_samples") is None:
        train = f"full training set {len(d.train) + len(d.select):,}: train {len(d.train):,}"
    else:
        full = load_task_data(t, max_train_samples=None, **kw)
        n = len(full.train) + len(full.select)
        train = (f"train {len(d.train):,} (a seeded {len(d.train):,}-example subset per seed of the "
                 f"{n - len(d.select):,} left of the {n:,} after the slice)")
    return f"{train}, selection slice {len(d.select):,} (drawn with the seed), {dev}"


def _teachers(rs: list[dict]) -> dict[int, float]:
    """seed -> the dense teacher's score (x100), from the runs that start from a teacher."""
    return {r["seed"]: 100 * r["dense_score"] for r in rs if r.get("dense_score") is not None}


def _compare(a: list[dict], b: list[dict]) -> str:
    """Difference of means (x100) of runs ``a`` minus runs ``b`` over the seeds both have, with the
    per-seed (paired) differences, a paired t-test over seeds and, where the runs kept their dev
    predictions, a paired bootstrap over the dev examples; "significant" only for p < 0.05
    (:mod:`paired`).  The seeds pair the runs (same teacher, data split and, for LPAF's ablations,
    pruned model)."""
    from paired import fmt_p, paired_bootstrap, paired_t, verdict

    sa, sb = {r["seed"]: r for r in a}, {r["seed"]: r for r in b}
    common = sorted(sa.keys() & sb.keys())
    if not common:
        return "no common seed"
    xa, xb = [100 * sa[s]["score"] for s in common], [100 * sb[s]["score"] for s in common]
    diff = statistics.mean(xa) - statistics.mean(xb)
    if len(common) < 2:  # the dev bootstrap still measures the dev sample's noise, not the seeds'
        boot = paired_bootstrap(a[0]["task"], a[0]["main_metric"], [sa[s] for s in common], [sb[s] for s in common])
        if boot is None:
            return f"{diff:+.1f} (one seed: untested)"
        return (f"{diff:+.1f} (one seed: untested over seeds; dev bootstrap p = {fmt_p(boot)}, which covers the dev "
                f"sample's noise only)")
    d = [x - y for x, y in zip(xa, xb)]
    ta, tb = [sa[s].get("dense_score") for s in common], [sb[s].get("dense_score") for s in common]
    if all(t is not None for t in ta + tb) and ta != tb:  # teachers re-trained elsewhere: the seeds do not pair
        from scipy import stats

        p = float(stats.ttest_ind(xa, xb, equal_var=False).pvalue)
        return (f"{diff:+.1f} ({verdict(p)}, NOT paired: different teachers (re-trained on another machine); "
                f"Welch t p = {fmt_p(p)}; {len(common)} seeds)")
    _, p = paired_t(xa, xb)
    boot = paired_bootstrap(a[0]["task"], a[0]["main_metric"], [sa[s] for s in common], [sb[s] for s in common])
    tests = f"paired t p = {fmt_p(p)}" + (f", dev bootstrap p = {fmt_p(boot)}" if boot is not None else "")
    return (f"{diff:+.1f} ({verdict(p)} over seeds: {tests}; {len(common)} seeds, per seed "
            f"{' / '.join(f'{x:+.1f}' for x in d)})")


def _flagged(r: dict, phase: str = "final") -> bool:
    """The run's final model (``phase="dense"``: its teacher) collapsed to one class, diverged or
    scored no better than the majority class."""
    h = r.get("health") or {}
    below = h.get("below_baseline" if phase == "final" else "teacher_below_baseline")
    return bool(phase in (h.get("collapsed") or []) or phase in (h.get("diverged") or []) or below)


def table(runs: list[dict], order: list[str]) -> str:
    out = []
    for task in dict.fromkeys(r["task"] for r in runs):
        rs = [r for r in runs if r["task"] == task]
        keeps = sorted({r["keep"] for r in rs}, reverse=True)
        seeds = sorted({r["seed"] for r in rs})
        metric = rs[0]["main_metric"]
        cfg = next((r["config"] for r in rs if r["method"] != "rankdyna"), rs[0]["config"])
        try:
            sizes = _sizes(task, cfg)
        except Exception as e:  # noqa: BLE001 - the table still stands without the data
            sizes = f"training set size not read ({type(e).__name__}); max_train_samples={cfg.get('max_train_samples')}"
        t_steps = sorted({teacher_steps(r) for r in rs if r["method"] != "rankdyna" and teacher_steps(r)})
        e = cfg["teacher_epochs"]
        recipe = (f"{e:g} epoch{'' if e == 1 else 's'} at lr {cfg['teacher_learning_rate']:g}, batch {cfg['batch_size']}, "
                  f"max length {cfg['max_length']}, precision as in Machine"
                  + (", length grouping" if cfg.get("group_by_length") else "") + ", keep-best on the slice")
        by_machine: dict[str, set] = {}
        for r in rs:
            by_machine.setdefault(r.get("machine", "?"), set()).add(r["seed"])
        machines = "; ".join(f"{m} (seed{'s' if len(v) > 1 else ''} {', '.join(map(str, sorted(v)))})"
                             for m, v in sorted(by_machine.items()))
        out.append(f"### {task}: {metric} x100 on dev, mean ± std over seeds {', '.join(map(str, seeds))}\n")
        out.append(f"Data: {sizes}. Teacher: {recipe}; {'/'.join(map(str, t_steps)) or '?'} teacher steps. "
                   f"Machine: {machines}.\n")
        n_seeds = len(seeds)
        second = "accuracy" if metric == "f1" else None
        lines = ["| method | " + " | ".join(f"keep {k:g}" for k in keeps)
                 + " | compression steps | total steps (teacher + compression) | wall s (mean of a run) |",
                 "|---|" + "---|" * (len(keeps) + 3)]
        teachers = _teachers(rs)
        flagged = any(_flagged(r, "dense") for r in rs if r.get("dense_score") is not None)
        if teachers:
            d = [teachers[s] for s in sorted(teachers)]
            n = f" [{len(d)} seed{'s' if len(d) > 1 else ''}]" if len(d) != n_seeds else ""
            n += " †" if flagged else ""
            if second:
                accs = {r["seed"]: 100 * r["dense"][second] for r in rs if r.get("dense_score") is not None}
                n = f" (acc {_ms([accs[s] for s in sorted(accs)])})" + n
            lines.append("| dense teacher | " + " | ".join(_ms(d) + n for _ in keeps)
                         + f" | {'/'.join(map(str, t_steps))} (teacher) | | |")
        base = next((r["baseline"] for r in rs if r.get("baseline")), {})
        if base.get(metric) is not None:
            acc = f" (acc {100 * base[second]:.1f})" if second and base.get(second) is not None else ""
            lines.append("| majority class | " + " | ".join(f"{100 * base[metric]:.1f}{acc}" for _ in keeps) + " | 0 | | |")
        else:
            none = "— (regression: a constant has no correlation)" if task == "stsb" else "—"
            lines.append("| majority class | " + " | ".join(none for _ in keeps) + " | 0 | | |")
        names = sorted(dict.fromkeys(r["name"] for r in rs), key=lambda v: order.index(v) if v in order else len(order))
        for v in names:
            cells, steps, total, walls = [], set(), set(), []
            for k in keeps:
                c = [r for r in rs if r["name"] == v and r["keep"] == k]
                cell = _ms([100 * r["score"] for r in c])
                if second and c:  # F1 saturates at the majority class's; accuracy tells collapsed runs apart
                    cell += f" (acc {_ms([100 * r['phases']['final'][second] for r in c])})"
                if c and len(c) != n_seeds:
                    cell += f" [{len(c)} seed{'s' if len(c) > 1 else ''}]"
                if any(_flagged(r) for r in c):
                    cell += " †"
                    flagged = True
                cells.append(cell)
                steps |= {compress_steps(r) for r in c}
                total |= {teacher_steps(r) + compress_steps(r) for r in c}
                walls += [r["wall_s"] for r in c]
            wall = f"{statistics.mean(walls):.0f}" if walls else ""
            lines.append(f"| {LABELS.get(v, v)} | " + " | ".join(cells) + f" | {'/'.join(map(str, sorted(steps)))} | "
                         f"{'/'.join(map(str, sorted(total)))} | {wall} |")
        sparse = []  # LPAF's step-1 model as a row of its own, its storage counted honestly
        for lead in ("LPAF_KD", "LPAF"):
            cells = []
            for k in keeps:
                ps = [r for r in rs if r["name"] == lead and r["keep"] == k
                      and (r.get("phases") or {}).get("pruned", {}).get(metric) is not None]
                cell = _ms([100 * r["phases"]["pruned"][metric] for r in ps]) if ps else ""
                if ps and second:
                    cell += f" (acc {_ms([100 * r['phases']['pruned'][second] for r in ps])})"
                cells.append(cell + (f" [stores {k + 1 / 16:.3f}]" if ps else ""))
            if any(cells):
                sparse.append(f"| pruned (sparse) model of {lead}'s step 1: bf16 values + a 1-bit mask, so it stores "
                              f"density + 1/16 of the dense bf16 bytes | " + " | ".join(cells) + " | | | |")
        out += lines + sparse
        if flagged:
            out.append("\n† at least one model of the cell (the teacher's row: one seed's teacher) collapsed to one "
                       "class, diverged or scored no better than the majority class (see the warnings in the JSON).")
        out.append("\nWall time includes the teacher's training in the first run of a (task, seed) and the pruning in "
                   "the first LPAF run of a (task, keep, seed); later runs load them from the cache.\n")
        for lead, compared in (("LPAF", COMPARED), ("LPAF_KD", [*KD[:-1], *KD_ABLATIONS]),
                               ("LPAF_KD_ft2", [*KD, "SVD_Ft_KD_3ep", "FWSVD_Ft_KD_3ep"]), ("KFAC_global", RECIPE_COMPARED),
                               # the factorization study's claims: staged beats uniform; low rank beats Monarch
                               ("SVD_Ft_KD_staged", ["SVD_Ft_KD"]), ("SVD_Ft_KD", ["Monarch_Ft_KD"])):
            lpaf = [r for r in rs if r["name"] == lead]
            others = [v for v in compared if any(r["name"] == v for r in rs)]
            for k in keeps:
                mine = [r for r in lpaf if r["keep"] == k]
                if not mine:
                    continue
                m = statistics.mean(100 * r["score"] for r in mine)
                parts = [f"{lead} {m:.1f}"]
                if teachers:
                    dm = statistics.mean(teachers.values())
                    parts[0] += f" = {100 * m / dm:.1f}% of the dense teacher's mean ({dm:.1f})"
                parts += [f"minus {v}: {_compare(mine, [r for r in rs if r['name'] == v and r['keep'] == k])}"
                          for v in others]
                out.append(f"- keep {k:g}: " + "; ".join(parts))
        out += _starts(rs, keeps, names, metric)
        out.append("")
    return "\n".join(out)


def _starts(rs: list[dict], keeps: list[float], names: list[str], metric: str) -> list[str]:
    """Where each method's re-training starts: the score right after factorization (and LPAF's
    pruned model before it), mean +- std over seeds; methods that record no such phase (RankDyna) and
    ablations that share LPAF's starting point are left out."""
    rows = []
    for v in names:
        for phase, what in (("pruned", "pruned model (step 1)"), ("factorized", "right after factorization")):
            if phase == "pruned" and v not in ("LPAF", "LPAF_KD"):
                continue  # the ablations re-use LPAF's pruned model
            if phase == "factorized" and v.endswith(("_vanilla_ft", "_no_ft", "_ft2")):
                continue  # they start from LPAF's factorized model
            cells = []
            for k in keeps:
                ps = [r["phases"][phase] for r in rs if r["name"] == v and r["keep"] == k
                      and (r.get("phases") or {}).get(phase, {}).get(metric) is not None]
                cell = _ms([100 * p[metric] for p in ps]) if ps else ""
                if ps and metric == "f1" and all("accuracy" in p for p in ps):  # F1 saturates at the majority's
                    cell += f" (acc {_ms([100 * p['accuracy'] for p in ps])})"
                cells.append(cell)
            if any(cells):
                rows.append(f"| {LABELS.get(v, v)}: {what} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", f"Before re-training ({metric} x100, mean ± std over the same seeds): where each method's last "
            "training phase starts.", "", "| model | " + " | ".join(f"keep {k:g}" for k in keeps) + " |",
            "|---|" + "---|" * len(keeps), *rows]


def plot(runs: list[dict], path: Path, order: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in runs))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks) + 3, 4.6), squeeze=False)
    present = sorted({r["name"] for r in runs}, key=lambda v: order.index(v) if v in order else len(order))
    colors = {v: f"C{j % 10}" for j, v in enumerate(present)}  # one colour per method across every panel
    legend = {}
    for ax, task in zip(axes[0], tasks):
        rs = [r for r in runs if r["task"] == task]
        for v in (v for v in present if any(r["name"] == v for r in rs)):
            keeps = sorted({r["keep"] for r in rs if r["name"] == v})
            ys = [[100 * r["score"] for r in rs if r["name"] == v and r["keep"] == k] for k in keeps]
            ax.errorbar(keeps, [statistics.mean(y) for y in ys], yerr=[statistics.stdev(y) if len(y) > 1 else 0 for y in ys],
                        marker="o", capsize=3, color=colors[v], label=LABELS.get(v, v))
        teachers = _teachers(rs)
        if teachers:
            dm = statistics.mean(teachers.values())
            ax.axhline(dm, color="k", ls="--", lw=1, label="dense teacher")
            ax.annotate(f"dense {dm:.1f}", (1.0, dm), xycoords=("axes fraction", "data"), ha="right", va="bottom", fontsize=7)
        base = next((r["baseline"] for r in rs if r.get("baseline")), {}).get(rs[0]["main_metric"])
        if base is not None:
            ax.axhline(100 * base, color="grey", ls=":", lw=1, label="majority class")
        ax.set_title(task)
        ax.set_xlabel("fraction of encoder weights kept")
        ax.set_ylabel(f"{rs[0]['main_metric']} x100 (mean ± std over seeds)")
        ax.set_xticks(sorted({r["keep"] for r in rs}))
        ax.invert_xaxis()
        for h, label in zip(*ax.get_legend_handles_labels()):  # a method run on one task only still gets its entry
            legend.setdefault(label, h)
    axes[0][-1].legend(list(legend.values()), list(legend), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    kd = any(v in KD for v in order)
    fig.suptitle(f"MiniLM-L6, equal compute, {'equal distillation from the teacher' if kd else 'no distillation'}"
                 " (protocol of issue 11)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["mrpc", "stsb", "rotten_tomatoes", "sst2"], choices=list(TASKS))
    p.add_argument("--variants", nargs="+", default=DEFAULT,
                   help=f"names ({', '.join(VARIANTS)}) or raw variants such as 'svd:epochs=3'")
    p.add_argument("--keeps", nargs="+", type=float, default=[0.25, 0.16])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--ablations", action="store_true", help="LPAF's ablations at keep 0.25 (beside SVD_Ft, FWSVD_Ft, LPAF)")
    p.add_argument("--kd", action="store_true", help="the distilled grid: SVD_Ft_KD, FWSVD_Ft_KD, LPAF_KD (protocol_kd.*)")
    p.add_argument("--quick", action="store_true", help="MRPC, 400 training examples, seed 0, keep 0.25, SVD_Ft and LPAF (--kd: their KD rows)")
    p.add_argument("--max-steps", type=int, help="cap every phase (smoke test of the benchmark itself)")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--mixed-precision", choices=["auto", "no", "bf16"], default=None,
                   help="override the protocol's 'auto' (e.g. 'no' to finish a seed begun on a CPU without native bf16 "
                        "with the same precision; each row records the precision it ran in)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (two benchmarks side by side with 1)")
    p.add_argument("--tag", default=None, help="a grid of its own (run ids, caches and tables carry the tag): e.g. one "
                   "teacher generation, since teachers re-trained on another machine differ and would not pair")
    p.add_argument("--rerender", nargs="+", metavar="STEM", help="re-write results/<STEM>.{md,png} from the runs "
                   "<STEM>.json lists (after a change of the table code; runs nothing)")
    p.add_argument("--name", default=None, help="the table's file stem (default: protocol, protocol_kd, ...)")
    args = p.parse_args()
    if args.rerender:
        for stem in args.rerender:
            runs = json.loads((RESULTS / f"{stem}.json").read_text())
            cells = [(r["task"], r["name"], r["keep"], r["seed"]) for r in runs]
            rank = {v: i for i, v in enumerate(VARIANTS)}
            order = sorted(dict.fromkeys(c[1] for c in cells), key=lambda v: rank.get(v, len(rank)))
            _write_runs(stem, runs, order)
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    name = "protocol"
    if args.ablations:
        args.variants, args.keeps, name = ABLATION_GRID, [0.25], "protocol_ablations"
    elif args.kd:  # the distilled grid (or the given distilled variants, e.g. with LPAF_KD_vanilla_ft)
        args.variants, name = KD if args.variants == DEFAULT else args.variants, "protocol_kd"
    if args.quick:
        args.tasks, args.seeds, args.keeps = ["mrpc"], [0], [0.25]
        if not args.ablations:
            args.variants = ["SVD_Ft_KD", "LPAF_KD"] if args.kd else ["SVD_Ft", "LPAF"]
        name += "_quick"
    if args.max_steps:  # a smoke test's run ids carry ms<N>__: its tables never touch the real ones
        name += f"_smoke_ms{args.max_steps}"
    if args.tag:
        name += f"_{args.tag}"
    if args.name:
        name = args.name
    if not args.table_only and any("data_dir" in TASKS[t] for t in args.tasks) and not GLUE.is_dir():
        sys.exit(f"GLUE data not found under {GLUE} (set FACTORLM_DATA_DIR)")
    RUNS.mkdir(parents=True, exist_ok=True)
    grid = [(t, v, k, s) for s in args.seeds for t in args.tasks for k in args.keeps for v in args.variants]
    if not args.table_only:
        todo, deferred = grid, []
        for may_prune in (False, True):  # deferred ablations come back after the rest of the grid
            for t, v, k, s in todo:
                f = RUNS / f"{run_id(t, v, k, s, args)}.json"
                if f.exists() or not claim(f):
                    continue
                print(f"[{time.strftime('%H:%M:%S')}] {t} {v} keep={k} seed={s}", flush=True)
                try:
                    res = run_one(t, v, k, s, args, may_prune=may_prune)
                except Deferred as e:
                    print(f"   deferred: {e}", flush=True)
                    f.with_suffix(".claim").unlink(missing_ok=True)
                    deferred.append((t, v, k, s))
                    continue
                except BaseException as e:  # keep going, report at the end (Ctrl-C: release the claim, stop)
                    f.with_suffix(".claim").unlink(missing_ok=True)
                    if not isinstance(e, Exception):
                        raise
                    print(f"   FAILED: {type(e).__name__}: {e}", flush=True)
                    continue
                f.write_text(json.dumps(res, indent=1, default=str))
                f.with_suffix(".claim").unlink(missing_ok=True)
                dense = f" (dense {100 * res['dense_score']:.1f})" if res["dense_score"] is not None else ""
                print(f"   {res['main_metric']} {100 * res['score']:.1f}{dense} steps={res['train_steps']} "
                      f"{res['wall_s']}s", flush=True)
            todo, deferred = deferred, []
    order = list(args.variants)
    if args.table_only:  # an explicit rebuild: the table holds exactly the grid asked for
        write_table(name, grid, order, args)
        return
    # a run writes its own grid to <name>_latest.*, and grows <name>.* by its cells of the methods
    # that table already shows, so filling a few cells never shrinks the table a report cites
    write_table(f"{name}_latest", grid, order, args)
    with open(RESULTS / f".{name}.lock", "w") as lock:  # two processes sharing a grid grow it one at a time
        fcntl.flock(lock, fcntl.LOCK_EX)
        grown, order = grown_scope(RESULTS / f"{name}.json", grid, order)
        write_table(name, grown, order, args, echo=False)
    print(f"tables: results/{name}_latest.md (this run's grid), results/{name}.md (grown)")


def grown_scope(table_json: Path, grid: list[tuple], order: list[str]) -> tuple[list[tuple], list[str]]:
    """The cells (task, variant, keep, seed) of ``table_json`` (a table written before) plus those of
    ``grid`` whose variant that table already shows, and the variants in VARIANTS' order (raw variants
    last).  No table yet: ``grid`` and ``order`` themselves."""
    if not table_json.exists():
        return grid, order
    old = [(r["task"], r["name"], r["keep"], r["seed"]) for r in json.loads(table_json.read_text())]
    rank = {v: i for i, v in enumerate(VARIANTS)}
    shown = sorted(dict.fromkeys(v for _, v, _, _ in old), key=lambda v: rank.get(v, len(rank)))
    return list(dict.fromkeys(old + [g for g in grid if g[1] in shown])), shown


def write_table(stem: str, cells: list[tuple], order: list[str], args, echo: bool = True) -> None:
    """``results/<stem>.{md,json,png}`` from the finished runs among ``cells``."""
    wanted = {run_id(*c, args) for c in cells}
    runs = [json.loads(f.read_text()) for f in sorted(RUNS.glob("*.json")) if f.stem in wanted]
    tasks = list(dict.fromkeys(c[0] for c in cells))  # the grid's task order (a grown table: its old order first)
    runs.sort(key=lambda r: (tasks.index(r["task"]), -r["keep"], r["seed"]))
    if not runs:
        sys.exit("no finished runs")
    _write_runs(stem, runs, order, echo)


def _write_runs(stem: str, runs: list[dict], order: list[str], echo: bool = False) -> None:
    md = table(runs, order)
    if echo:
        print(md)
    (RESULTS / f"{stem}.md").write_text(md + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(runs, indent=1, default=str))
    plot(runs, RESULTS / f"{stem}.png", order)


if __name__ == "__main__":
    main()
