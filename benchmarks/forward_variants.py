"""Which forward-pass changes make a factorized encoder faster (issue 13, "a faster factorized forward").

    python benchmarks/forward_variants.py                      # MiniLM-L6, keep 0.25, batch 32 x 128, 2 threads
    python benchmarks/forward_variants.py --rounds 6 --no-compile   # shorter, eager variants only

Each variant is one change to the forward of the keep-0.25 low-rank MiniLM-L6 (uniform rank 64,
truncated SVD), timed in one process against the plain factorized forward:

* ``attention eager``: transformers' eager (math) attention instead of SDPA's fused CPU kernel;
* ``GELU tanh``: the tanh approximation instead of exact erf (changes the numerics: opt-in only);
* ``fused q/k/v first factors``: q, k and v read the same input, so their three thin ``x B^T``
  GEMMs become one GEMM with the concatenated ``B`` (exact maths; prototype here, not in the library);
* ``factors pre-transposed``: ``x @ B^T`` and ``h @ A^T`` as plain matmuls with contiguous
  transposed copies (the other memory layout of the same factors);
* ``fused q/k/v + compiled + freezing``: the two together (the prototype's Python-side cache is traced
  by dynamo: graph breaks or recompiles there would show as time, not as a wrong result);
* ``rank 60`` / ``rank 72``: the same model at ranks that are not a multiple of 16 and 64 (FLOPs
  differ: the time per FLOP shows whether rounding ranks to hardware-friendly multiples pays);
* ``compiled``: ``torch.compile`` (inductor, ``dynamic=False``); ``compiled + freezing``: with
  inductor's ``freezing`` (weights folded as constants, linear weights pre-packed).  The dense model is
  compiled the same ways, so the speed-up over the *best dense configuration* is shown too.

Timing: ``--rounds`` rounds; in each, every variant is timed (``--repeats`` forwards) right beside
the plain factorized forward (which of the pair goes first alternates), the variants' order rotating
every round.  A cell's time is its median over rounds.  The speed-up of a variant over the plain
factorized forward is the median of its paired ratios, with the quartiles: when they straddle 1.00
the difference is within this machine's noise (a shared VM's neighbours make single timings swing
by 20-30% here; pairs timed seconds apart cancel most of that).  "max |d logit|"
is the largest logit difference from the plain factorized forward on the timed batch (random tokens).
bf16 variants are timed only on a CPU with native bf16 (elsewhere bf16 is emulated).
Writes results/forward_variants.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import build_dense, factorized, machine_info, set_recompile_limit  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# -- variants (each returns a new model; the inputs are never modified) ------------------------------------
def attention_eager(m):
    m = copy.deepcopy(m)
    m.config._attn_implementation = "eager"
    return m


def gelu_tanh(m):
    m = copy.deepcopy(m)
    for layer in m.bert.encoder.layer:
        layer.intermediate.intermediate_act_fn = torch.nn.GELU(approximate="tanh")
    return m


class _SharedFirstFactor:
    """q, k and v of one layer: ``x [B_q; B_k; B_v]^T`` once per input, each member takes its slice."""

    def __init__(self, members):
        self.B = torch.cat([mod.B.detach() for mod in members]).contiguous()
        self.splits = [mod.rank for mod in members]
        self.x = self.parts = None

    def part(self, x, i):
        if self.x is not x:  # the three members are called with the same tensor object
            self.x, self.parts = x, F.linear(x, self.B).split(self.splits, dim=-1)
        return self.parts[i]


def fused_qkv(m):
    m = copy.deepcopy(m)
    for layer in m.bert.encoder.layer:
        s = layer.attention.self
        members = [s.query, s.key, s.value]
        shared = _SharedFirstFactor(members)
        for i, mod in enumerate(members):
            mod.forward = lambda x, mod=mod, i=i, shared=shared: F.linear(shared.part(x, i), mod.A, mod.bias)
    return m


def pre_transposed(m):
    from factorlm.layers.lowrank import LowRankLinear

    m = copy.deepcopy(m)
    for mod in m.modules():
        if isinstance(mod, LowRankLinear):
            Bt, At = mod.B.detach().t().contiguous(), mod.A.detach().t().contiguous()
            bias = mod.bias.detach() if mod.bias is not None else None
            mod.forward = (lambda x, Bt=Bt, At=At, bias=bias:
                           torch.addmm(bias, (x.reshape(-1, x.shape[-1]) @ Bt), At).view(*x.shape[:-1], At.shape[1]))
    return m


def at_rank(dense, rank):
    from factorlm.factorize import factorize
    from factorlm.models import find_targets

    m = copy.deepcopy(dense)
    factorize(m, {name: {"rank": rank} for name in find_targets(m)}, "lowrank")
    return m.eval()


def compiled(m, freezing=False):
    m = torch.compile(copy.deepcopy(m), dynamic=False)
    m._factorlm_freezing = freezing
    return m


def first_call(m, batch):
    """Compile (and, for freezing, fold the weights) at the first call, outside the timing."""
    import torch._inductor.config as inductor_config

    old = inductor_config.freezing
    inductor_config.freezing = bool(getattr(m, "_factorlm_freezing", False))
    try:
        t0 = time.perf_counter()
        out = m(**batch).logits
        return out, time.perf_counter() - t0
    finally:
        inductor_config.freezing = old


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", type=float, default=0.25)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    args = p.parse_args()
    if args.rounds < 2:
        p.error("--rounds must be at least 2 (the quartiles of the paired ratios need two)")
    torch.set_num_threads(args.threads)
    set_recompile_limit()
    from factorlm.profiling import bf16_native, dummy_batch

    env = machine_info(args.threads)
    dense = build_dense("minilm")
    fact, info = factorized(dense, "lowrank", args.keep)
    rank = info["knob"]["rank"]
    batch = dummy_batch(dense, args.batch, args.seq, torch.device("cpu"))
    cells = {"dense": (dense, "dense, eager fp32"), "factorized": (fact, f"factorized (rank {rank}), eager fp32")}
    cells["attention eager"] = (attention_eager(fact), "transformers' eager attention instead of SDPA")
    cells["GELU tanh"] = (gelu_tanh(fact), "tanh-approximate GELU (numerics change)")
    cells["fused q/k/v first factors"] = (fused_qkv(fact), "one GEMM for the three x B^T of q, k, v")
    cells["factors pre-transposed"] = (pre_transposed(fact), "x @ B^T, h @ A^T with contiguous transposed factors")
    for r in (rank - 4, rank + 8):
        cells[f"rank {r}"] = (at_rank(dense, r), f"uniform rank {r} instead of {rank} (FLOPs differ)")
    if args.compile:
        cells["dense compiled"] = (compiled(dense), "dense, torch.compile")
        cells["dense compiled + freezing"] = (compiled(dense, True), "dense, torch.compile, inductor freezing")
        cells["compiled"] = (compiled(fact), "torch.compile (inductor, dynamic=False)")
        cells["compiled + freezing"] = (compiled(fact, True), "torch.compile, inductor freezing")
        cells["fused q/k/v + compiled + freezing"] = (compiled(fused_qkv(fact), True), "both")
    if bf16_native("cpu"):
        cells["dense bf16"] = (copy.deepcopy(dense).to(torch.bfloat16), "dense, eager bf16")
        cells["bf16"] = (copy.deepcopy(fact).to(torch.bfloat16), "factorized, eager bf16")
    rows: dict[str, dict] = {}
    with torch.inference_mode():
        ref = fact(**batch).logits.float()
        for name, (m, what) in list(cells.items()):
            try:
                out, first_s = first_call(m, batch)
            except Exception as e:  # noqa: BLE001 - a variant that does not run is reported, not fatal
                print(f"{name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                del cells[name]
                continue
            rows[name] = {"what": what, "max_abs_logit_diff": float((out.float() - ref).abs().max()),
                          "first_call_s": round(first_s, 2), "times_ms": []}
            print(f"[{time.strftime('%H:%M:%S')}] ready: {name} (first call {first_s:.1f}s)", flush=True)
        names = [n for n in cells if n != "factorized"]
        ref_model = cells["factorized"][0]
        for r in range(args.rounds):
            for i, name in enumerate(names[r % len(names):] + names[:r % len(names)]):
                pair = [("factorized", ref_model), (name, cells[name][0])]
                times = {}
                for label, m in (pair if (r + i) % 2 == 0 else pair[::-1]):
                    t0 = time.perf_counter()
                    for _ in range(args.repeats):
                        m(**batch)
                    times[label] = (time.perf_counter() - t0) / args.repeats * 1e3
                rows[name]["times_ms"].append(times[name])
                rows[name].setdefault("paired_ratios", []).append(times["factorized"] / times[name])
                rows["factorized"]["times_ms"].append(times["factorized"])
    dense_names = [n for n in rows if n.startswith("dense")]
    best_dense = min(statistics.median(rows[n]["times_ms"]) for n in dense_names if "bf16" not in n)
    for name, row in rows.items():
        ts = row["times_ms"]
        ratios = sorted(row.get("paired_ratios", [1.0, 1.0, 1.0]))
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        row.update(median_ms=round(statistics.median(ts), 1), vs_factorized=round(statistics.median(ratios), 3),
                   vs_factorized_q1=round(q1, 3), vs_factorized_q3=round(q3, 3),
                   vs_dense_eager=round(statistics.median(rows["dense"]["times_ms"]) / statistics.median(ts), 2),
                   vs_best_dense=round(best_dense / statistics.median(ts), 2))
        row["verdict"] = ("reference" if name == "factorized" else "within noise" if q1 <= 1.0 <= q3
                          else "faster" if q1 > 1.0 else "slower")
    title = (f"# Forward variants of the low-rank MiniLM-L6 (keep {args.keep}, rank {rank}), batch {args.batch} x "
             f"{args.seq}, {args.threads} threads, {env['cpu']} ({env['cpu_capability']}), "
             f"{args.rounds} rounds x {args.repeats}")
    lines = [title, "", "`python benchmarks/forward_variants.py " + " ".join(sys.argv[1:]) + "`", "",
             "| variant | what | median ms | vs plain factorized (median [q1, q3] of paired ratios) | verdict "
             "| vs dense eager | vs best dense fp32 | max abs d logit |",
             "|---|---|---:|---|---|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['what']} | {r['median_ms']:.1f} | {r['vs_factorized']:.3f}x "
                     f"[{r['vs_factorized_q1']:.3f}, {r['vs_factorized_q3']:.3f}] | {r['verdict']} | "
                     f"{r['vs_dense_eager']:.2f}x | {r['vs_best_dense']:.2f}x | {r['max_abs_logit_diff']:.1e} |")
    md = "\n".join(lines)
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "forward_variants.md").write_text(md + "\n")
    (RESULTS / "forward_variants.json").write_text(json.dumps({"env": env, "args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
