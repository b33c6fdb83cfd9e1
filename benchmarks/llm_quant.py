"""Issue 31: low rank that adds to quantization.  SmolLM2-135M perplexity against the stored bytes of the
210 target matrices, for round-to-nearest quantization alone and RTN + a whitened low-rank correction of
its error (EoRA-style, :mod:`factorlm.decompose.quantize`), beside today's pure low rank.

    python benchmarks/llm_quant.py            # resumable: rows cached in results/llm_quant.json
    python benchmarks/llm_quant.py --tables-only

Setup as ``benchmarks/llm.py --eval-max-tokens 16384`` (the first 16,384 tokens of hamlet.txt, non-overlapping windows of 256; calibration
128 seeded windows x 256 tokens of the convention speeches; fp32 compute).  Quantization: symmetric RTN,
one bf16 scale per group of input channels (torchao's affine primitives).  Correction: rank ``r`` per
matrix whose factors' bytes are the row's share of the matrix's bf16 bytes (rounded down), fitted to the *dense* model's calibration inputs (one pass, SVD-LLM's "none" order);
factors stored bf16, or int8 in groups of 32 (``c8``: half the bytes, so twice the rank).  Bytes are
counted as stored: codes + scales + factors, against the targets' bf16 bytes (2 per weight).  One
calibration seed (the quantizer itself has no randomness).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from factorlm.data.text import calibration_blocks, read_documents, token_stream  # noqa: E402
from factorlm.decompose.gptq import gptq  # noqa: E402
from factorlm.decompose.quantize import error_correction, quantize_groups, rtn, rtn_bytes  # noqa: E402
from factorlm.lm.calibrate import stream, token_batches  # noqa: E402
from factorlm.lm.load import load_causal_lm  # noqa: E402
from factorlm.lm.methods import get_lm_method  # noqa: E402
from factorlm.lm.perplexity import perplexity  # noqa: E402
from factorlm.models.surgery import find_targets, get_module  # noqa: E402

OUT = HERE / "results" / "llm_quant.json"
ROWS = [  # (bits, group, correction share of the bf16 weights, correction factor bits, whitened[, quantizer, zero point])
    (8, 64, 0, 16, True), (4, 32, 0, 16, True), (4, 64, 0, 16, True), (4, 192, 0, 16, True),
    (3, 32, 0, 16, True), (3, 64, 0, 16, True), (3, 192, 0, 16, True), (2, 64, 0, 16, True),
    (3, 192, 0.05, 16, True), (3, 192, 0.05, 16, False), (3, 192, 0.05, 8, True), (3, 64, 0.05, 8, True),
    (4, 192, 0.02, 8, True), (2, 64, 0.05, 8, True), (2, 64, 0.1, 8, True),
    (3, 32, 0.03, 8, True), (3, 64, 0.045, 8, True), (4, 192, 0.01, 8, True),
    (4, 64, 0.02, 8, True), (3, 32, 0.02, 8, True),
]
# issue 31 item 2c: the calibrated quantizer (GPTQ on RTN's grid, decompose/gptq.py) and the zero-point grid,
# alone and under the same corrections (GPTQ + whitened correction = EoRA as published)
# gptq + zero point: the full sweep; the other two settings at the points that matter (ablations)
ROWS += [(b, g, 0, 16, True, "gptq", True) for b, g in ((4, 32), (4, 64), (4, 192), (3, 32), (3, 64), (3, 192), (2, 64))]
ROWS += [(b, g, c, 8, True, "gptq", True) for b, g, c in ((4, 192, 0.01), (4, 192, 0.02), (4, 64, 0.02), (3, 32, 0.03),
                                                         (3, 64, 0.045), (3, 192, 0.05), (2, 64, 0.05), (2, 64, 0.1))]
ROWS += [(b, g, 0, 16, True, "rtn", True) for b, g in ((4, 64), (4, 192), (3, 32), (3, 64))]
ROWS += [(b, g, c, 8, True, "rtn", True) for b, g, c in ((4, 192, 0.01), (4, 192, 0.02), (3, 32, 0.03), (3, 64, 0.045))]
# session 40: the zero-point grid at <= 0.25 of the bytes (which int3 group, with its correction, fills 0.25),
# int3-g192-zp alone (<= 0.20), and symmetric int3-g32 + 1% beside int3-g64-zp + 2% (equal bytes ~0.23)
ROWS += [(3, 64, 0.039, 8, True, "rtn", True), (3, 32, 0.016, 8, True, "rtn", True)]
# GPTQ with the reference's act-order (static groups): benchmarks/llm_gptq_diag.py found it the one GPTQ
# setting that beats RTN here (int3-g32-zp: 1.99x vs 2.18x on hamlet, 1.44x vs 2.18x on held-out convention)
ROWS += [(4, 192, 0, 16, True, "gptq-act", True), (3, 64, 0, 16, True, "gptq-act", True),
         (3, 64, 0.039, 8, True, "gptq-act", True), (4, 192, 0.01, 8, True, "gptq-act", True)]
ROWS += [(3, 192, 0.055, 8, True, "rtn", True), (3, 64, 0.02, 8, True, "rtn", True), (3, 32, 0.01, 8, True, "rtn", False),
         (3, 192, 0, 16, True, "rtn", True)]
ROWS += [(b, g, 0, 16, True, "gptq", False) for b, g in ((4, 192), (3, 32))]
ROWS += [(b, g, c, 8, True, "gptq", False) for b, g, c in ((4, 192, 0.02), (3, 32, 0.03))]

# session 40: --byte-plan global (factorlm.ranks.byte_plan): each matrix's grid among int8-g192 and int4 / int3
# with zero points in groups of 192 / 64 / 32, and its correction rank (int8 factors), from one byte budget priced
# by the output-sensitivity weighted whitened error; "int4-g192-zp" = that grid only (global correction ranks)
PLAN_GRIDS = {"all": [(8, 192, False)] + [(b, g, True) for b in (4, 3) for g in (192, 64, 32)],
              "int4-g192-zp": [(4, 192, True)]}
PLAN_GRIDS["all-gptq-act"] = PLAN_GRIDS["all"]  # the same grids, GPTQ's codes (act-order) priced and stored
PLAN_ROWS = [(0.25, "all"), (0.267, "all"), (0.267, "int4-g192-zp"), (0.234, "all"), (0.21, "all"),
             (0.25, "all-gptq-act"), (0.234, "all-gptq-act"), (0.20, "all"), (0.20, "all-gptq-act")]


def plan_key(keep, grids):
    return f"plan{keep:g}-{grids}-c8"


def key(bits, group, corr, cbits, white, quantizer="rtn", zero_point=False):
    k = f"int{bits}-g{group}" + ("-zp" if zero_point else "") + {"gptq": "-gptq", "gptq-act": "-gptq-act"}.get(quantizer, "")
    if corr:
        k += f"+corr{corr:g}-{'c8' if cbits == 8 else 'bf16'}-{'white' if white else 'plain'}"
    return k


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tables-only", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res = json.loads(OUT.read_text()) if OUT.is_file() else {"rows": {}}
    if not a.tables_only:
        run(res)
    write_table(res)


def run(res: dict) -> None:
    model, tok, _ = load_causal_lm("smollm2", dtype=torch.float32)
    targets = find_targets(model, conv1d=True)
    ev = token_stream(tok, read_documents("hamlet"))[:16384]  # as benchmarks/llm.py --eval-max-tokens 16384
    cal = calibration_blocks(token_stream(tok, read_documents("convention")), 256, 128, 0)
    dense_w = {n: get_module(model, n).weight.detach().clone() for n in targets}
    numel = sum(w.numel() for w in dense_w.values())
    res["setup"] = {"targets": len(targets), "target_weights": numel, "bf16_bytes": 2 * numel,
                    "evaluation": f"hamlet.txt, {len(ev):,} tokens, windows of 256",
                    "calibration": "convention speeches, 128 x 256 tokens, dense-model inputs"}

    def ppl():
        return perplexity(model, ev, seq_len=256, batch_size=4)["perplexity"]

    def save():
        OUT.write_text(json.dumps(res, indent=1) + "\n")

    if "dense" not in res:
        res["dense"] = ppl()
        save()
    todo = [r for r in ROWS if key(*r) not in res["rows"]]
    plans = [p for p in PLAN_ROWS if plan_key(*p) not in res["rows"]]
    if not todo and not plans:
        return
    scales = {}
    if plans or any(r[2] or (len(r) > 5 and r[5].startswith("gptq")) for r in todo):
        method = get_lm_method("whiten", {})
        t0 = time.perf_counter()

        def on_group(i, names, stats):
            s = method.scale(stats)
            for n in names:
                scales[n] = s

        stream(model, targets, token_batches(cal, 8), method.make_stats, on_group, mode="none")
        print(f"calibration {time.perf_counter() - t0:.0f}s", flush=True)
    if plans:  # first: the rows this session is about
        run_plans(res, plans, model, targets, dense_w, scales, cal, numel, ppl, save)
    for row in todo:
        bits, group, corr, cbits, white, quantizer, zp = (*row, "rtn", False)[:7]
        k = key(*row)
        t0 = time.perf_counter()
        nbytes, ranks = 0, []
        for n in targets:
            W = dense_w[n]
            out, inp = W.shape
            if quantizer.startswith("gptq"):  # every Gram from the dense model, as the corrections here
                W_hat = gptq(W, scales[n].gram, bits, group, zero_point=zp, act_order=quantizer == "gptq-act")[3]
            else:
                W_hat = quantize_groups(W, bits, group, zp)[3]
            nbytes += rtn_bytes((out, inp), bits, group, zp)
            if corr:
                per_rank = (out + inp) * (2 if cbits == 16 else (1 + 2 / 32))  # bytes of one rank
                r = int(corr * 2 * out * inp / per_rank)
                if r:
                    W_hat = corrected(W, W_hat, r, scales[n] if white else None, cbits)
                    nbytes += int(r * per_rank)
                ranks.append(r)
            get_module(model, n).weight.data.copy_(W_hat)
        fit_s = time.perf_counter() - t0
        p = ppl()
        for n in targets:
            get_module(model, n).weight.data.copy_(dense_w[n])
        res["rows"][k] = {"bits": bits, "group": group, "quantizer": quantizer, "zero_point": zp, "correction": corr, "factor_bits": cbits if corr else None,
                          "whitened": white if corr else None, "bytes": nbytes, "bytes_vs_bf16": nbytes / (2 * numel),
                          "perplexity": p, "ratio": p / res["dense"], "ranks": [min(ranks), max(ranks)] if ranks else None,
                          "fit_s": round(fit_s, 1)}
        save()
        print(f"{k}: bytes {nbytes / (2 * numel):.3f} of bf16, perplexity {p:.2f} ({p / res['dense']:.2f}x)", flush=True)




def corrected(W, W_hat, r, scale, cbits):
    """``W_hat`` plus the rank-``r`` correction of its error under ``scale`` (None: plain SVD), the factors on
    an int8 grid in groups of 32 along the output / input (``cbits=8``) or kept as they are (16)."""
    A, B = error_correction(W, W_hat, r, scale)
    if cbits == 8:
        A = rtn(A.T.contiguous(), 8, 32)[2].T
        B = rtn(B, 8, 32)[2]
    return W_hat + A @ B


def run_plans(res, plans, model, targets, dense_w, scales, cal, numel, ppl, save) -> None:
    """The ``--byte-plan global`` rows: one output-sensitivity pass, the grids' whitened error spectra, then
    per row the plan and the same quantize + correct loop as the rows above."""
    from factorlm.lm.calibrate import output_sensitivity
    from factorlm.lm.methods import QuantSpec
    from factorlm.lm.plan import grid_options
    from factorlm.ranks.byte_plan import byte_plan, plan_loss

    t0 = time.perf_counter()
    lam = output_sensitivity(model, targets, token_batches(cal, 8))
    labels = {label for _, label in plans}
    specs = {label: [QuantSpec(b, g, 8, zp, label.endswith("gptq-act"), 0.01, label.endswith("gptq-act"))
                     for b, g, zp in grids] for label, grids in PLAN_GRIDS.items() if label in labels}
    options = {label: {n: grid_options(dense_w[n], scales[n], lam[n], sp, 2, gram=scales[n].gram) for n in targets}
               for label, sp in specs.items()}
    prep_s = time.perf_counter() - t0
    print(f"byte plan: sensitivity and spectra {prep_s:.0f}s", flush=True)
    for keep, label in plans:
        k = plan_key(keep, label)
        t0 = time.perf_counter()
        plan = byte_plan(options[label], keep * 2 * numel)
        nbytes, grids, ranks = 0, {}, []
        for n in targets:
            qi, r = plan[n]
            q = specs[label][qi]
            W = dense_w[n]
            out, inp = W.shape
            if q.gptq:
                W_hat = gptq(W, scales[n].gram, q.bits, q.group_size, zero_point=q.zero_point, act_order=q.act_order)[3]
            else:
                W_hat = quantize_groups(W, q.bits, q.group_size, q.zero_point)[3]
            nbytes += rtn_bytes((out, inp), q.bits, q.group_size, q.zero_point)
            if r:
                W_hat = corrected(W, W_hat, r, scales[n], 8)
                nbytes += int(r * (out + inp) * (1 + 2 / 32))
            g = f"int{q.bits}-g{q.group_size}" + ("-zp" if q.zero_point else "")
            grids[g] = grids.get(g, 0) + 1
            ranks.append(r)
            get_module(model, n).weight.data.copy_(W_hat)
        fit_s = time.perf_counter() - t0
        p = ppl()
        for n in targets:
            get_module(model, n).weight.data.copy_(dense_w[n])
        res["rows"][k] = {"plan": label, "keep": keep, "grids": grids, "correction": "global", "factor_bits": 8,
                          "whitened": True, "quantizer": "gptq-act" if label.endswith("gptq-act") else "rtn", "bytes": nbytes, "bytes_vs_bf16": nbytes / (2 * numel),
                          "perplexity": p, "ratio": p / res["dense"], "ranks": [min(ranks), max(ranks)],
                          "estimated_loss": plan_loss(options[label], plan), "fit_s": round(fit_s, 1),
                          "plan_prep_s": round(prep_s, 1)}
        save()
        print(f"{k}: bytes {nbytes / (2 * numel):.3f} of bf16, perplexity {p:.2f} ({p / res['dense']:.2f}x), "
              f"grids {grids}", flush=True)


def write_table(res: dict) -> None:
    dense = res.get("dense")
    rows = sorted(res["rows"].items(), key=lambda kv: kv[1]["bytes_vs_bf16"])
    lines = [f"dense perplexity {dense:.2f}; {res['setup']['evaluation']}; calibration {res['setup']['calibration']}",
             "", "| weights of the 210 targets | bytes vs bf16 | perplexity | vs dense | correction ranks |",
             "|---|---|---|---|---|"]
    for k, r in rows:
        rk = f"{r['ranks'][0]}-{r['ranks'][1]}" if r.get("ranks") else "-"
        if r.get("plan"):  # the grids the plan chose, with how many of the 210 targets each
            rk += " on " + ", ".join(f"{g} x{c}" for g, c in sorted(r["grids"].items(), key=lambda t: -t[1]))
        lines.append(f"| {k} | {r['bytes_vs_bf16']:.3f} | {r['perplexity']:.2f} | {r['ratio']:.2f}x | {rk} |")
    lines.append("\ncommand: `python benchmarks/llm_quant.py` (one thread)")
    (HERE / "results" / "llm_quant.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    frontier_png(res, HERE / "results" / "llm_frontier.png")


def lowrank_points() -> list[tuple[str, float, float]]:
    """Pure low rank (bf16 factors) from ``results/llm.json``: (label, bytes vs bf16 = kept weights, ratio)."""
    f = HERE / "results" / "llm.json"
    if not f.is_file():
        return []
    r = json.loads(f.read_text())
    total = r["setup"]["target_weights"]
    out = []
    for k, v in r["rows"].items():
        if v.get("method") == "whiten" and not v.get("heal") and v.get("seq") == "layer" and \
                v.get("policy") in ("uniform", "global-fisher"):
            out.append((f"whiten {v['policy']}", v["target_weights"] / total, v["ratio"]))
    return out


#: folders of saved ``factorlm compress --task lm`` reports (``factorlm.json`` copies) drawn on the frontier
CLI_RUNS = ("llm_refine", "llm_kfac")


def cli_points() -> dict[str, list[tuple[str, float, float]]]:
    """SmolLM2-135M runs of the CLI saved under ``results/{llm_refine,llm_kfac}/*.json`` (hamlet, 16,384 tokens,
    windows of 256, as this script): one point per (method, keep, refine steps, options), the mean ratio over its
    calibration seeds (``n=`` in the label).  Pure low rank counts its kept weights (bf16 factors, as
    ``lowrank_points``), a quantizing method its reported ``target_bytes_vs_bf16``."""
    cells: dict[tuple, list] = {}
    for d in CLI_RUNS:
        for f in sorted((HERE / "results" / d).glob("*.json")):
            r = json.loads(f.read_text())
            rc, acc, sc = r["recipe"], r["accounting"], r["scores"]
            if "SmolLM2" not in str(r.get("base_model", "")) and rc.get("model") != "smollm2":
                continue
            if rc.get("eval_text") != "hamlet" or rc.get("eval_max_tokens") != 16384 or rc.get("eval_seq_len") != 256:
                continue
            quant = "quantized" in acc
            x = acc["target_bytes_vs_bf16"] if quant else acc["target_weights_after"] / acc["target_weights_before"]
            short = {"gptq_act_order": "act", "correction_space": "corr", "grad_batches": "gb"}
            opts = ",".join(f"{short.get(k, k)}={v}".replace("act=True", "act") for k, v in
                            sorted(rc["method_options"].items()) if k != "byte_plan")
            if rc.get("refine_loss", "mse") != "mse":
                opts += (",", "")[not opts] + f"refine={rc['refine_loss']}"
            key = (r["method"], rc["keep"], rc["refine_steps"], rc["rank_policy"], opts, quant)
            cells.setdefault(key, []).append((x, sc["final"]["perplexity"] / sc["dense"]["perplexity"]))
    out: dict[str, list] = {"CLI runs: low rank (refined: +r)": [], "CLI runs: quantization + correction (refined: +r)": []}
    for (m, keep, refine, policy, opts, quant), v in sorted(cells.items()):
        label = f"{m} {keep}" + (f" {policy}" if not quant else "") + (f" {opts}" if opts else "") + \
            (f" +r{refine}" if refine else "") + (f" n={len(v)}" if len(v) > 1 else "")
        g = "CLI runs: quantization + correction (refined: +r)" if quant else "CLI runs: low rank (refined: +r)"
        out[g].append((label, sum(x for x, _ in v) / len(v), sum(y for _, y in v) / len(v)))
    return out


def frontier_png(res: dict, dst: Path) -> None:
    """Perplexity (x dense, log) against the targets' stored bytes (share of bf16): RTN alone, RTN + whitened
    correction, pure low rank; the best point at or below each byte level circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {"RTN alone": [], "RTN + whitened correction": [], "RTN + plain-SVD correction": [],
              "GPTQ alone": [], "GPTQ + whitened correction (EoRA)": [],
              "byte plan (grid + rank per matrix)": [], "byte plan, GPTQ act-order codes": []}
    for k, r in res["rows"].items():
        if r.get("plan"):
            g = "byte plan, GPTQ act-order codes" if r["quantizer"] == "gptq-act" else "byte plan (grid + rank per matrix)"
        elif str(r.get("quantizer")).startswith("gptq"):
            g = "GPTQ alone" if not r["correction"] else "GPTQ + whitened correction (EoRA)"
        else:
            g = "RTN alone" if not r["correction"] else ("RTN + whitened correction" if r["whitened"] else
                                                           "RTN + plain-SVD correction")
        groups[g].append((k, r["bytes_vs_bf16"], r["ratio"]))
    groups["low rank (whiten, bf16 factors)"] = lowrank_points()
    groups.update(cli_points())
    marks = {"RTN alone": "s", "RTN + whitened correction": "o", "RTN + plain-SVD correction": "x",
             "GPTQ alone": "D", "GPTQ + whitened correction (EoRA)": "P", "low rank (whiten, bf16 factors)": "^",
             "byte plan (grid + rank per matrix)": "*", "byte plan, GPTQ act-order codes": "X",
             "CLI runs: low rank (refined: +r)": "v", "CLI runs: quantization + correction (refined: +r)": "h"}
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [1, 1.25]})
    pts = []
    for g, rows in groups.items():
        rows = [r for r in rows if r[2] < 1e3]
        if not rows:
            continue
        for a in (ax, zoom):
            a.scatter([r[1] for r in rows], [r[2] for r in rows], marker=marks[g], label=g, s=40)
        for k, x, y in rows:
            label = k.replace("+corr", "+").replace("-white", "")
            if x > 0.32 or g.startswith(("low rank", "CLI runs: low")):
                ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            if 0.18 <= x <= 0.32 and y <= 3.2:
                zoom.annotate(label, (x, y), fontsize=6.5, xytext=(3, 2), textcoords="offset points")
        pts += rows
    best = []
    for k, x, y in sorted(pts, key=lambda t: t[1]):
        if not best or y < best[-1][2]:
            best.append((k, x, y))
    for a in (ax, zoom):
        a.plot([b[1] for b in best], [b[2] for b in best], "k--", lw=0.8, label="best at or below each size")
        a.scatter([b[1] for b in best], [b[2] for b in best], s=160, facecolors="none", edgecolors="k")
        a.set_yscale("log")
        a.set_xlabel("stored bytes of the 210 target matrices / their bf16 bytes")
        a.grid(True, which="both", alpha=0.3)
    ax.set_ylabel("perplexity / dense (hamlet, 16,384 tokens, windows of 256)")
    ax.set_title(f"SmolLM2-135M at equal bytes (dense perplexity {res['dense']:.1f})")
    ax.legend(fontsize=8)
    zoom.set_xlim(0.18, 0.32)
    zoom.set_ylim(1.0, 3.2)
    zoom.set_title("zoom: 0.18-0.32 of the bytes, up to 3.2x dense")
    fig.tight_layout()
    fig.savefig(dst, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
