"""Where the time of a forward pass goes: dense vs factorized MiniLM-L6, per op group (torch.profiler).

    python benchmarks/profile_forward.py                 # keep 0.25, batch 32 x 128, fp32 and bf16
    python benchmarks/profile_forward.py --keep 0.16 --dtypes bf16

Factorization only shrinks the linear layers; attention (SDPA), GELU, LayerNorm, softmax and copies
stay.  This table shows how much of each forward those costs are, i.e. the ceiling on the speed-up
the factorization alone can give at this shape (Amdahl).  Writes results/profile_forward.{md,json}
(``--name``: another basename, e.g. for another machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

GROUPS = [  # (group, substrings of the op name), first match wins
    ("linear (matmul)", ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm")),
    ("attention (sdpa)", ("scaled_dot_product", "_flash", "_efficient_attention", "aten::softmax", "aten::_softmax")),
    ("gelu", ("gelu",)),
    ("layernorm", ("layer_norm",)),
    ("copies / casts", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone", "aten::cat")),
    ("elementwise", ("aten::add", "aten::mul", "aten::div", "aten::sub", "aten::tanh", "aten::where")),
    ("embedding", ("embedding",)),
]


def group_of(name: str) -> str:
    for g, keys in GROUPS:
        if any(k in name for k in keys):
            return g
    return "other"


def profile(model, batch, repeats: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with torch.inference_mode():
        model(**batch)
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                model(**batch)
    out: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        # self time only: every microsecond is counted once, in the op that spent it
        out[group_of(evt.key)] += evt.self_cpu_time_total / 1e3 / repeats
    return dict(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default="profile_forward", help="output basename under results/")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from factorlm.factorize import budget_plan, factorize, structure_class
    from factorlm.models import default_model_path, find_targets
    from factorlm.profiling import dummy_batch

    hf_logging.set_verbosity_error()
    dense = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2).eval()
    fact = copy.deepcopy(dense)
    factorize(fact, budget_plan(fact, find_targets(fact), keep=args.keep, structure=structure_class("lowrank")), "lowrank")
    batch = dummy_batch(dense, args.batch, args.seq)
    rows = {}
    for dt in args.dtypes:
        cast = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
        for name, m in (("dense", dense), ("factorized", fact)):
            rows[f"{name} {dt}"] = profile(copy.deepcopy(m).to(cast), batch, args.repeats)
            print(f"{name} {dt}: {sum(rows[f'{name} {dt}'].values()):.1f} ms", flush=True)
    groups = [g for g, _ in GROUPS] + ["other"]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from speed import machine_info

    env = machine_info(args.threads)
    lines = [f"# Forward time by op group (MiniLM-L6, keep {args.keep}, batch {args.batch} x {args.seq}, "
             f"{args.threads} threads, {env['cpu']} ({env['cpu_capability']}), torch.profiler self CPU time, mean of {args.repeats})", "",
             "| variant | total ms | " + " | ".join(groups) + " |", "|---|---:|" + "---:|" * len(groups)]
    for name, r in rows.items():
        tot = sum(r.values())
        lines.append(f"| {name} | {tot:.1f} | " + " | ".join(f"{r.get(g, 0):.1f} ({r.get(g, 0) / tot:.0%})" for g in groups) + " |")
    for dt in args.dtypes:
        d, f = rows.get(f"dense {dt}"), rows.get(f"factorized {dt}")
        if d and f:
            rest = sum(v for g, v in f.items() if g != "linear (matmul)")
            lines.append(f"\n{dt}: the factorized forward spends {rest:.1f} ms outside the linear layers; even with "
                         f"free linear layers its speed-up over dense would be at most {sum(d.values()) / rest:.2f}x.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "env": env, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
