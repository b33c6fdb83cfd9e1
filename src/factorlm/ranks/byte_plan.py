"""One byte budget over quantization grids and correction ranks: which grid each matrix is stored on, and
how much low-rank correction of its error it gets (``--byte-plan global``, :mod:`factorlm.lm.methods`).

Each matrix ``n`` has candidate *grids* ``q`` (bits, group size, zero point), each with the bytes of its
codes ``base[n, q]``, the bytes of one correction rank ``per_rank[n, q]`` and an estimated loss
``loss[n, q][r]`` at correction rank ``r`` (non-increasing in ``r``; in factorlm the output-sensitivity
weighted tail of the whitened error spectrum, ``lambda_n / 2 * sum_{j > r} sigma_j(E_q S)^2``, the loss a
rank-``r`` whitened correction leaves to second order).  The plan minimises ``sum_n loss[n, q_n][r_n]``
subject to ``sum_n base[n, q_n] + r_n per_rank[n, q_n] <= budget``, a multiple-choice knapsack, by
Lagrangian relaxation: for a price ``mu`` every matrix independently takes the ``(q, r)`` minimising
``loss + mu * bytes``; ``mu`` is bisected to the cheapest price that fits, and the bytes the relaxation
leaves unspent are spent by a local search (move one matrix to the (grid, rank) that saves the most loss within
its bytes plus the unspent ones, until no move helps).  The relaxation is exact at its own budget (Everett's
theorem); the tests measure the remaining gap against exhaustive search.

The same allocation with one grid per matrix is the global correction-rank plan (ranks priced in bytes).
The principle (price every unit of storage by the loss it saves, one threshold for all matrices) is the
one of factorlm's global rank plan (:mod:`factorlm.ranks.allocator`) and of Hessian-aware mixed-precision
allocation (HAWQ-V3, Yao et al. 2021, which solves the bit allocation as an integer program).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import check


@dataclass(frozen=True)
class GridOption:
    """One candidate storage of a matrix: ``base`` bytes of codes, ``per_rank`` bytes per correction rank,
    ``loss[r]`` the estimated loss at correction rank ``r`` (``r = 0 .. len(loss) - 1``, non-increasing)."""

    base: int
    per_rank: float
    loss: torch.Tensor


def _best(opts: Sequence[GridOption], mu: float) -> tuple[int, int]:
    """``(grid, rank)`` minimising ``loss + mu * bytes`` for one matrix (ties: fewer bytes)."""
    best, pick = None, (0, 0)
    for qi, o in enumerate(opts):
        cost = o.base + o.per_rank * torch.arange(len(o.loss), dtype=torch.float64)
        obj = o.loss.double() + mu * cost
        r = int(torch.argmin(obj))
        key = (float(obj[r]), float(cost[r]))
        if best is None or key < best:
            best, pick = key, (qi, r)
    return pick


def _bytes(options: Mapping[str, Sequence[GridOption]], plan: Mapping[str, tuple[int, int]]) -> float:
    return sum(options[n][q].base + r * options[n][q].per_rank for n, (q, r) in plan.items())


def byte_plan(options: Mapping[str, Sequence[GridOption]], budget: float, *, iters: int = 100
              ) -> dict[str, tuple[int, int]]:
    """``{name: (grid index, correction rank)}`` within ``budget`` bytes (see the module docstring); a
    FactorLMError when even the cheapest grid of every matrix does not fit."""
    check(len(options) > 0, "no target layers to plan")
    for n, opts in options.items():
        check(len(opts) > 0 and all(len(o.loss) >= 1 for o in opts), f"{n}: no grid to choose from")
        check(all(bool(torch.isfinite(o.loss).all()) for o in opts), f"{n}: a non-finite estimated loss")
    floor = sum(min(o.base for o in opts) for opts in options.values())
    check(floor <= budget, f"the byte budget ({budget:,.0f} bytes) is below the cheapest grid of every matrix "
                           f"({floor:,.0f} bytes): raise --keep or offer fewer bits")
    plan_at = lambda mu: {n: _best(opts, mu) for n, opts in options.items()}  # noqa: E731
    lo, hi = 0.0, 1.0
    plan = plan_at(lo)
    if _bytes(options, plan) > budget:
        for _ in range(256):  # raise the price until the plan fits (it does once bytes dominate every loss)
            if _bytes(options, plan_at(hi)) <= budget:
                break
            lo, hi = hi, hi * 16
        else:  # unreachable with finite losses and the floor checked; the cheapest plan fits
            return {n: min(((qi, 0) for qi in range(len(opts))), key=lambda t: opts[t[0]].base)
                    for n, opts in options.items()}
        for _ in range(iters):
            mid = (lo + hi) / 2 if hi < 2 * lo or lo == 0 else (lo * hi) ** 0.5
            if _bytes(options, plan_at(mid)) > budget:
                lo = mid
            else:
                hi = mid
        plan = plan_at(hi)
    # spend what the relaxation leaves: one move at a time, the matrix whose best (grid, rank) within its bytes
    # plus the unspent ones saves the most loss (a rank more, or another grid), until no move helps
    left = budget - _bytes(options, plan)
    while True:
        best, pick = 0.0, None
        for n, (q, r) in plan.items():
            cur = options[n][q]
            room = cur.base + r * cur.per_rank + left
            for qi, o in enumerate(options[n]):
                cost = o.base + o.per_rank * torch.arange(len(o.loss), dtype=torch.float64)
                ok = cost <= room + 1e-9
                if not bool(ok.any()):
                    continue
                gain = float(cur.loss[r]) - o.loss.double().masked_fill(~ok, float("inf"))
                ri = int(torch.argmax(gain))
                if float(gain[ri]) > best:
                    best, pick = float(gain[ri]), (n, qi, ri)
        if pick is None:
            return plan
        n, qi, ri = pick
        q, r = plan[n]
        left += options[n][q].base + r * options[n][q].per_rank - options[n][qi].base - ri * options[n][qi].per_rank
        plan[n] = (qi, ri)


def plan_loss(options: Mapping[str, Sequence[GridOption]], plan: Mapping[str, tuple[int, int]]) -> float:
    """The plan's estimated loss ``sum_n loss[n, q_n][r_n]``."""
    return sum(float(options[n][q].loss[r]) for n, (q, r) in plan.items())
