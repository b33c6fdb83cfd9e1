"""Issue 32, item 4: peak memory of one healing step (``--heal-steps``) of a compressed random
Llama-shaped model in bf16, per optimizer / update / checkpointing setting, and the formula it fits.

    python benchmarks/heal_memory.py                       # w1024 and w2048 (benchmarks/llm_scale.py outputs)
    python benchmarks/heal_memory.py --table-only

Each setting runs in a fresh child process (one thread): ``factorlm.load`` of the keep-0.8 whitened
folder that ``benchmarks/llm_scale.py --label after`` wrote (4 blocks, vocabulary 49,152, untied),
then ``factorlm.lm.heal.heal`` for 4 steps of the next-token loss on random windows (batch 4 x 256
tokens).  A thread samples the resident set size every 2 ms; the **step peak** is the largest sample
after the first optimizer step ended (torchao's optimizers compile their kernel during the first step),
minus the resident size just before healing began: it counts gradients, optimizer state and
activations, not the model.  Rows go to ``results/heal_memory.json`` and ``results/heal_memory.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_scale import CACHE, RESULTS, commit, cpu_name, make_model  # noqa: E402

OUT_JSON = RESULTS / "heal_memory.json"
SETTINGS = {  # name -> RunConfig overrides
    "adamw (before)": dict(heal_optimizer="adamw"),
    "adamw-sr (auto)": dict(heal_optimizer="adamw-sr"),
    "adamw8bit": dict(heal_optimizer="adamw8bit"),
    "adamw + checkpointing": dict(heal_optimizer="adamw", heal_checkpointing=True),
    "adamw8bit + sequential": dict(heal_optimizer="adamw8bit", heal_update="sequential"),
    "adamw8bit + sequential + checkpointing": dict(heal_optimizer="adamw8bit", heal_update="sequential",
                                                   heal_checkpointing=True),
}
BATCH, SEQ, STEPS = 4, 256, 4

CHILD = r"""
import json, sys, threading, time, os
import torch
torch.set_num_threads(1)
import factorlm
from factorlm.config import RunConfig
from factorlm.lm.heal import heal

folder, overrides = sys.argv[1], json.loads(sys.argv[2])
batch, seq, steps = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
model = factorlm.load(folder)
windows = torch.randint(3, model.config.vocab_size, (4 * batch, seq), generator=torch.Generator().manual_seed(0))
c = RunConfig(task="lm", heal_steps=steps, batch_size=batch, seq_len=seq, progress=False, warmup_ratio=0.0, **overrides)

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

samples, ends, stop = [], [], False
def sampler():
    while not stop:
        samples.append((time.perf_counter(), rss()))
        time.sleep(0.002)
import torch.optim.optimizer as _oo
_oo.register_optimizer_step_post_hook(lambda opt, a, k: ends.append(time.perf_counter()))
base = rss()
t = threading.Thread(target=sampler, daemon=True); t.start()
info = heal(model, windows, c, lambda m: None)
stop = True; t.join()
after_first = ends[0]
peak = max(r for tt, r in samples if tt > after_first)
step_s = (ends[-1] - ends[0]) / max(1, len(ends) - 1)
dtypes = sorted({str(p.dtype) for p in model.parameters()})
print("RESULT " + json.dumps(dict(base=base, step_peak=peak - base, trainable=info["trainable_params"],
      optimizer=info["optimizer"], step_s=round(step_s, 2), steps=len(ends), dtypes=dtypes,
      params=sum(p.numel() for p in model.parameters()))))
"""


def run(shape: str, blocks: int, name: str) -> dict:
    folder = CACHE / f"out-{shape}-b{blocks}-after"
    if not (folder / "config.json").is_file():
        make_model(shape, blocks)
        subprocess.run([sys.executable, str(Path(__file__).with_name("llm_scale.py")), "--shapes", shape,
                        "--blocks", str(blocks), "--label", "after"], check=True)
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    import os

    p = subprocess.run([sys.executable, "-c", CHILD, str(folder), json.dumps(SETTINGS[name]), str(BATCH), str(SEQ),
                        str(STEPS)], capture_output=True, text=True, env={**os.environ, **env})
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{shape} {name}: child failed\n{p.stderr[-3000:]}")
    r = json.loads(line[7:])
    r.update(shape=shape, blocks=blocks, setting=name, batch=BATCH, seq=SEQ, commit=commit(), cpu=cpu_name(), threads=1)
    print(f"{shape} {name}: step peak {r['step_peak'] / 2**20:.0f} MiB over the model, {r['trainable']:,} trainable, "
          f"{r['step_s']}s/step", flush=True)
    return r


def table(rows: list[dict]) -> str:
    lines = ["| shape | setting | optimizer | trainable params | step peak over the model (MiB) | bytes / trainable param | s / step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} b{r['blocks']} | {r['setting']} | {r['optimizer']} | {r['trainable']:,} | "
                     f"{r['step_peak'] / 2**20:,.0f} | {r['step_peak'] / r['trainable']:.1f} | {r['step_s']} |")
    cpu = rows[0]["cpu"] if rows else "?"
    lines.append(f"\nbf16 weights, batch {BATCH} x {SEQ} tokens, next-token loss, one thread on {cpu}; "
                 "command: `python benchmarks/heal_memory.py`.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["w1024", "w2048"])
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS))
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args()
    rows = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else []
    if not a.table_only:
        for shape in a.shapes:
            for name in a.settings:
                r = run(shape, a.blocks, name)
                rows = [x for x in rows if (x["shape"], x["blocks"], x["setting"]) != (shape, a.blocks, name)] + [r]
                OUT_JSON.write_text(json.dumps(rows, indent=1) + "\n")
    rows.sort(key=lambda r: (r["shape"], list(SETTINGS).index(r["setting"]) if r["setting"] in SETTINGS else 99))
    (RESULTS / "heal_memory.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
