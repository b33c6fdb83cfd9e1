"""Issue 31 item 3: the same saved models scored with 2048-token windows (the papers' setting) beside the
256-token windows of the tables so far (continuity).

    python benchmarks/llm_windows.py --name llm_windows_r025 DIR [DIR ...]     # ~1.5-3 min per model and window

Scores the dense model (``--model``, default smollm2) and every saved folder on ``--eval-text`` (default
hamlet, the first ``--eval-max-tokens`` 16,384 tokens) with non-overlapping windows of each ``--windows``
length (default 256 and 2048), in the dtype each was saved in, by :func:`factorlm.lm.pipeline.evaluate_lm`
(the ``factorlm evaluate`` path).  Writes ``results/<name>.{json,md}``: perplexity and x dense per window
length, with each folder's recorded recipe (method, keep, seed, refinement steps).
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

from factorlm.config import RunConfig  # noqa: E402
from factorlm.errors import FactorLMError  # noqa: E402
from factorlm.lm.pipeline import evaluate_lm  # noqa: E402
from factorlm.models.loading import read_meta  # noqa: E402


def label(path: str) -> str:
    meta = read_meta(Path(path)) or {}
    r = meta.get("recipe") or {}
    if not r:
        return "dense"
    refine = f", refine {r['refine_steps']}" if r.get("refine_steps") else ""
    return f"{r.get('method')} keep {r.get('keep')}, seed {r.get('seed')}{refine}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+")
    p.add_argument("--model", default="smollm2", help="the dense model the folders were compressed from")
    p.add_argument("--windows", nargs="+", type=int, default=[256, 2048])
    p.add_argument("--eval-text", default="hamlet")
    p.add_argument("--eval-max-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="llm_windows")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bad = [f for f in args.folders if not (Path(f) / "factorlm.json").is_file()]
    if bad:  # before any scoring: one line naming the folder
        sys.exit(f"error: {bad[0]} is not a saved factorlm folder (no factorlm.json)")
    rows = []
    for path in [args.model, *args.folders]:
        row = {"path": path, "label": label(path) if path != args.model else "dense", "scores": {}}
        for w in args.windows:
            c = RunConfig(task="lm", eval_text=args.eval_text, eval_seq_len=w, eval_max_tokens=args.eval_max_tokens)
            t0 = time.perf_counter()
            try:
                r = evaluate_lm(path, c, quiet=True)
            except FactorLMError as e:
                sys.exit(f"error: {path}: {e}")
            row["scores"][str(w)] = {"perplexity": r["perplexity"], "tokens_scored": r["tokens_scored"],
                                     "windows": r["windows"], "seconds": round(time.perf_counter() - t0, 1)}
            print(f"{row['label']}: windows of {w}: {r['perplexity']:.3f} ({r['tokens_scored']:,} tokens)", flush=True)
        rows.append(row)
    dense = rows[0]["scores"]
    out = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "eval_text": args.eval_text,
           "eval_max_tokens": args.eval_max_tokens, "rows": rows}
    res = HERE / "results"
    (res / f"{args.name}.json").write_text(json.dumps(out, indent=1))
    head = " | ".join(f"windows of {w}: perplexity (x dense)" for w in args.windows)
    lines = [f"# {args.name}: `python benchmarks/llm_windows.py --name {args.name} ...`", "",
             f"{args.eval_text}, the first {args.eval_max_tokens:,} tokens, non-overlapping windows; "
             f"torch {torch.__version__}, {args.threads} thread(s)", "", f"| model | {head} |",
             "|---|" + "---|" * len(args.windows)]
    for row in rows:
        cells = [f"{row['scores'][str(w)]['perplexity']:.2f} ({row['scores'][str(w)]['perplexity'] / dense[str(w)]['perplexity']:.3f}x)"
                 for w in args.windows]
        lines.append(f"| {row['label']} (`{Path(row['path']).name}`) | " + " | ".join(cells) + " |")
    (res / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
