"""Per-matrix speed check: would each factorized matrix run faster than its dense original?

Fewer FLOPs do not always mean less time: a small matrix, a rank close to break-even, a dtype whose
matmul kernels favour one big GEMM over two thin ones (or over Monarch's batched, permuted ones)
can make the factorized ``x W^T`` *slower* than the dense one.  :func:`time_matmuls` measures it
directly, matrix by matrix, the way the model will run: ``rows`` input rows (``batch x seq`` of the
latency setting), the deployment dtype, inference mode, on the given device.

* Every distinct ``(shape, plan entry)`` is timed once and the result shared by every matrix that
  has it (MiniLM-L6 under a uniform plan: 36 matrices, 3 timings), and kept in a module cache keyed
  by ``(structure, shape, plan entry, rows, dtype, device)``, so a plan computed twice (the budget
  check before training, then the method) or per stage is timed once per process.
* For each shape the dense layer and every factorized variant of that shape are timed
  round-robin (each round times each module once), ``REPEATS`` rounds, median per module: slow
  drifts of a shared machine hit both alike.  A timed call repeats the forward until it lasts
  about ``TARGET_MS`` (microsecond GPU matmuls), and a shape stops after ``MIN_ROUNDS`` rounds once
  ``MAX_SECONDS`` went into it, so the check costs seconds, not minutes.
* ``slow``: factorized median ``>= margin x`` dense median (``margin`` 1.0: not faster at all).

:func:`skip_slow_plan` is the ``--skip-slow`` policy: the slow matrices stay dense (out of the
plan) and their dense weights are charged to the same ``--keep`` budget; the remaining matrices get
the largest uniform knob (or, with ``replan``, e.g. the global rank allocator) that fits what is
left.  One pass is enough in principle: keeping matrices dense can only *lower* the others' knob,
and a lower rank is fewer FLOPs, so a matrix that was faster factorized stays faster.  That holds
for FLOPs but not always for measured time (kernel tile sizes: a rank of 76 can run slower than
64), so :func:`factorlm.methods.common.plan_for` times the new plan again for the report and says
so if a matrix turned slow; it does not iterate.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..errors import FactorLMError, check
from ..profiling import DTYPES
from .budget import check_keep, plan_params, uniform_plan

#: timed rounds per distinct shape (each round: the dense layer and every factorized variant once)
REPEATS = 7
#: untimed calls per module before the rounds (at least WARMUP, and at least WARMUP_MS of them: a cold
#: CPU or fresh buffers make the first calls slow)
WARMUP = 2
WARMUP_MS = 20.0
#: a shape stops after this many rounds once MAX_SECONDS went into it
MIN_ROUNDS = 3
MAX_SECONDS = 2.0
#: a timed sample repeats the forward until it lasts about this long (at most MAX_CALLS calls)
TARGET_MS = 2.0
MAX_CALLS = 200
#: slow = factorized median >= MARGIN x dense median
MARGIN = 1.0

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

#: (structure, out, in, plan key, rows, dtype, device) -> {"dense_ms", "factorized_ms"} (unrounded)
_CACHE: dict[tuple, dict[str, float]] = {}


def clear_cache() -> None:
    _CACHE.clear()


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    check(dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def dtype_name(dtype: str | torch.dtype) -> str:
    return _DTYPE_NAMES.get(as_dtype(dtype), str(dtype))


def plan_key(entry: Mapping[str, Any]) -> str:
    """A hashable, order-independent key of one plan entry (e.g. ``{"rank": 64}``)."""
    return json.dumps(dict(entry), sort_keys=True, default=str)


def describe_entry(entry: Mapping[str, Any], structure_cls=None) -> str:
    """``rank 64`` / ``block rank 16, nblocks 4``: the knob first, then the fixed parameters."""
    knob = getattr(structure_cls, "budget_knob", None)
    items = sorted(entry.items(), key=lambda kv: (kv[0] != knob, kv[0]))
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in items)


# -- measurement ----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(module: nn.Module, x: torch.Tensor, calls: int) -> float:
    """Mean ms of ``calls`` forwards."""
    _sync(x.device)
    t0 = time.perf_counter()
    for _ in range(calls):
        module(x)
    _sync(x.device)
    return (time.perf_counter() - t0) / calls * 1e3


def measure_group(
    dense: nn.Module,
    variants: list[nn.Module],
    x: torch.Tensor,
    *,
    repeats: int = REPEATS,
    warmup: int = WARMUP,
    max_seconds: float = MAX_SECONDS,
) -> tuple[float, list[float]]:
    """Median ms of ``dense(x)`` and of each ``variants[j](x)``, timed round-robin in inference mode."""
    mods = [dense, *variants]
    with torch.inference_mode():
        first = [0.0] * len(mods)
        for j, m in enumerate(mods):
            spent, n = 0.0, 0
            while n < max(1, warmup) or (spent < WARMUP_MS and n < MAX_CALLS):
                first[j] = _time_calls(m, x, 1)
                spent, n = spent + first[j], n + 1
        calls = [max(1, min(MAX_CALLS, math.ceil(TARGET_MS / max(t, 1e-4)))) for t in first]
        times: list[list[float]] = [[] for _ in mods]
        t0 = time.perf_counter()
        for r in range(max(1, repeats)):
            for j, m in enumerate(mods):
                times[j].append(_time_calls(m, x, calls[j]))
            if r + 1 >= MIN_ROUNDS and time.perf_counter() - t0 > max_seconds:
                break
    med = [statistics.median(ts) for ts in times]
    return med[0], med[1:]


def _build(structure_cls, out_f: int, in_f: int, entry: Mapping[str, Any], dtype, device) -> nn.Module:
    """A randomly initialised factorized layer (built in fp32 on the CPU: some inits need QR)."""
    m = structure_cls(in_f, out_f, bias=True, **dict(entry))
    return m.to(device=device, dtype=dtype).eval()


def time_matmuls(
    shapes_and_plans: Mapping[str, tuple[tuple[int, int], Mapping[str, Any]]],
    rows: int,
    dtype: str | torch.dtype,
    structure_cls,
    *,
    repeats: int = REPEATS,
    device: str | torch.device = "cpu",
    margin: float = MARGIN,
    cache: bool = True,
) -> dict[str, dict[str, Any]]:
    """Dense vs factorized ``y = x W^T + b`` per target, on ``rows`` random rows in ``dtype``.

    ``shapes_and_plans``: ``{name: ((out, in), plan entry)}`` (e.g. ``((384, 384), {"rank": 64})``).
    Returns ``{name: {"dense_ms", "factorized_ms", "speedup", "slow"}}`` (``speedup`` = dense /
    factorized; ``slow``: factorized ``>= margin x`` dense).  Identical ``(shape, entry)`` pairs
    are timed once (and cached across calls unless ``cache=False``).
    """
    check(rows >= 1, f"rows must be >= 1, got {rows}")
    check(margin > 0, f"margin must be > 0, got {margin}")
    dt, dev = as_dtype(dtype), torch.device(device)
    groups: dict[tuple, list[str]] = {}
    entries: dict[tuple, Mapping[str, Any]] = {}
    for name, (shape, entry) in shapes_and_plans.items():
        out_f, in_f = int(shape[0]), int(shape[1])
        key = (structure_cls.structure, out_f, in_f, plan_key(entry), int(rows), str(dt), str(dev))
        groups.setdefault(key, []).append(name)
        entries[key] = entry
    results: dict[tuple, dict[str, float]] = {}
    todo: dict[tuple[int, int], list[tuple]] = {}
    for key in groups:
        if cache and key in _CACHE:
            results[key] = _CACHE[key]
        else:
            todo.setdefault((key[1], key[2]), []).append(key)
    g = torch.Generator().manual_seed(0)
    for (out_f, in_f), keys in todo.items():
        dense = nn.Linear(in_f, out_f).to(device=dev, dtype=dt).eval()
        variants = [_build(structure_cls, out_f, in_f, entries[k], dt, dev) for k in keys]
        x = torch.randn(int(rows), in_f, generator=g).to(device=dev, dtype=dt)
        d_ms, f_ms = measure_group(dense, variants, x, repeats=repeats)
        for k, f in zip(keys, f_ms):
            results[k] = {"dense_ms": float(d_ms), "factorized_ms": float(f)}
            if cache:
                _CACHE[k] = results[k]
        del dense, variants, x
    out: dict[str, dict[str, Any]] = {}
    for key, names in groups.items():
        d, f = results[key]["dense_ms"], results[key]["factorized_ms"]
        for n in names:
            out[n] = {"dense_ms": round(d, 4), "factorized_ms": round(f, 4),
                      "speedup": round(d / f, 3) if f > 0 else float("inf"), "slow": bool(f >= margin * d)}
    return out


def summarize(
    shapes_and_plans: Mapping[str, tuple[tuple[int, int], Mapping[str, Any]]],
    timings: Mapping[str, Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """One JSON-able row per distinct ``(shape, entry)``: shape, plan entry, matrix count, timings, slow."""
    rows: dict[tuple, dict[str, Any]] = {}
    for name, (shape, entry) in shapes_and_plans.items():
        key = (tuple(int(s) for s in shape), plan_key(entry))
        if key not in rows:
            t = timings[name]
            rows[key] = {"shape": list(key[0]), "plan": dict(entry), "matrices": 0,
                         **{k: t[k] for k in ("dense_ms", "factorized_ms", "speedup", "slow")}}
        rows[key]["matrices"] += 1
    return list(rows.values())


def summarize_plan(plan: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The distinct entries of ``plan`` with how many matrices have each: ``[{"plan": {...}, "matrices": n}]``."""
    rows: dict[str, dict[str, Any]] = {}
    for entry in plan.values():
        rows.setdefault(plan_key(entry), {"plan": dict(entry), "matrices": 0})["matrices"] += 1
    return list(rows.values())


# -- --skip-slow ----------------------------------------------------------------------------------


def skip_slow_plan(
    shapes: Mapping[str, tuple[int, int]],
    plan: Mapping[str, Mapping[str, Any]],
    slow: Iterable[str],
    keep: float | None,
    structure_cls,
    fixed: Mapping[str, Any] | None = None,
    *,
    replan: Callable[[dict[str, tuple[int, int]], float], dict[str, dict[str, Any]]] | None = None,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Keep the ``slow`` matrices dense within the same budget; returns ``(new plan, kept dense)``.

    The budget is ``keep x`` the dense weights of every matrix in ``shapes`` (the targets).  The
    slow matrices leave the plan and their ``out x in`` dense weights are charged to it; the others
    get ``replan(rest_shapes, rest_keep)`` (default: :func:`uniform_plan`, the largest shared knob)
    with ``rest_keep = (budget - dense kept) / rest's dense weights`` (at most 1), so
    ``dense kept + factorized <= keep x total``.  ``keep=None`` (an explicit ``--rank``, no budget):
    the others keep their entries.  FactorLMError when the slow matrices alone use the budget up, or
    when every target is slow (nothing left to factorize).
    """
    fixed = dict(fixed or {})
    slow_set = set(slow)
    kept_dense = [n for n in plan if n in slow_set]
    rest = {n: tuple(shapes[n]) for n in plan if n not in slow_set}
    if not kept_dense:
        return {n: dict(p) for n, p in plan.items()}, []
    check(len(rest) > 0, f"--skip-slow: all {len(kept_dense)} target matrices would run slower factorized; "
                         "keeping them all dense leaves nothing to compress (drop --skip-slow or change the structure)")
    if keep is None:
        return {n: dict(plan[n]) for n in rest}, kept_dense
    keep = check_keep(keep)
    total = sum(o * i for o, i in shapes.values())
    budget = keep * total
    dense = sum(shapes[n][0] * shapes[n][1] for n in kept_dense)
    rest_total = sum(o * i for o, i in rest.values())
    left = budget - dense
    if left <= 0:
        raise FactorLMError(
            f"--skip-slow: the {len(kept_dense)} matrices that would not run faster factorized need "
            f"{dense / total:.4f} of the target weights kept dense, {'more than' if left < 0 else 'all of'} "
            f"--keep {keep:g}; raise --keep or drop --skip-slow")
    rest_keep = min(1.0, left / rest_total)
    replan = replan or (lambda r, k: uniform_plan(r, k, structure_cls, **fixed))
    for _ in range(8):  # left / rest_total * rest_total may round one ulp above ``left``
        try:
            new = replan(rest, rest_keep)
        except FactorLMError as e:
            raise FactorLMError(
                f"--skip-slow: after keeping {len(kept_dense)} slow matrices dense ({dense / total:.2%} of the "
                f"target weights) the rest can keep only {rest_keep:.4f} of theirs: {e}") from None
        if dense + plan_params(shapes, new, structure_cls) <= budget:
            return new, kept_dense
        rest_keep = math.nextafter(rest_keep, 0.0)
    raise FactorLMError("--skip-slow: could not fit the remaining matrices in the budget")  # pragma: no cover
