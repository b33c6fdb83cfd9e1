"""Training speed on CPU (issue 11, part 1): seconds per optimizer step of a dense MiniLM fine-tune and
of each method's training phase, per training configuration.

    python benchmarks/train_speed.py --threads 1                 # fp32, bf16, bf16 + length grouping
    python benchmarks/train_speed.py --threads 2 --modes fp32 bf16-grouped --name train_speed_2t
    python benchmarks/train_speed.py --quick                     # smoke test: writes train_speed_quick.*

What is timed: the real code paths (``factorlm.compress`` / ``finetune`` on MRPC, batch 32, max length
128, the task's own length distribution), with a timing callback added to every training phase: the
wall time from the first ``on_step_begin`` hook to the last ``on_step_end`` hook of each optimizer step
(the method's hooks such as the pruner's mask update, forward, every callback's loss term, backward,
the optimizer step; not the data loading nor evaluations).
The first step of each phase (one-off costs) is dropped; the table gives the median.

Phases (each ``--epochs`` epochs of ``--train-samples`` training examples, so that epochs 2+ exist):

* ``dense``: the dense teacher's fine-tune (a plain train step);
* ``prune``: LPAF step 1, movement pruning with the learned scores and distillation from the teacher
  (a teacher forward per step in epoch 1; from epoch 2 on the teacher's logits come from the
  per-example cache, reported apart as ``prune (epoch 2+)``);
* ``mixed-rank``: LPAF step 3, mixed-rank fine-tuning of the factorized model at keep 0.25: while
  p > 0 (the first half) each step runs two forwards for the consistency loss, after that one; the
  two kinds of step are reported apart;
* ``rankdyna``: RankDyna's fine-tune from the pre-trained model (factorized, with its rank-allocation
  hooks).

Modes: ``fp32`` (the previous default: fp32, random batches), ``bf16`` (``--mixed-precision bf16``:
autocast on CPU), ``bf16-grouped`` (also ``--group-by-length``).  Writes ``results/<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
GLUE = Path(os.environ.get("FACTORLM_DATA_DIR", ROOT.parents[1] / "shared" / "data" / "glue"))

MODES = {
    "fp32": dict(mixed_precision="no", group_by_length=False),
    "bf16": dict(mixed_precision="bf16", group_by_length=False),
    "bf16-grouped": dict(mixed_precision="bf16", group_by_length=True),
}
PHASE_NAMES = {"dense": "dense", "prune": "prune", "finetune": "mixed-rank", "rankdyna": "rankdyna"}


from factorlm.train import Callback  # noqa: E402


class StepTimer(Callback):
    """The wall time of every optimizer step, with its epoch and how many forwards it ran: ``start``
    goes first in the callback list (its ``on_step_begin`` before every other hook's, e.g. the
    pruner's mask update) and the timer itself last (its ``on_step_end`` after every other)."""

    def __init__(self, phase: str):
        self.phase = phase
        self.steps: list[tuple[int, float, bool]] = []  # (epoch index, seconds, second forward?)
        self._t0 = 0.0
        timer = self

        class Start(Callback):
            def on_step_begin(self, trainer) -> None:
                timer._t0 = time.perf_counter()

        self.start = Start()

    def on_step_end(self, trainer) -> None:
        dt = time.perf_counter() - self._t0
        two = any(getattr(cb, "last_consistency", None) is not None for cb in trainer.callbacks)
        self.steps.append(((trainer.state.step - 1) // trainer.steps_per_epoch, dt, two))


TIMERS: list[StepTimer] = []


def install_timer() -> None:
    from factorlm.session import Session

    original = Session.finetune

    def finetune(self, model, *, phase, callbacks=(), **kw):
        timer = StepTimer(phase)
        TIMERS.append(timer)
        return original(self, model, phase=phase, callbacks=[timer.start, *callbacks, timer], **kw)

    Session.finetune = finetune


def medians(timers: list[StepTimer]) -> dict[str, dict]:
    out = {}
    for t in timers:
        name = PHASE_NAMES.get(t.phase, t.phase)
        steps = t.steps[1:]  # the first step pays one-off costs
        groups = {name: steps}
        if t.phase == "prune":
            groups = {name + " (epoch 1)": [s for s in steps if s[0] == 0],
                      name + " (epoch 2+)": [s for s in steps if s[0] > 0]}
        elif t.phase == "finetune":  # p > 0: a second forward for the consistency loss; p = 0: one
            groups = {name + " (p > 0, 2 forwards)": [s for s in steps if s[2]],
                      name + " (p = 0)": [s for s in steps if not s[2]]}
        for n, ss in groups.items():
            if ss:
                secs = [s for _, s, _ in ss]
                out[n] = {"s_per_step": statistics.median(secs), "steps": len(secs),
                          "iqr": [statistics.quantiles(secs, n=4)[0], statistics.quantiles(secs, n=4)[2]]
                          if len(secs) >= 4 else None}
    return out


def run_mode(mode: str, args) -> dict:
    from factorlm import RunConfig, compress

    common = dict(task="mrpc", data_dir=str(GLUE), max_length=128, batch_size=32, eval_batch_size=128,
                  max_train_samples=args.train_samples, max_eval_samples=64, selection_size=0, epochs=args.epochs,
                  teacher_epochs=args.epochs, learning_rate=1e-4, seed=0, latency=False, progress=False,
                  **MODES[mode])
    if args.quick:
        common.update(max_train_samples=96, epochs=2, teacher_epochs=2)
    res: dict = {"mode": mode, **MODES[mode]}
    with tempfile.TemporaryDirectory() as tmp:
        TIMERS.clear()
        t0 = time.time()
        compress(RunConfig(method="lpaf", keep=0.25, cache_dir=tmp, output=f"{tmp}/lpaf", **common),
                 quiet=True, save=False)
        compress(RunConfig(method="rankdyna", keep=0.25, cache_dir=tmp, output=f"{tmp}/rd", **common),
                 quiet=True, save=False)
        res["wall_s"] = round(time.time() - t0, 1)
        res["phases"] = medians(TIMERS)
    return res


def table(results: list[dict]) -> str:
    phases = list(dict.fromkeys(p for r in results for p in r["phases"]))
    base = next((r for r in results if r["mode"] == "fp32"), None)
    head = "| phase | " + " | ".join(r["mode"] for r in results) + " |"
    lines = [head, "|" + "---|" * (len(results) + 1)]
    for p in phases:
        cells = []
        for r in results:
            c = r["phases"].get(p)
            if c is None:
                cells.append("-")
                continue
            s = f"{c['s_per_step']:.3f} s ({1 / c['s_per_step']:.2f}/s)"
            b = base["phases"].get(p) if base else None
            if b and r is not base:
                s += f", {b['s_per_step'] / c['s_per_step']:.2f}x"
            cells.append(s)
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    if base and "prune (epoch 1)" in base["phases"]:
        lines.append("")
        lines.append("Teacher-logit cache: " + "; ".join(
            f"{r['mode']} prune epoch 2+ / epoch 1 = "
            f"{r['phases']['prune (epoch 2+)']['s_per_step'] / r['phases']['prune (epoch 1)']['s_per_step']:.2f}"
            for r in results if "prune (epoch 2+)" in r["phases"]))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--train-samples", type=int, default=640, help="training examples per epoch (20 steps)")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--name", default="train_speed")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if not GLUE.is_dir():
        sys.exit(f"MRPC not found under {GLUE} (set FACTORLM_DATA_DIR)")
    import torch

    torch.set_num_threads(args.threads)
    name = args.name + ("_quick" if args.quick else "")
    install_timer()
    results = []
    for mode in args.modes:
        print(f"[{time.strftime('%H:%M:%S')}] {mode}", flush=True)
        results.append(run_mode(mode, args))
        print(json.dumps(results[-1]["phases"], indent=1), flush=True)
    md = (f"MiniLM-L6 on MRPC (batch 32, max length 128, dynamic padding), {args.threads} torch thread(s), "
          f"{platform.processor() or platform.machine()}; median seconds per optimizer step "
          f"(steps/s; speed-up over fp32)\n\n" + table(results))
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(md + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"threads": args.threads, "torch": torch.__version__, "results": results, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
