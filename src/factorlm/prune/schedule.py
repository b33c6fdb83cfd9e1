"""Sparsity schedules for gradual pruning.

The cubic schedule of Zhu & Gupta (2017, "To prune, or not to prune"), in the form used by movement
pruning (Sanh et al., 2020): with ``t_w`` warm-up steps, ``t_c`` cool-down steps and ``T`` total
steps,

    s(t) = s_i                                                   t <  t_w
    s(t) = s_f + (s_i - s_f) * (1 - (t - t_w) / (T - t_w - t_c))^3     t_w <= t < T - t_c
    s(t) = s_f                                                   t >= T - t_c

Sparsity rises quickly at first (when many weights are redundant) and slowly at the end (when
the network has less slack to recover).  Density is ``1 - sparsity``.

``warmup_steps`` / ``cooldown_steps`` are step counts when given as ``int``; a ``float`` in
``[0, 1)`` is read as a *fraction of* ``total_steps`` (e.g. ``warmup_steps=0.1`` = first 10%).
"""

from __future__ import annotations

from ..errors import check


def resolve_steps(value: int | float, total_steps: int) -> int:
    """A step count from an ``int`` (steps) or a ``float`` in ``[0, 1)`` (fraction of ``total_steps``)."""
    if isinstance(value, float) and 0.0 <= value < 1.0:
        return int(round(value * total_steps))
    check(value >= 0, f"step counts must be >= 0, got {value}")
    return int(value)


def _cubic(step: int, total_steps: int, start: float, end: float,
           warmup_steps: int | float, cooldown_steps: int | float) -> float:
    """``start`` during warm-up, ``end + (start - end) (1 - frac)^3`` in between, ``end`` in cool-down."""
    check(total_steps >= 1, f"total_steps must be >= 1, got {total_steps}")
    t_w = resolve_steps(warmup_steps, total_steps)
    t_c = resolve_steps(cooldown_steps, total_steps)
    if step < t_w:
        return float(start)
    span = total_steps - t_w - t_c
    if step >= total_steps - t_c or span <= 0:
        return float(end)
    frac = min(max((step - t_w) / span, 0.0), 1.0)
    return float(end + (start - end) * (1.0 - frac) ** 3)


def cubic_sparsity(
    step: int,
    total_steps: int,
    final_sparsity: float,
    initial_sparsity: float = 0.0,
    warmup_steps: int | float = 0,
    cooldown_steps: int | float = 0,
) -> float:
    """Target sparsity (fraction of weights removed) at ``step`` of a cubic schedule (see module doc)."""
    check(0.0 <= final_sparsity <= 1.0, f"final_sparsity must be in [0, 1], got {final_sparsity}")
    check(0.0 <= initial_sparsity <= 1.0, f"initial_sparsity must be in [0, 1], got {initial_sparsity}")
    return _cubic(step, total_steps, initial_sparsity, final_sparsity, warmup_steps, cooldown_steps)


def cubic_density(step: int, total_steps: int, final_density: float, initial_density: float = 1.0,
                  warmup_steps: int | float = 0, cooldown_steps: int | float = 0) -> float:
    """The same schedule in densities (fractions kept): ``1 - cubic_sparsity(...)``, but returning
    ``final_density`` / ``initial_density`` exactly (no ``1 - (1 - d)`` round-off)."""
    check(0.0 <= final_density <= 1.0, f"final_density must be in [0, 1], got {final_density}")
    check(0.0 <= initial_density <= 1.0, f"initial_density must be in [0, 1], got {initial_density}")
    return _cubic(step, total_steps, initial_density, final_density, warmup_steps, cooldown_steps)
