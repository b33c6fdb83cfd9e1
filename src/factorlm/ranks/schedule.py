"""Budget schedule for rank reduction during fine-tuning (AdaLoRA's cubic ``budget_schedule``).

A run of ``T`` optimizer steps has three phases (``t`` = number of finished steps)::

    t <= warmup_steps                    budget = initial            (importance scores warm up)
    warmup_steps < t < T - final_steps   budget = target + (initial - target) * (1 - p)^3,
                                         p = (t - warmup_steps) / (T - final_steps - warmup_steps)
    t >= T - final_steps                 budget = target             (fine-tune the final structure)

The cubic decays fast at first (most triplets of a full-rank SVD are redundant) and slowly near the
target, where every removal matters.  The budget is an integer, truncated towards zero like
AdaLoRA's ``int(...)``, and exactly ``target`` from ``t = T - final_steps`` on.  If the phases
overlap (``warmup_steps >= T - final_steps``) the warm-up wins and the budget jumps straight from
``initial`` to ``target`` after it.
"""

from __future__ import annotations

from ..errors import check


def budget_at(step: int, total_steps: int, initial: int, target: int, warmup_steps: int, final_steps: int) -> int:
    """The budget (any additive unit: parameters, triplets) after ``step`` finished steps.

    Non-increasing in ``step`` whenever ``initial >= target``; ``initial`` for ``step <=
    warmup_steps``, ``target`` for ``step >= total_steps - final_steps`` (warm-up first).
    """
    check(warmup_steps >= 0 and final_steps >= 0, f"warm-up/final steps must be >= 0, got {warmup_steps}/{final_steps}")
    initial, target = int(initial), int(target)
    if step <= warmup_steps:
        return initial
    end = total_steps - final_steps
    if step >= end:
        return target
    frac = 1.0 - (step - warmup_steps) / (end - warmup_steps)  # in (0, 1): end > step > warmup_steps
    return int((initial - target) * frac**3 + target)


def phase_steps(total_steps: int, warmup: float | int, final: float | int) -> tuple[int, int]:
    """``(warmup_steps, final_steps)`` from fractions of ``total_steps`` (floats < 1) or step counts (ints).

    Fractions round to the nearest step; the result is clamped to ``[0, total_steps]``.
    """
    def conv(x, what):
        check(x >= 0, f"{what} must be >= 0, got {x}")
        if isinstance(x, float) and x < 1.0:
            return int(round(x * total_steps))
        check(float(x) == int(x), f"{what} must be a fraction < 1 or a whole number of steps, got {x}")
        return int(x)

    w, f = conv(warmup, "warm-up"), conv(final, "final phase")
    return min(w, total_steps), min(f, total_steps)
