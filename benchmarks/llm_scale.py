"""Issue 32: peak resident memory, wall time and output bytes of ``factorlm compress --task lm`` (and of
``factorlm.load``) on random Llama-shaped models saved in bf16, at the widths users have.

    python benchmarks/llm_scale.py --shapes w1024 w2048 --label after     # one row per shape
    python benchmarks/llm_scale.py --shapes w4096 --blocks 2 --label after
    python benchmarks/llm_scale.py --shapes v262k --blocks 18 --label after -- --rank-policy global
    python benchmarks/llm_scale.py --table-only                           # rewrite the table

Shapes (hidden / MLP / heads / kv heads; vocabulary 49,152 with SmolLM2's tokenizer, untied embeddings):
``w1024`` 1024 / 2816 / 16 / 4, ``w2048`` 2048 / 5632 / 32 / 4 (TinyLlama's block), ``w4096`` 4096 /
14336 / 32 / 8 (one Llama-3-8B block); ``v262k`` 640 / 2048 / 4 / 1 (head dim 256) with a 262,144-token
tied vocabulary (Gemma-3-270M's sizes; SmolLM2's tokenizer covers its first 49,152 ids).  Each model is random (seeded), saved once as bf16 safetensors
under ``benchmarks/results/cache/llm_scale/`` and compressed in a fresh child process
(``--method whiten --keep 0.8 --calibration-samples 16 --seq-len 128 --eval-max-tokens 4096``, one
thread, no latency timing unless ``--latency``); the child's peak resident set size comes from
``os.wait4`` (the kernel's ``ru_maxrss``), so it counts everything the process ever held.  A ``load``
row times ``factorlm.load`` of the compressed folder the same way.  Each row records the commit, the CPU
and the extra arguments; rows are kept by (label, shape, blocks, what, args) in
``results/llm_scale.json`` and the table ``results/llm_scale.md`` is rewritten from all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = RESULTS / "cache" / "llm_scale"
OUT_JSON = RESULTS / "llm_scale.json"
SHAPES = {
    "w1024": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4),
    "w2048": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4),
    "w4096": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    # Gemma-3-270M's sizes in a Llama block: 262,144-token vocabulary, tied embeddings (its 18 blocks: --blocks 18)
    "v262k": dict(hidden_size=640, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                  vocab_size=262144, tie_word_embeddings=True),
}
COMPRESS = ["--method", "whiten", "--keep", "0.8", "--calibration-samples", "16", "--seq-len", "128",
            "--eval-max-tokens", "4096"]


def cpu_name() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT.parent, capture_output=True,
                               text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "?"


def make_model(shape: str, blocks: int, seed: int = 0) -> Path:
    """A random Llama-shaped model saved in bf16 with SmolLM2's tokenizer (made once, then cached)."""
    folder = CACHE / f"{shape}-b{blocks}"
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from factorlm.lm.load import resolve_causal_model

    tok = AutoTokenizer.from_pretrained(resolve_causal_model("smollm2"))
    sizes = {"vocab_size": 49152, "tie_word_embeddings": False, **SHAPES[shape]}
    cfg = LlamaConfig(num_hidden_layers=blocks, max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, **sizes)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def bytes_of(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run_child(cmd: list[str]) -> tuple[int, float, int, str]:
    """(exit code, wall seconds, peak RSS bytes, last lines of stderr) of ``cmd`` in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()
    _, status, rusage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return p.returncode, wall, rusage.ru_maxrss * 1024, "\n".join(out.strip().splitlines()[-25:])


LOAD = "import sys, factorlm; m = factorlm.load(sys.argv[1]); print(sum(p.numel() for p in m.parameters()))"


def measure(shape: str, blocks: int, label: str, extra: list[str], latency: bool) -> list[dict]:
    src = make_model(shape, blocks)
    out = CACHE / f"out-{shape}-b{blocks}-{label}"
    cmd = [sys.executable, "-m", "factorlm", "compress", "--task", "lm", "--model", str(src), *COMPRESS,
           *([] if latency else ["--no-latency"]), *extra, "--output", str(out), "--overwrite"]
    rc, wall, rss, tail = run_child(cmd)
    base = dict(label=label, shape=shape, blocks=blocks, args=" ".join(extra), commit=commit(), cpu=cpu_name(),
                threads=1, source_bytes=bytes_of(src))
    rows = [dict(base, what="compress", rc=rc, wall_s=round(wall, 1), peak_rss=rss,
                 output_bytes=bytes_of(out) if rc == 0 else None, tail=tail if rc else "")]
    print(f"{label} {shape} b{blocks} compress: rc {rc}, {wall:.0f}s, peak {rss / 2**30:.2f} GiB", flush=True)
    if rc:
        print(tail, flush=True)
        return rows
    rc, wall, rss, tail = run_child([sys.executable, "-c", LOAD, str(out)])
    rows.append(dict(base, what="load", rc=rc, wall_s=round(wall, 1), peak_rss=rss, output_bytes=bytes_of(out),
                     tail=tail if rc else ""))
    print(f"{label} {shape} b{blocks} load: rc {rc}, {wall:.0f}s, peak {rss / 2**30:.2f} GiB", flush=True)
    return rows


def key(r: dict) -> tuple:
    return (r["label"], r["shape"], r["blocks"], r["what"], r["args"])


def table(rows: list[dict]) -> str:
    gib = 2**30
    lines = ["# LLM scale: peak resident memory, time and bytes of `compress --task lm` (random Llama-shaped "
             "models, bf16 checkpoints)", "",
             "Made by `python benchmarks/llm_scale.py` (its docstring has the settings). Peak = the child process's "
             "`ru_maxrss`; 'x ckpt' = peak / the bf16 checkpoint's bytes.", "",
             "| label | shape | blocks | step | extra args | wall s | peak GiB | x ckpt | source MiB | output MiB | "
             "output / source | commit | CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["shape"], r["blocks"], r["what"], r["label"])):
        ob, src = r.get("output_bytes"), r["source_bytes"]
        lines.append(
            f"| {r['label']} | {r['shape']} | {r['blocks']} | {r['what']} | {r['args'] or '-'} | "
            f"{r['wall_s']:.0f}{'' if r['rc'] == 0 else ' (failed)'} | {r['peak_rss'] / gib:.2f} | "
            f"{r['peak_rss'] / r['source_bytes']:.2f} | {r['source_bytes'] / 2**20:.0f} | "
            f"{'-' if ob is None else f'{ob / 2**20:.0f}'} | {'-' if ob is None else f'{ob / src:.2f}'} | "
            f"{r['commit']} | {r['cpu']}, {r['threads']} thread |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["w1024", "w2048"], choices=list(SHAPES))
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--label", default="after", help="a name for this code state (e.g. before / after)")
    p.add_argument("--latency", action="store_true", help="also time dense vs compressed generation")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("extra", nargs="*", help="more compress arguments, after --")
    a = p.parse_args()
    rows = {key(r): r for r in (json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else [])}
    if not a.table_only:
        for s in a.shapes:
            for r in measure(s, a.blocks, a.label, a.extra, a.latency):
                rows[key(r)] = r
                OUT_JSON.write_text(json.dumps(list(rows.values()), indent=1) + "\n")
    (RESULTS / "llm_scale.md").write_text(table(list(rows.values())))
    print(table(list(rows.values())))


if __name__ == "__main__":
    main()
