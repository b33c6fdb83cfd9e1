"""Explicit per-matrix ranks (``--ranks FILE``): any allocation, e.g. one RankDyna learned, as a plan.

The file is JSON, one of:

* ``{"module name": rank, ...}``;
* an object with a ``"ranks"`` field of that form (a ``benchmarks/protocol.py`` run JSON);
* a saved model's ``factorlm.json``, whose ``"method_info"`` has ``"ranks"`` (what ``compress
  --method rankdyna --output DIR`` writes, so ``--ranks DIR/factorlm.json`` re-uses its allocation).

Every target matrix must be named, and every name must be a target: a partial or stale file is an
error, not a silent fallback to some default rank.  A rank at or past the matrix's break-even
(``k (in + out) >= in x out``, :func:`factorlm.ranks.budget.past_break_even`) is stored dense, as
RankDyna stores it; those matrices leave the plan and count at their dense size.

The file replaces ``--keep`` as the factorization budget (the accounting reports what it stores);
``lpaf`` still prunes to ``--density`` (default ``--keep``) before factorizing with these ranks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ..errors import FactorLMError, check
from .budget import past_break_even


def read_ranks(path: str | Path) -> dict[str, int]:
    """``{module name: rank}`` from ``path`` (formats above); FactorLMError naming the problem."""
    p = Path(path)
    check(p.is_file(), f"--ranks: no such file: {p}")
    try:
        data: Any = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FactorLMError(f"--ranks: {p} is not readable JSON ({type(e).__name__}: {e})") from None
    if isinstance(data, dict) and isinstance(data.get("method_info"), dict) and "ranks" in data["method_info"]:
        data = data["method_info"]["ranks"]
    elif isinstance(data, dict) and isinstance(data.get("ranks"), dict):
        data = data["ranks"]
    elif isinstance(data, dict) and ("method_info" in data or "modules" in data):
        raise FactorLMError(f"--ranks: {p} is a saved model's factorlm.json without an allocation ('method_info' has "
                            "no 'ranks'; a rankdyna run's has one)")
    elif isinstance(data, dict) and any(isinstance(v, (dict, list, str)) or v is None for v in data.values()):
        raise FactorLMError(f"--ranks: {p} has no 'ranks' field and is not a {{module name: rank}} object")
    check(isinstance(data, dict) and len(data) > 0,
          f"--ranks: {p} must hold a JSON object {{module name: rank}} (or one with a 'ranks' field)")
    out = {}
    for name, r in data.items():
        if r == 0 and not isinstance(r, bool):
            raise FactorLMError(f"--ranks: {p}: {name} has rank 0 (RankDyna with min_one=false can remove a matrix); "
                                "a low-rank layer needs rank >= 1")
        check(isinstance(r, int) and not isinstance(r, bool) and r >= 1,
              f"--ranks: {p}: the rank of {name} must be a positive integer, got {r!r}")
        out[str(name)] = int(r)
    return out


def explicit_plan(shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int]
                  ) -> tuple[dict[str, dict[str, int]], list[str]]:
    """``(plan, dense)``: ``{name: {"rank": k}}`` for the matrices factorized, and the names whose
    rank is at or past break-even (kept dense).  Ranks above ``min(out, in)`` are errors."""
    missing = [n for n in shapes if n not in ranks]
    unknown = [n for n in ranks if n not in shapes]
    check(not unknown, f"--ranks names {len(unknown)} matrices that are not targets of this model "
                       f"(first: {unknown[0] if unknown else ''}); check the file or --include/--exclude")
    check(not missing, f"--ranks gives no rank for {len(missing)} target matrices (first: "
                       f"{missing[0] if missing else ''})")
    plan, dense = {}, []
    for n, (o, i) in shapes.items():
        k = ranks[n]
        if k > min(o, i):
            raise FactorLMError(f"--ranks: rank {k} of {n} is larger than its {o}x{i} shape allows ({min(o, i)})")
        if past_break_even(o, i, k):
            dense.append(n)
        else:
            plan[n] = {"rank": k}
    check(len(plan) > 0, "--ranks: every matrix's rank is at or past break-even: nothing to factorize")
    return plan, dense
