"""Issue 31 item 4: what healing buys, step by step.  SmolLM2-135M compressed one-shot by ``whiten`` at keep 0.8
(SVD-LLM ratio 0.2) with the global Fisher-weighted plan and sequential calibration (BENCHMARKS.md's best
one-shot low rank, 3.06x dense), then healed by distillation to the dense model (the default
``--heal-loss``) for ``--steps`` optimizer steps, the held-out perplexity measured at ``--curve`` steps of
that one run (``--heal-curve``: the points share the run's warm-up and linear decay, so the 50-step point is
*not* a 50-step run's result; a shorter run decays sooner and usually ends a little better).

    python benchmarks/llm_heal_curve.py --threads 1                      # 200 steps, points at 50 / 100 / 200
    python benchmarks/llm_heal_curve.py --steps 400 --curve 50 100 200 400

Setup as ``benchmarks/llm.py --eval-max-tokens 16384`` (hamlet, the first 16,384 tokens, windows of 256;
calibration 128 x 256 tokens of the convention speeches; healing on 1024 other windows of them, batch 8,
lr 1e-4, ``--mixed-precision auto``).  Writes ``results/llm_heal_curve.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from factorlm.api import compress  # noqa: E402
from factorlm.config import RunConfig, resolve_mixed_precision  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--curve", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--keep", type=float, default=0.8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sequential", default="layer", choices=["layer", "anchored"],
                    help="calibration order of the one-shot step (anchored: decompose/anchor.py)")
    ap.add_argument("--name", default="llm_heal_curve")
    ap.add_argument("--smoke", action="store_true", help="8 calibration windows, 1,024 evaluation tokens (checks the script)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    c = RunConfig(task="lm", model="smollm2", method="whiten", method_options={"sequential": a.sequential}, keep=a.keep, rank_policy="global", global_score="fisher",
                  seq_len=256, eval_seq_len=256, eval_max_tokens=1024 if a.smoke else 16384,
                  calibration_samples=8 if a.smoke else 128, heal_samples=16 if a.smoke else 1024, heal_steps=a.steps, heal_curve=a.curve,
                  learning_rate=a.lr, batch_size=8, mixed_precision="auto", latency=False, seed=0, progress=False)
    t0 = time.perf_counter()
    rep = compress(c, quiet=False, save=False)
    heal = rep.info["heal"]
    dense = rep.scores["dense"]["perplexity"]
    out = {"config": {"steps": a.steps, "curve": a.curve, "keep": a.keep, "lr": a.lr, "method": "whiten",
                      "rank_policy": "global (fisher)", "sequential": a.sequential, "heal_loss": heal["loss"],
                      "heal_optimizer": heal["optimizer"], "threads": a.threads},
           "machine": f"{cpu_name()}, {a.threads} thread(s), {resolve_mixed_precision('auto')}",
           "dense": dense, "oneshot": rep.scores["oneshot"]["perplexity"], "curve": heal["curve"],
           "heal_seconds": heal["seconds"], "oneshot_seconds": rep.info.get("factorize_seconds"),
           "ranks": [min(rep.info["ranks"].values()), max(rep.info["ranks"].values())],
           "wall_s": round(time.perf_counter() - t0, 1)}
    (HERE / "results" / f"{a.name}.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [f"SmolLM2-135M, whiten keep {a.keep} (global Fisher plan, calibration order {a.sequential}), healed by {heal['loss']} "
             f"({heal['optimizer']}, lr {a.lr:g}, batch 8) for {a.steps} steps; perplexity on hamlet (16,384 tokens, "
             f"windows of 256), dense {dense:.2f}; {out['machine']}", "",
             "| after step | healing wall so far | perplexity | x dense |", "|---|---|---|---|",
             f"| 0 (one-shot) | - | {out['oneshot']:.2f} | {out['oneshot'] / dense:.2f}x |"]
    for p in heal["curve"]:
        lines.append(f"| {p['step']} | {p['seconds'] / 60:.1f} min | {p['perplexity']:.2f} | {p['perplexity'] / dense:.2f}x |")
    lines.append(f"\ncommand: `python benchmarks/llm_heal_curve.py --sequential {a.sequential} --steps {a.steps} "
                 f"--curve {' '.join(map(str, a.curve))} --name {a.name}`; one-shot {out['oneshot_seconds']:.0f} s, "
                 f"healing {heal['seconds'] / 60:.1f} min")
    (HERE / "results" / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
