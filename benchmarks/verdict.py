"""Issue 30, item 8: the verdict on the seed papers' encoder claims, from the protocol's run files.

Each claim is a comparison "A beats B" on a task at a keep; it *holds* when A - B is in the claimed
direction and significant (two-sided paired t-test over seeds, p < 0.05; the runs pair by seed: same
teacher, data split and selection slice); *does not hold* when the difference is not significant or
significant the other way; *untested* when either side has fewer than 2 paired seeds.  Runs pair only
within one teacher generation (``--tag``: teachers re-trained on another machine differ); RankDyna has
no teacher and pairs with any generation by seed.  About 80 cells are tested at alpha = 0.05 with 2-3
seeds and no multiple-comparison correction: expect a few "significant" cells by chance, and read a
claim by the pattern across its tasks and keeps.  MRPC is judged on accuracy (every compressed model's
F1 sits at or below the majority class's 81.2, so F1 cannot rank them).

    python benchmarks/verdict.py          # -> results/verdict.md (the table at the top of BENCHMARKS.md)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import fmt_p, paired_bootstrap, paired_t  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = RESULTS / "runs_protocol"
TASKS = ("mrpc", "stsb", "rotten_tomatoes", "sst2")
METRIC = {"mrpc": "accuracy"}  # F1 saturates at the majority class's (issue 30)

# (claim, source, A, B, keeps): "A beats B" on every task at every keep
CLAIMS = [
    ("LPAF beats SVD_Ft (equal steps, equal distillation)", "Ren & Zhu 2024, Table 2", "LPAF_KD", "SVD_Ft_KD", (0.25, 0.16)),
    ("LPAF beats FWSVD_Ft", "Ren & Zhu 2024, Table 2", "LPAF_KD", "FWSVD_Ft_KD", (0.25, 0.16)),
    ("sparsity-aware SVD beats vanilla SVD in LPAF's step 2", "Ren & Zhu 2024, Table 4", "LPAF_KD", "LPAF_KD_plain_svd", (0.25,)),
    ("mixed-rank fine-tuning beats vanilla fine-tuning in step 3", "Ren & Zhu 2024, Table 4", "LPAF_KD", "LPAF_KD_vanilla_ft", (0.25,)),
    ("FWSVD beats SVD (both fine-tuned)", "Hsu et al. 2022, Table 2", "FWSVD_Ft_KD", "SVD_Ft_KD", (0.25, 0.16)),
    ("RankDyna (learned global ranks) beats uniform SVD_Ft", "Hua et al. 2023, Table 1", "RankDyna", "SVD_Ft_KD", (0.25, 0.16)),
    ("staged factorization beats one-shot (SVD_Ft + KD)", "staged factorization claim", "SVD_Ft_KD_staged", "SVD_Ft_KD", (0.25,)),
    ("low rank beats Monarch (SVD_Ft + KD)", "factorization study", "SVD_Ft_KD", "Monarch_Ft_KD", (0.25,)),
    ("factorlm's kfac-global beats SVD_Ft_KD", "issue 30 target", "KFAC_global", "SVD_Ft_KD", (0.25, 0.16)),
    ("factorlm's kfac-global beats FWSVD_Ft_KD", "issue 30 target", "KFAC_global", "FWSVD_Ft_KD", (0.25, 0.16)),
    ("factorlm's kfac-global beats SVD-LLM whitening (per-matrix ratio)", "issue 30", "KFAC_global", "Whiten_KD", (0.25, 0.16)),
    ("factorlm's kfac-global beats whitening with one shared rank", "issue 30", "KFAC_global", "Whiten_KD_shared", (0.25, 0.16)),
    ("factorlm's kfac-global beats LPAF_KD", "issue 30 target", "KFAC_global", "LPAF_KD", (0.25, 0.16)),
    ("factorlm's kfac-global beats RankDyna", "issue 30 target", "KFAC_global", "RankDyna", (0.25, 0.16)),
]


def load_runs() -> list[dict]:
    runs = []
    for f in sorted(RUNS.glob("*.json")):
        r = json.loads(f.read_text())
        if r.get("quick") or r.get("max_steps"):
            continue
        head = f.stem.split("__")[0]
        r["_gen"] = head if head not in TASKS else ""
        runs.append(r)
    return runs


def score(r: dict, metric: str) -> float:
    if metric == r["main_metric"]:
        return 100 * r["score"]
    return 100 * r["phases"]["final"][metric]


def compare(runs: list[dict], task: str, keep: float, a: str, b: str) -> dict | None:
    """The best-paired comparison: the generation with most common seeds (RankDyna pairs with any)."""
    metric = METRIC.get(task)
    A = [r for r in runs if r["task"] == task and r["keep"] == keep and r["name"] == a]
    B = [r for r in runs if r["task"] == task and r["keep"] == keep and r["name"] == b]
    best = None
    for gen in sorted({r["_gen"] for r in A + B}):  # a tie: the first generation in sorted order
        sa = {r["seed"]: r for r in A if r["_gen"] == gen or r["method"] == "rankdyna"}
        sb = {r["seed"]: r for r in B if r["_gen"] == gen or r["method"] == "rankdyna"}
        common = sorted(sa.keys() & sb.keys())
        if best is None or len(common) > len(best[0]):
            best = (common, sa, sb, gen)
    if not best or len(best[0]) < 2:
        return None
    common, sa, sb, gen = best
    m = metric or sa[common[0]]["main_metric"]
    xa, xb = [score(sa[s], m) for s in common], [score(sb[s], m) for s in common]
    _, p = paired_t(xa, xb)
    boot = paired_bootstrap(task, m, [sa[s] for s in common], [sb[s] for s in common])
    machines = sorted({r.get("machine", "?").split(",")[0] for r in [*sa.values(), *sb.values()]})
    return {"diff": statistics.mean(xa) - statistics.mean(xb), "p": p, "boot": boot, "n": len(common),
            "per_seed": [x - y for x, y in zip(xa, xb)], "metric": m, "gen": gen or "untagged", "machines": machines,
            "a": statistics.mean(xa), "b": statistics.mean(xb)}


def main() -> None:
    runs = load_runs()
    lines = ["| claim (source) | task | keep | A - B (x100, mean over seeds; per seed) | paired t p | dev bootstrap p | verdict |",
             "|---|---|---|---|---|---|---|"]
    summary = {}
    for claim, src, a, b, keeps in CLAIMS:
        for task in TASKS:
            for keep in keeps:
                c = compare(runs, task, keep, a, b)
                if c is None:
                    v = "untested"
                    cells = "—", "—", "—"
                else:
                    sig = c["p"] < 0.05
                    v = ("holds" if c["diff"] > 0 else "fails: significantly the other way") if sig else "not significant"
                    cells = (f"{c['diff']:+.1f} ({c['a']:.1f} vs {c['b']:.1f}; {' / '.join(f'{d:+.1f}' for d in c['per_seed'])}; "
                             f"{c['n']} seeds, {c['metric']}, {c['gen']} grid)", fmt_p(c["p"]), fmt_p(c["boot"]))
                summary.setdefault(claim, []).append(v)
                lines.append(f"| {claim} ({src}) | {task} | {keep:g} | {cells[0]} | {cells[1]} | {cells[2]} | {v} |")
    head = ["| claim | holds (task x keep cells) | not significant | fails | untested |", "|---|---|---|---|---|"]
    for claim, vs in summary.items():
        head.append(f"| {claim} | {vs.count('holds')} | {vs.count('not significant')} | "
                    f"{sum(v.startswith('fails') for v in vs)} | {vs.count('untested')} |")
    md = "\n".join(head) + "\n\n" + "\n".join(lines) + "\n"
    (RESULTS / "verdict.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
