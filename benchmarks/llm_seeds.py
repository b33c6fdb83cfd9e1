"""Issue 31: is a change of the LM recipe beyond the calibration draw's noise?  Paired over calibration seeds.

    python benchmarks/llm_seeds.py --name llm_refine_seeds \\
        --a results/llm_refine/r025_base.json results/llm_refine/r025_base_s1.json results/llm_refine/r025_base_s2.json \\
        --b results/llm_refine/r025_refine.json results/llm_refine/r025_refine_s1.json results/llm_refine/r025_refine_s2.json

``--a`` and ``--b``: the saved runs' ``factorlm.json`` (``factorlm compress --task lm ... --seed S``), one per
calibration seed, in the same seed order (checked: each pair must share its seed, model, evaluation text and
windows, and differ in nothing else that the recipe records but the fields named by ``--differ``).  Prints and
writes ``results/<name>.md``: per seed the perplexity and x dense of both, their difference, and a paired t-test
over seeds on x dense (:mod:`paired`; "significant" only for p < 0.05).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from paired import fmt_p, paired_t, verdict  # noqa: E402

IGNORED = {"output", "overwrite", "progress", "cache_dir", "seed"}


def read(path: str) -> dict:
    p = Path(path)
    return json.loads((p if p.is_file() else HERE / p).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", nargs="+", required=True, help="the baseline runs, one per seed")
    ap.add_argument("--b", nargs="+", required=True, help="the changed runs, same seeds in the same order")
    ap.add_argument("--differ", nargs="*", default=["refine_steps", "refine_lr"], help="recipe fields a and b may differ in")
    ap.add_argument("--label-a", default="without")
    ap.add_argument("--label-b", default="with")
    ap.add_argument("--name", default="llm_seeds")
    args = ap.parse_args()
    if len(args.a) != len(args.b):
        sys.exit("--a and --b need one run per seed each, in the same order")
    rows = []
    for fa, fb in zip(args.a, args.b):
        a, b = read(fa), read(fb)
        ra, rb = a["recipe"], b["recipe"]
        other = sorted(k for k in set(ra) | set(rb)
                       if k not in IGNORED and k not in args.differ and ra.get(k) != rb.get(k))
        if ra["seed"] != rb["seed"] or other:
            sys.exit(f"{fa} and {fb} do not pair: seeds {ra['seed']} / {rb['seed']}, other differences {other}")
        da, db = a["scores"]["dense"]["perplexity"], b["scores"]["dense"]["perplexity"]
        xa, xb = a["scores"]["final"]["perplexity"] / da, b["scores"]["final"]["perplexity"] / db
        rows.append(dict(seed=ra["seed"], a=a["scores"]["final"]["perplexity"], b=b["scores"]["final"]["perplexity"],
                         xa=xa, xb=xb, bytes_a=a["accounting"].get("target_bytes_vs_bf16"),
                         bytes_b=b["accounting"].get("target_bytes_vs_bf16")))
    lines = [f"# {args.name}: `python benchmarks/llm_seeds.py --name {args.name} ...`", "",
             f"| calibration seed | {args.label_a}: perplexity (x dense) | {args.label_b}: perplexity (x dense) | "
             "difference (x dense) | bytes vs bf16 |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['a']:.2f} ({r['xa']:.3f}x) | {r['b']:.2f} ({r['xb']:.3f}x) | "
                     f"{r['xb'] - r['xa']:+.3f} | {r['bytes_a']} / {r['bytes_b']} |")
    xa, xb = [r["xa"] for r in rows], [r["xb"] for r in rows]
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    lines.append(f"| mean ± std | {statistics.mean(xa):.3f}x ± {sd(xa):.3f} | {statistics.mean(xb):.3f}x ± {sd(xb):.3f} | "
                 f"{statistics.mean(xb) - statistics.mean(xa):+.3f} | |")
    if len(rows) > 1:
        _, p = paired_t(xb, xa)
        lines += ["", f"Paired t-test over {len(rows)} calibration seeds on x dense: p = {fmt_p(p)} ({verdict(p)})."]
    text = "\n".join(lines) + "\n"
    (HERE / "results" / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
