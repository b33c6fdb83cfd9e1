"""Issue 31: why GPTQ does not beat round-to-nearest on SmolLM2-135M here (BENCHMARKS.md, "Decoder LLMs at
equal bytes").  Three explanations, each measured:

1. *domain*: GPTQ fits the calibration text (convention speeches) and is judged on hamlet.  The table
   therefore gives perplexity on hamlet and on 16,384 held-out convention tokens (the calibration windows
   are drawn from the rest of that stream);
2. *order*: the benchmark's GPTQ takes every Gram from the dense model (``none``); the reference quantizes
   sequentially, each layer's Gram from the already-quantized layers below (``layer``);
3. *activation order*: the reference's ``--act-order`` (columns by descending Gram diagonal, static groups).

Perplexity on the first 8,192 tokens of each text (half of ``llm_quant.py``'s 16,384, for time), so the
hamlet column is not that table's.  Per layer it also gives the geometric mean over the 210 targets of GPTQ's output error over RTN's,
``tr((W - Q) H (W - Q)^T)``, under the calibration Gram (what GPTQ minimises) and under hamlet's Gram.

    python benchmarks/llm_gptq_diag.py --threads 1      # resumable: rows in results/llm_gptq_diag.json

Setup as ``benchmarks/llm_quant.py``: fp32 compute, windows of 256, calibration 128 x 256 tokens (seed 0).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from factorlm.data.text import calibration_blocks, read_documents, token_stream  # noqa: E402
from factorlm.decompose.gptq import gptq, output_error  # noqa: E402
from factorlm.decompose.quantize import quantize_groups  # noqa: E402
from factorlm.lm.calibrate import stream, token_batches  # noqa: E402
from factorlm.lm.load import load_causal_lm  # noqa: E402
from factorlm.lm.methods import get_lm_method  # noqa: E402
from factorlm.lm.perplexity import perplexity  # noqa: E402
from factorlm.models.surgery import find_targets, get_module  # noqa: E402

OUT = HERE / "results" / "llm_gptq_diag.json"
SETTINGS = ((3, 32, True), (4, 192, True))
VARIANTS = ("rtn", "gptq-none", "gptq-none-act", "gptq-layer")
HELD = 8192  # tokens scored per text (a perplexity pass of 16,384 tokens is ~4 min on one AVX2 thread)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tables-only", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res = json.loads(OUT.read_text()) if OUT.is_file() else {"rows": {}}
    if not a.tables_only:
        run(res)
    table(res)


def grams(model, targets, blocks) -> dict[str, torch.Tensor]:
    method = get_lm_method("whiten", {})
    out = {}

    def on_group(i, names, stats):
        for n in names:
            out[n] = method.scale(stats).gram.double()

    stream(model, targets, token_batches(blocks, 8), method.make_stats, on_group, mode="none")
    return out


def run(res: dict) -> None:
    model, tok, _ = load_causal_lm("smollm2", dtype=torch.float32)
    targets = find_targets(model, conv1d=True)
    ham = token_stream(tok, read_documents("hamlet"))[:HELD]
    conv = token_stream(tok, read_documents("convention"))
    held, rest = conv[-HELD:], conv[:-HELD]
    cal = calibration_blocks(rest, 256, 128, 0)
    dense_w = {n: get_module(model, n).weight.detach().clone() for n in targets}

    def ppls():
        return {"hamlet": perplexity(model, ham, seq_len=256, batch_size=4)["perplexity"],
                "convention_heldout": perplexity(model, held, seq_len=256, batch_size=4)["perplexity"]}

    def save():
        OUT.write_text(json.dumps(res, indent=1) + "\n")

    def restore():
        for n in targets:
            get_module(model, n).weight.data.copy_(dense_w[n])

    res["setup"] = {"evaluation": f"hamlet.txt first {HELD:,} tokens; the last {HELD:,} convention tokens (held out)",
                    "calibration": "128 x 256 tokens of the other convention tokens, seed 0", "windows": 256}
    if "dense" not in res:
        res["dense"] = ppls()
        save()
    todo = [(s, v) for s in SETTINGS for v in VARIANTS if f"int{s[0]}-g{s[1]}-zp/{v}" not in res["rows"]]
    if not todo:
        return
    t0 = time.perf_counter()
    G_cal, G_ham = grams(model, targets, cal), grams(model, targets, calibration_blocks(ham, 256, None))
    print(f"grams {time.perf_counter() - t0:.0f}s", flush=True)
    for (bits, group, zp), v in todo:
        k = f"int{bits}-g{group}-zp/{v}"
        t0 = time.perf_counter()
        act = v.endswith("-act")
        if v == "rtn":
            for n in targets:
                get_module(model, n).weight.data.copy_(quantize_groups(dense_w[n], bits, group, zp)[3])
        elif v.startswith("gptq-none"):
            for n in targets:
                get_module(model, n).weight.data.copy_(
                    gptq(dense_w[n], G_cal[n], bits, group, zero_point=zp, act_order=act)[3])
        else:  # sequential: each group's Gram from the model whose lower layers are already quantized
            method = get_lm_method("whiten", {})

            def on_group(i, names, stats):
                for n in names:
                    W = get_module(model, n).weight
                    W.data.copy_(gptq(dense_w[n], method.scale(stats).gram, bits, group, zero_point=zp,
                                      act_order=act)[3])

            stream(model, targets, token_batches(cal, 8), method.make_stats, on_group, mode="layer")
        fit_s = time.perf_counter() - t0
        W_hat = {n: get_module(model, n).weight.detach().clone() for n in targets}
        row = {"bits": bits, "group": group, "zero_point": zp, "variant": v, "fit_s": round(fit_s, 1), **ppls()}
        if v != "rtn":
            base = {n: quantize_groups(dense_w[n], bits, group, zp)[3] for n in targets}
            for name, G in (("cal", G_cal), ("hamlet", G_ham)):
                logs = [math.log(output_error(dense_w[n], W_hat[n], G[n]) / output_error(dense_w[n], base[n], G[n]))
                        for n in targets]
                row[f"err_vs_rtn_{name}"] = math.exp(sum(logs) / len(logs))
        restore()
        res["rows"][k] = row
        save()
        print(k, {a: (round(b, 3) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)


def table(res: dict) -> None:
    d = res["dense"]
    lines = [f"dense perplexity: hamlet {d['hamlet']:.2f}, held-out convention {d['convention_heldout']:.2f}; "
             f"{res['setup']['calibration']}; windows of 256", "",
             "| grid | quantizer | hamlet (x dense) | held-out convention (x dense) | layer error vs RTN, calibration Gram | "
             "same, hamlet Gram | fit s |", "|---|---|---|---|---|---|---|"]
    for k, r in res["rows"].items():
        g, v = k.split("/")
        e1 = f"{r['err_vs_rtn_cal']:.3f}" if "err_vs_rtn_cal" in r else "1"
        e2 = f"{r['err_vs_rtn_hamlet']:.3f}" if "err_vs_rtn_hamlet" in r else "1"
        lines.append(f"| {g} | {v} | {r['hamlet']:.2f} ({r['hamlet'] / d['hamlet']:.2f}x) | "
                     f"{r['convention_heldout']:.2f} ({r['convention_heldout'] / d['convention_heldout']:.2f}x) | "
                     f"{e1} | {e2} | {r['fit_s']:.0f} |")
    lines.append("\nlayer error: geometric mean over the 210 targets of tr((W-Q) H (W-Q)^T) over RTN's; "
                 "command: `python benchmarks/llm_gptq_diag.py --threads 1`")
    (HERE / "results" / "llm_gptq_diag.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
