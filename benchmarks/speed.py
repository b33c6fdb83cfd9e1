"""Speed benchmark: dense vs factorized MiniLM-L6 forward latency, with the FLOP-ratio limit.

    python benchmarks/speed.py                                   # lowrank at keep 0.5/0.25/0.16
    python benchmarks/speed.py --structures lowrank monarch blockwise

All models live in one process and are timed round-robin (each round times every model once,
``--repeats`` forwards), so slow drifts of the machine hit every model alike; the reported number
is the median over rounds.  "FLOP limit" = dense FLOPs / factorized FLOPs of the whole forward
(torch's FlopCounterMode: every matmul, attention included), the speed-up a perfectly
matmul-bound machine would see.  Writes results/speed.json, speed.md and speed.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def build(structure: str | None, keep: float | None, nblocks: int | None):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from factorlm.factorize import budget_plan, factorize, structure_class
    from factorlm.models import default_model_path, find_targets

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    m = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2).eval()
    info = {"structure": structure or "dense", "keep": keep}
    if structure:
        targets = find_targets(m)
        fixed = {"nblocks": nblocks} if (nblocks and structure == "monarch") else {}
        plan = budget_plan(m, targets, keep=keep, structure=structure_class(structure), **fixed)
        acc = factorize(m, plan, structure)
        info.update(knob=next(iter(plan.values())), target_ratio=acc.target_ratio, params=acc.model_params_after)
    else:
        info["params"] = sum(p.numel() for p in m.parameters())
    return m, info


def time_once(model, batch, repeats: int) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(**batch)
        return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--structures", nargs="+", default=["lowrank"])
    p.add_argument("--keeps", nargs="+", type=float, default=[0.5, 0.25, 0.16])
    p.add_argument("--shapes", nargs="+", default=["32x128", "1x128"], help="batch x sequence length")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--nblocks", type=int, default=None, help="Monarch blocks (default: structure default)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--name", default="speed")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from factorlm.profiling import count_flops, dummy_batch

    models = [build(None, None, None)]
    for s in args.structures:
        for k in args.keeps:
            models.append(build(s, k, args.nblocks))
    rows = []
    for shape in args.shapes:
        bs, sl = map(int, shape.split("x"))
        repeats = 2 if bs * sl >= 2048 else 20
        batches = [dummy_batch(m, bs, sl) for m, _ in models]
        flops = [count_flops(m, bs, sl) for m, _ in models]
        for (m, _), b in zip(models, batches):  # warm-up
            time_once(m, b, 2)
        samples = [[] for _ in models]
        for _ in range(args.rounds):
            for i, ((m, _), b) in enumerate(zip(models, batches)):
                samples[i].append(time_once(m, b, repeats))
        med = [statistics.median(s) for s in samples]
        for i, (_, info) in enumerate(models):
            rows.append({**info, "batch": bs, "seq": sl, "latency_ms": round(med[i], 3),
                         "latency_min_ms": round(min(samples[i]), 3), "flops": flops[i],
                         "speedup": round(med[0] / med[i], 3), "flop_limit": round(flops[0] / flops[i], 3)})
    env = {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
           "device": "cpu", "rounds": args.rounds}
    lines = [f"torch {env['torch']}, {args.threads} threads, CPU, median of {args.rounds} round-robin rounds",
             "", "| structure | keep | params | batch x seq | latency ms | speed-up | FLOP limit |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        keep = "-" if r["keep"] is None else f"{r['keep']:g}"
        lines.append(f"| {r['structure']} | {keep} | {r['params']/1e6:.2f}M | {r['batch']}x{r['seq']} | "
                     f"{r['latency_ms']:.1f} | {r['speedup']:.2f}x | {r['flop_limit']:.2f}x |")
    md = "\n".join(lines)
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.md").write_text(md + "\n")
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.shapes), figsize=(5.5 * len(args.shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], args.shapes):
        bs, sl = map(int, shape.split("x"))
        for s in args.structures:
            pts = sorted((r["keep"], r["speedup"], r["flop_limit"]) for r in rows
                         if r["structure"] == s and r["batch"] == bs and r["seq"] == sl)
            ax.plot([q[0] for q in pts], [q[1] for q in pts], marker="o", label=f"{s} measured")
            ax.plot([q[0] for q in pts], [q[2] for q in pts], ls="--", marker="x", label=f"{s} FLOP limit")
        ax.axhline(1, color="k", lw=0.8)
        ax.invert_xaxis()
        ax.set_xlabel("fraction of encoder weights kept")
        ax.set_ylabel("speed-up vs dense")
        ax.set_title(f"MiniLM-L6, batch {bs} x seq {sl}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}.png", dpi=120)


if __name__ == "__main__":
    main()
