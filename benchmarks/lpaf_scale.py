"""Issue 30, item 5: the cost of LPAF's sparsity-aware fit (step 2) at the paper's size (BERT-base:
768 x 768 attention matrices, 3072 x 768 / 768 x 3072 feed-forward ones, keep 0.25), against plain SVD,
and how far EM's weighted error has fallen after t iterations -- to choose a stopping rule that ends EM
when the error stops falling instead of running the 1000-iteration cap.

Omega is built as LPAF builds it from first-order (PLATON-like) scores: ``s = |W * G|`` with a
heavy-tailed ``G`` (log-normal magnitudes, as trained gradients' products span 3-4 decades), the 75%
lowest-scored entries pruned with their scores set to 1e-10 of the largest (what PLATON leaves on
MiniLM), normalised ``s / max s`` (``normalized_scores``).  W is Gaussian with std 0.04.  Timings: one
thread (``--threads``), float32, the machine in each row; GPU rows when CUDA is present.

    python benchmarks/lpaf_scale.py              # -> results/lpaf_scale.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {"attention 768x768": (768, 768), "FFN up 3072x768": (3072, 768), "FFN down 768x3072": (768, 3072)}
KEEP = 0.25
# BERT-base's 72 target matrices: per layer 4 attention (768x768) + 1 up + 1 down
PER_MODEL = {"attention 768x768": 48, "FFN up 3072x768": 12, "FFN down 768x3072": 12}


def cpu_name() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def omega_for(W: torch.Tensor, seed: int) -> torch.Tensor:
    from factorlm.decompose import normalized_scores

    g = torch.Generator().manual_seed(seed)
    G = torch.randn(W.shape, generator=g) * torch.exp(1.5 * torch.randn(W.shape, generator=g))
    s = (W * G).abs()
    thr = torch.quantile(s.flatten()[torch.randperm(s.numel(), generator=g)[:200_000]], 1 - KEEP)
    s = torch.where(s >= thr, s, s * 0 + 1e-10 * float(s.max()))
    return normalized_scores(s)


def run(shape: tuple[int, int], device: str, iters: int, seed: int = 0) -> dict:
    from factorlm.decompose import truncated_svd, weighted_svd_em
    from factorlm.decompose.weighted_svd import _iterate  # noqa: F401 - the stopping rule under test

    out, inn = shape
    rank = int(KEEP * out * inn / (out + inn))
    g = torch.Generator().manual_seed(seed)
    W = (0.04 * torch.randn(shape, generator=g)).to(device)
    Om = omega_for(W.cpu(), seed).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    A, B = truncated_svd(W, rank)
    sync()
    t_svd = time.perf_counter() - t0
    t0 = time.perf_counter()
    A, B, hist = weighted_svd_em(W, Om, rank, iters=iters, tol=0.0, solver="subspace", plateau=0.0)
    sync()
    t_em = time.perf_counter() - t0
    t0 = time.perf_counter()  # the default now: LPAF's step 2 as it runs (plateau rule)
    _, _, hist_d = weighted_svd_em(W, Om, rank, solver="subspace")
    sync()
    t_default = time.perf_counter() - t0
    J0, Jend = hist[0], hist[-1]
    gain = J0 - Jend
    reach = {}
    for frac in (0.5, 0.9, 0.95, 0.99):
        t = next(i for i, j in enumerate(hist) if J0 - j >= frac * gain)
        reach[f"{frac:g}"] = t
    # the rule now (relative per-iteration decrease <= 1e-4) and windowed rules: stop at the first t
    # where the last `win` iterations lowered J by at most `frac` of what EM has gained so far
    rules = {"per-step tol 1e-4 (before)": next((t for t in range(1, len(hist)) if hist[t - 1] - hist[t] <= 1e-4 * hist[t - 1]), iters)}
    for win, frac in ((20, 0.01), (50, 0.01), (20, 0.02)):
        stop = next((t for t in range(win, len(hist)) if hist[t - win] - hist[t] <= frac * (J0 - hist[t])), iters)
        rules[f"window {win}, {frac:g} of the gain"] = stop
    rel = {name: round((J0 - hist[t]) / gain, 4) if gain > 0 else 1.0 for name, t in rules.items()}
    err_svd = float((W - (truncated_svd(W, rank)[0] @ truncated_svd(W, rank)[1])).norm() / W.norm())
    err_em = float((W - A @ B).norm() / W.norm())
    return {"shape": shape, "rank": rank, "device": device, "iters": iters, "svd_s": round(t_svd, 3),
            "em_s": round(t_em, 2), "em_s_per_iter": round(t_em / max(1, len(hist) - 1), 4),
            "J_over_J_svd_at_end": round(Jend / J0, 4), "default_s": round(t_default, 2),
            "default_iters": len(hist_d) - 1, "default_share_of_gain": round((J0 - hist_d[-1]) / gain, 4) if gain > 0 else 1.0, "iters_to_fraction_of_gain": reach,
            "stop_at": rules, "fraction_of_gain_at_stop": rel,
            "rel_error_svd": round(err_svd, 4), "rel_error_em": round(err_em, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for dev in devices:
        for name in args.shapes:
            r = run(SHAPES[name], dev, args.iters)
            r.update(name=name, machine=(torch.cuda.get_device_name(0) if dev == "cuda" else f"{cpu_name()}, {args.threads} thread(s)"))
            rows.append(r)
            print(json.dumps(r), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lpaf_scale.json").write_text(json.dumps(rows, indent=1))
    rules = list(rows[0]["stop_at"])
    lines = ["| matrix | rank | machine | SVD s | EM s / iter | 1000 iters s | J/J_svd @1000 | iters to 50/90/99% of the gain | "
             + " | ".join(f"stop: {r} (iter, share of gain)" for r in rules) + " | default now: s, iters, share of gain |",
             "|---|---|---|---|---|---|---|---|" + "---|" * (len(rules) + 1)]
    for r in rows:
        reach = r["iters_to_fraction_of_gain"]
        lines.append(f"| {r['name']} | {r['rank']} | {r['machine']} | {r['svd_s']} | {r['em_s_per_iter']} | {r['em_s']} | "
                     f"{r['J_over_J_svd_at_end']} | {reach['0.5']} / {reach['0.9']} / {reach['0.99']} | "
                     + " | ".join(f"{r['stop_at'][k]}, {r['fraction_of_gain_at_stop'][k]:.2f}" for k in rules)
                     + f" | {r['default_s']}, {r['default_iters']}, {r['default_share_of_gain']:.2f} |")
    lines.append("")
    for key, what in (("em_s", "at the 1000-iteration cap (the default before)"), ("default_s", "with the default now"),
                      ("svd_s", "plain SVD")):
        total = {dev: sum(PER_MODEL[r["name"]] * r[key] for r in rows if r["device"] == dev) for dev in devices}
        lines.append(f"- BERT-base's 72 matrices {what}, by this table: "
                     + "; ".join(f"{dev} {t / 60:.1f} min" for dev, t in total.items()) + ".")
    (RESULTS / "lpaf_scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
