"""Issue 31 item 1c: the learning rate of ``--refine-steps`` (per-block refinement, :mod:`factorlm.lm.refine`).

    python benchmarks/llm_refine_lr.py 1e-4 1e-3 3e-3     # ~3 min per rate on one AVX2 core

SmolLM2-135M (fp32), the targets of blocks 0-1 as rtn-lowrank int3-g64-zp + a 3.9% int8 correction
(``--sequential layer``), 32 refinement steps per block on 128 x 256 convention windows in batches of 8;
prints each block's relative output error (held-out batches) before and after, and the seconds.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from factorlm.data.text import calibration_blocks, read_documents, token_stream  # noqa: E402
from factorlm.lm.calibrate import token_batches  # noqa: E402
from factorlm.lm.factorize import factorize  # noqa: E402
from factorlm.lm.load import load_causal_lm  # noqa: E402
from factorlm.lm.methods import QuantSpec, get_lm_method, rank_bytes  # noqa: E402
from factorlm.lm.refine import RefineSpec  # noqa: E402
from factorlm.models.surgery import find_targets, get_module, linear_shape  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    rates = [float(x) for x in sys.argv[1:]] or [1e-4, 1e-3, 3e-3]
    model, tok, _ = load_causal_lm("smollm2", dtype=torch.float32)
    cal = calibration_blocks(token_stream(tok, read_documents("convention")), 256, 128, 0)
    batches = token_batches(cal, 8)
    targets = [t for t in find_targets(model, conv1d=True) if any(f"layers.{i}." in t for i in range(2))]
    method = get_lm_method("rtn-lowrank", {})
    q = QuantSpec(3, 64, 8, True)
    ranks = {}
    for n in targets:
        o, i = linear_shape(get_module(model, n))
        ranks[n] = int(0.039 * 2 * o * i // rank_bytes(o, i, 8, 4))
    for lr in rates:
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        info = factorize(m, targets, ranks, method, batches, mode="layer", quant=q, refine=RefineSpec(32, lr))
        rows = [(b["block"], b["error_before"], b["error_after"], b["seconds"]) for b in info["refine"]["blocks"]]
        print(f"lr {lr:g}: {time.perf_counter() - t0:.0f}s; (block, error before, after, s) {rows}", flush=True)


if __name__ == "__main__":
    main()
