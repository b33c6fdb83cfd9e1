"""Issue 11, part 4: which Omega makes LPAF's step 2 (sparsity-aware SVD) usable?

The faithful "w/ S" objective ``min ||Omega * (W - A B)||_F`` with Omega = the raw PLATON scores
turned out unbounded on MiniLM (BENCHMARKS.md, "Found, not yet fixed"): the scores span ~13 orders
of magnitude within a matrix, so entries with near-zero weight leave ``A B`` free there and the
exact minimiser (alternating least squares) puts huge values in them.  This script takes one cached
pruned model of ``protocol.py`` (its ``LPAF_KD`` pruning: PLATON, distilled, density = keep) and
factorizes it at keep's rank with each candidate step 2, then reports

* per matrix, averaged over the 36 targets: ``||W - A B|| / ||W||`` against the pruned ``W`` (what
  step 2 approximates) and against the dense teacher's matrix; ``J / J_svd``, the literal "w/ S"
  objective (raw-score weights) relative to the plain truncated SVD's (< 1: the candidate fits the
  paper's objective better than plain SVD); ``max |A B| / max |W|``; seconds;
* per model (no fine-tuning): the score on the held-out selection slice of the training set (what a
  choice may look at) and on the dev set (reported, never used to choose).

    python benchmarks/omega.py --pruned benchmarks/results/cache/pruned/mrpc-k0.25-s0-full-kd \
        --teacher benchmarks/results/cache/teachers/mrpc-03a0399ef5ab --task mrpc --keep 0.25

Writes ``results/omega_<tag>.{json,md}`` (tag = the pruned model's folder name).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
sys.path.insert(0, str(ROOT))

from protocol import COMMON, TASKS, machine  # noqa: E402

#: name -> (description, factory(W, rank, mask, scores) -> (A, B))
CANDIDATES = [
    "svd", "scores_als", "scores_em", "scores_als_ridge1e-3", "scores_als_ridge1e-1",
    "scores_floor1e-3", "scores_floor1e-2", "scores_quantile", "mask", "row",
]
DESCRIPTIONS = {
    "svd": "plain truncated SVD (LPAF's 'w/o sparsity-aware' ablation)",
    "scores_als": "w/ S, raw normalised scores, exact minimiser (ALS; LPAF's default until 2026-12-02)",
    "scores_em": "w/ S, raw normalised scores, Srebro-Jaakkola EM (1000 subspace steps from the SVD; the default since)",
    "scores_als_ridge1e-3": "w/ S, ALS with a Tikhonov term 1e-3 * tr(Gram)/k per row",
    "scores_als_ridge1e-1": "w/ S, ALS with a Tikhonov term 1e-1 * tr(Gram)/k per row",
    "scores_floor1e-3": "w/ S, Omega = max(s / max s, 1e-3), ALS",
    "scores_floor1e-2": "w/ S, Omega = max(s / max s, 1e-2), ALS",
    "scores_quantile": "kept entries: their score's quantile among kept; pruned: 1e-3; ALS",
    "mask": "w/ M, binary keep-mask, EM (matrix completion)",
    "row": "Omega collapsed to one weight per input column, closed form",
}


def fit(name: str, W, rank: int, mask, scores):
    from factorlm.decompose import weighted_svd as ws
    from factorlm.decompose.svd import truncated_svd

    if name == "svd":
        return truncated_svd(W, rank)
    if name == "scores_als":
        return ws.sparsity_aware_svd(W, rank, mask=mask, scores=scores, decomposition="em", omega="scores", solver="als")
    if name == "scores_em":
        A, B, _ = ws.weighted_low_rank(W, ws.normalized_scores(scores), rank, solver="em_subspace")
        return A, B
    if name.startswith("scores_als_ridge"):
        A, B, _ = ws.weighted_svd_als(W, ws.normalized_scores(scores), rank, ridge=float(name.split("ridge")[1]))
        return A, B
    if name.startswith("scores_floor"):
        om = ws.normalized_scores(scores).clamp_min(float(name.split("floor")[1]))
        A, B, _ = ws.weighted_svd_als(W, om, rank)
        return A, B
    if name == "scores_quantile":
        return ws.sparsity_aware_svd(W, rank, mask=mask, scores=scores, decomposition="em", omega="scores_quantile",
                                     solver="als")
    if name == "mask":
        return ws.sparsity_aware_svd(W, rank, mask=mask, decomposition="em", omega="mask")
    if name == "row":
        return ws.sparsity_aware_svd(W, rank, mask=mask, scores=scores, decomposition="row", omega="scores")
    raise SystemExit(f"unknown candidate {name!r}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pruned", required=True, help="a pruned model folder saved by protocol.py / --save-pruned")
    p.add_argument("--task", default="mrpc", choices=list(TASKS))
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--candidates", nargs="+", default=CANDIDATES, choices=CANDIDATES)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--teacher", help="the dense teacher folder the pruning started from (results/cache/teachers/...)")
    args = p.parse_args()
    pruned_dir = Path(args.pruned)
    if not (pruned_dir / "model.safetensors").is_file():
        raise SystemExit(f"{pruned_dir} holds no pruned model (run protocol.py's LPAF_KD cell first)")
    if args.teacher and not (Path(args.teacher) / "model.safetensors").is_file():
        raise SystemExit(f"--teacher {args.teacher} holds no model (a folder under results/cache/teachers/)")
    if not 0 < args.keep <= 1:
        raise SystemExit(f"--keep must be in (0, 1], got {args.keep}")

    import torch

    torch.set_num_threads(args.threads)
    from factorlm import RunConfig, models
    from factorlm.methods.common import plan_for, targets_for
    from factorlm.methods.prune import load_pruned
    from factorlm.models.surgery import get_module
    from factorlm.session import Session
    from factorlm.staged import run_factorize
    from factorlm.train.evaluate import evaluate
    from factorlm.decompose.svd import truncated_svd
    from factorlm.decompose.weighted_svd import normalized_scores, weighted_error

    settings = {**COMMON, **TASKS[args.task]}
    config = RunConfig(task=args.task, method="lpaf", keep=args.keep, seed=args.seed,
                       cache_dir=str(RESULTS / "cache"), **settings)
    session = Session(config, quiet=True)
    if config.structure != "lowrank":
        raise SystemExit("omega.py fits whole matrices: it needs the low-rank structure")
    base = models.load(str(pruned_dir))
    from transformers import AutoTokenizer

    from factorlm.models.hub_folder import tokenizer_kwargs

    session.tokenizer = AutoTokenizer.from_pretrained(str(pruned_dir), **tokenizer_kwargs(pruned_dir))
    targets = targets_for(session, base)
    masks, scores, density = load_pruned(str(pruned_dir), targets, base)
    plan = plan_for(session, base, targets, speed_check=False)
    teacher_w = {}
    if args.teacher:  # the dense teacher's matrices (for the error against the unpruned weights)
        t = models.load(args.teacher)
        teacher_w = {n: get_module(t, n).weight.detach().clone() for n in targets}
        del t

    def scores_of(model) -> dict:
        out = {}
        for split, loaders in (("select", session.select_loaders), ("dev", session.eval_loaders)):
            m = evaluate(model, loaders, session.task)
            out.update({f"{split}_{k}": float(v) for k, v in m.items() if isinstance(v, (int, float))})
        return out

    j_svd: dict[str, float] = {}
    rows = [{"name": "pruned (before step 2)", **scores_of(base)}]
    print(json.dumps(rows[0]), flush=True)
    for name in args.candidates:
        model = copy.deepcopy(base)
        stats: dict[str, list[float]] = {"rel_err": [], "rel_err_teacher": [], "j_ratio": [], "max_ratio": []}
        fit_s: list[float] = []  # the fits alone (not the error bookkeeping)

        def decompose_for(n):
            def f(W, rank, **_):
                t = time.time()
                A, B = fit(name, W, rank, masks[n], scores[n])
                fit_s.append(time.time() - t)
                AB = (A.double() @ B.double())
                W64 = W.double()
                stats["rel_err"].append(float((W64 - AB).norm() / W64.norm()))
                if n in teacher_w:
                    T = teacher_w[n].double()
                    stats["rel_err_teacher"].append(float((T - AB).norm() / T.norm()))
                om = normalized_scores(scores[n])
                if n not in j_svd:  # the plain SVD's value of the paper's objective: once per matrix
                    j_svd[n] = weighted_error(W, om, *truncated_svd(W, rank))
                stats["j_ratio"].append(weighted_error(W, om, A, B) / max(j_svd[n], 1e-300))
                stats["max_ratio"].append(float(AB.abs().max() / W64.abs().max()))
                return A, B
            return f

        run_factorize(session, model, plan, config.structure, {n: decompose_for(n) for n in plan})
        secs = sum(fit_s)
        mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
        row = {"name": name, "description": DESCRIPTIONS[name], "seconds": round(secs, 1),
               **{k: mean(v) for k, v in stats.items()}, "j_ratio_max": max(stats["j_ratio"]),
               "max_ratio_max": max(stats["max_ratio"]), **scores_of(model)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model

    out = {"pruned": str(pruned_dir), "task": args.task, "keep": args.keep, "seed": args.seed, "density": density,
           "ranks": sorted({int(v["rank"]) for v in plan.values()}),
           "machine": machine(args.threads, "no"), "rows": rows}
    tag = pruned_dir.name
    (RESULTS / f"omega_{tag}.json").write_text(json.dumps(out, indent=1))
    metric = "f1" if args.task == "mrpc" else None
    lines = [f"#### Step 2 candidates on `{tag}` (keep {args.keep:g}, density {density:.3f}; no fine-tuning)", "",
             "| step 2 | rel. err vs pruned W | rel. err vs teacher W | J / J_svd (w/ S objective) | max J/J_svd | max|AB|/max|W| | select | dev | s |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(r: dict, split: str) -> str:
        keys = [f"{split}_{metric}", f"{split}_accuracy"] if metric else [k for k in r if k.startswith(split + "_")]
        return " / ".join(f"{100 * r[k]:.1f}" for k in keys if k in r)

    for r in rows:
        sel, dev = cell(r, "select"), cell(r, "dev")
        if "rel_err" not in r:
            lines.append(f"| {r['name']} | | | | | | {sel} | {dev} | |")
            continue
        lines.append(f"| {r['name']} | {r['rel_err']:.3f} | {r['rel_err_teacher']:.3f} | {r['j_ratio']:.3f} | "
                     f"{r['j_ratio_max']:.3f} | {r['max_ratio']:.2f} (max {r['max_ratio_max']:.1f}) | {sel} | {dev} | {r['seconds']:.0f} |")
    (RESULTS / f"omega_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
