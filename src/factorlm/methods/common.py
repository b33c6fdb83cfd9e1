"""Pieces shared by methods: which layers, how much rank where, and whether it runs faster."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..factorize import budget_plan, structure_class
from ..models.surgery import find_targets, target_shapes


def teacher_distillation(teacher: nn.Module | None, alpha: float) -> list:
    """``[DistillationCallback]`` from a frozen copy of ``teacher`` (taken now, so later in-place
    changes of the model do not reach it) when ``alpha > 0``, else ``[]``.  The copy waits on the CPU
    (the callback moves it to the training device when its phase begins), so holding it through
    earlier steps costs no accelerator memory."""
    if alpha <= 0 or teacher is None:
        return []
    import copy

    from ..train import DistillationCallback

    return [DistillationCallback(copy.deepcopy(teacher).cpu().eval(), alpha=alpha)]


#: the help of every method's ``finetune_distill`` option (one CLI flag, one meaning)
FINETUNE_DISTILL_HELP = (
    "weight of a KL-to-the-dense-teacher term while fine-tuning the factorized model (0 = off, the default; "
    "> 0 gives compared methods the same distillation, see BENCHMARKS.md's protocol)")


def targets_for(session, model: nn.Module) -> list[str]:
    c = session.config
    targets = find_targets(model, include=c.include, exclude=c.exclude)
    if not targets:
        from ..errors import FactorLMError

        raise FactorLMError("no target nn.Linear layers found (check --include / --exclude patterns)")
    return targets


def structure_fixed(session) -> dict:
    """Fixed structure parameters from the run config (e.g. Monarch's nblocks)."""
    return {"nblocks": session.config.nblocks} if session.config.nblocks is not None else {}


def plan_for(session, model: nn.Module, targets: list[str], weights: dict[str, torch.Tensor] | None = None,
             *, speed_check: bool | None = None, spectra: tuple | None = None, global_plan: bool | None = None,
             uniform_ratio: bool = False):
    """Uniform plan (largest shared knob within --keep, or --rank), a global non-uniform rank plan, or
    ``spectra = (singular values by name, normalize, per_param)``: the method's own spectra for the
    global plan (``global_plan=True`` asks for it whatever ``--rank-policy`` says); ``uniform_ratio``: the
    uniform plan gives each matrix the same compression ratio (rank ``keep m n / (m + n)``, SVD-LLM's)
    instead of one shared rank; or
    the per-matrix ranks of a ``--ranks`` file (whose past-break-even matrices, left out of the plan
    and kept dense, are listed in ``session.plan_dense``); then the per-matrix speed check (:func:`speed_check_plan`), which with ``--skip-slow`` keeps dense
    the matrices that would not run faster factorized, within the same budget.

    ``speed_check``: ``None`` = as the config says (:func:`speed_check_wanted`); ``False`` = the plan
    only (callers whose method does not factorize with this plan, e.g. pruning)."""
    c = session.config
    cls = structure_class(c.structure)
    fixed = structure_fixed(session)
    replan = None
    session.plan_dense = []  # targets an explicit --ranks file keeps dense (past break-even)
    if getattr(c, "ranks", None) is not None:
        from ..ranks.explicit import explicit_plan, read_ranks

        ranks = getattr(session, "explicit_ranks", None)
        if ranks is None:  # (api.compress reads the file once, before any work, and sets this)
            ranks = session.explicit_ranks = read_ranks(c.ranks)
        shapes = target_shapes(model, targets)
        plan, session.plan_dense = explicit_plan(shapes, ranks)
    elif (c.rank_policy == "global" if global_plan is None else global_plan) and c.rank is None:
        from ..errors import check
        from ..ranks.allocator import global_rank_plan

        check(c.structure == "lowrank", "a global rank plan (--rank-policy global, kfac-global) needs --structure lowrank")
        normalize, per_param = "energy", c.rank_price == "weight"
        if spectra is not None:
            spectra, normalize, per_param = spectra
        else:
            spectra = {}
            for n in targets:
                W = model.get_submodule(n).weight.detach().float()
                if weights is not None:
                    W = W * weights[n].to(W)[None, :]
                spectra[n] = torch.linalg.svdvals(W)
        shapes = target_shapes(model, targets)
        ranks = global_rank_plan(spectra, shapes, c.keep, normalize, per_param=per_param)
        plan = {n: {"rank": int(r)} for n, r in ranks.items()}

        def replan(rest, keep):  # --skip-slow: the same allocator over the matrices left, on what is left
            sub = {n: spectra[n] for n in rest}
            return {n: {"rank": int(r)} for n, r in global_rank_plan(sub, rest, keep, normalize, per_param=per_param).items()}
    elif uniform_ratio and c.rank is None:
        from ..errors import check
        from ..ranks.budget import ratio_plan

        check(c.structure == "lowrank", "a per-matrix ratio plan needs --structure lowrank")
        shapes = target_shapes(model, targets)
        plan = {n: {"rank": int(r)} for n, r in ratio_plan(shapes, c.keep, 1).items()}
    else:
        plan = budget_plan(model, targets, keep=c.keep, rank=c.rank, structure=cls, **fixed)
        shapes = target_shapes(model, targets)
    if speed_check is False:
        return plan
    return speed_check_plan(session, model, shapes, plan, cls, fixed, replan=replan)


# -- per-matrix speed check ---------------------------------------------------------------------


def speed_check_wanted(config) -> bool:
    """Timed unless ``--no-latency`` (then only when ``--skip-slow`` asks for it)."""
    return bool(getattr(config, "skip_slow", False)) or bool(getattr(config, "latency", True))


def speed_check_rows(config) -> tuple[int, int]:
    """``(batch, seq)`` of the latency setting; the check times ``batch x seq`` rows."""
    return int(getattr(config, "latency_batch", None) or 32), int(getattr(config, "latency_seq", None) or config.max_length)


def _speed_device(session, model: nn.Module) -> torch.device:
    """Where the model will run: the accelerator's device, else where its weights are."""
    dev = getattr(getattr(session, "accelerator", None), "device", None)
    if dev is None:
        p = next(model.parameters(), None)
        dev = p.device if p is not None else "cpu"
    return torch.device(dev)


def _num_processes(session) -> int:
    try:
        return int(getattr(getattr(session, "accelerator", None), "num_processes", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _agree(session, value):
    """Every process uses process 0's measurement (independent timings could disagree, and the plans
    of a distributed run must be identical)."""
    if _num_processes(session) <= 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _knob_text(plan: dict, cls) -> str:
    knob = cls.budget_knob
    vals = sorted({p[knob] for p in plan.values() if knob in p and isinstance(p[knob], int)})
    name = knob.replace("_", " ")
    if not vals:
        return f"non-uniform {name}s"
    return f"{name} {vals[0]}" if len(vals) == 1 else f"{name}s {vals[0]}..{vals[-1]}"


def speed_check_plan(session, model: nn.Module, shapes: dict, plan: dict, cls, fixed: dict,
                     *, replan: Callable[[dict, float], dict] | None = None) -> dict[str, dict[str, Any]]:
    """Time every planned matrix dense vs factorized (:func:`factorlm.ranks.speed.time_matmuls`) at the
    latency setting's ``batch x seq`` rows in ``--dtype``; log the groups that would not run faster,
    store the result as ``session.speed_check`` (JSON-able) and, with ``--skip-slow``, return the plan
    with those matrices kept dense within the same ``--keep`` budget (:func:`skip_slow_plan`).

    Skipped (plan returned as it is, ``session.speed_check`` untouched) with ``--no-latency`` unless
    ``--skip-slow``.  Idempotent: a second call with the same plan and setting (``api.compress``'s
    budget check, then the method) neither re-times nor re-logs; timings are also cached per process
    by ``(structure, shape, plan entry, rows, dtype, device)`` in :mod:`factorlm.ranks.speed`.
    """
    from ..errors import FactorLMError
    from ..ranks import speed

    c = session.config
    if not speed_check_wanted(c):
        return plan
    skip = bool(getattr(c, "skip_slow", False))
    batch, seq = speed_check_rows(c)
    rows = batch * seq
    dt = getattr(c, "dtype", None) or "fp32"
    dt = "fp32" if dt == "auto" else dt  # encoders train in fp32; "auto" deploys in it
    device = _speed_device(session, model)
    keep = None if c.rank is not None or getattr(c, "ranks", None) is not None else c.keep
    memo_key = (cls.structure, rows, dt, str(device), skip, keep, tuple((n, speed.plan_key(p)) for n, p in plan.items()))
    memo = getattr(session, "_speed_check_memo", None)
    if memo is not None and memo[0] == memo_key:
        return {n: dict(p) for n, p in memo[1].items()}

    items = {n: (shapes[n], plan[n]) for n in plan}
    try:
        timings = speed.time_matmuls(items, rows, dt, cls, device=device)
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:  # e.g. no kernel for this dtype here
        timings = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    timings = _agree(session, timings)
    where = f"{dt} on {device.type}"
    if "error" in timings:
        msg = f"cannot time the factorized matrices in {where}: {timings['error']}"
        if skip:
            raise FactorLMError(f"--skip-slow: {msg}")
        session.log(f"[speed check] skipped: {msg}")
        return plan

    groups = speed.summarize(items, timings)
    slow = [n for n in plan if timings[n]["slow"]]
    result: dict[str, Any] = {
        "rows": rows, "batch": batch, "seq": seq, "dtype": dt, "device": str(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "structure": cls.structure, "margin": speed.MARGIN, "repeats": speed.REPEATS,
        "groups": groups, "slow": slow, "skip_slow": skip,
    }
    for g in groups:
        if g["slow"]:
            o, i = g["shape"]
            session.log(f"[speed check] {g['matrices']} matrices ({o}x{i} at {speed.describe_entry(g['plan'], cls)}, {dt}) "
                        f"would not run faster factorized: {g['dense_ms']:.3g} ms dense vs {g['factorized_ms']:.3g} ms")
    if not slow and groups:
        sp = [g["speedup"] for g in groups]
        session.log(f"[speed check] {batch} x {seq} rows, {where}: every factorized matrix runs faster than dense "
                    f"({min(sp):.2f}x-{max(sp):.2f}x)")
    elif not skip:
        session.log(f"[speed check] {len(slow)} of {len(plan)} matrices not faster factorized at {batch} x {seq} rows, "
                    f"{where} (--skip-slow keeps them dense within the same budget)")

    final = plan
    if skip and slow:
        final, kept = speed.skip_slow_plan(shapes, plan, slow, keep, cls, fixed, replan=replan)
        total = sum(o * i for o, i in shapes.values())
        dense_kept = sum(shapes[n][0] * shapes[n][1] for n in kept)
        session.log(f"[speed check] --skip-slow: {len(kept)} matrices stay dense ({dense_kept / total:.2%} of the target "
                    f"weights); the other {len(final)} get {_knob_text(final, cls)} (was {_knob_text(plan, cls)})"
                    + ("" if keep is None else f" to stay within --keep {keep:g}"))
        # A lower knob is fewer FLOPs, so the rest should stay faster: re-time once for the report, never iterate.
        after_items = {n: (shapes[n], final[n]) for n in final}
        try:
            after = _agree(session, speed.time_matmuls(after_items, rows, dt, cls, device=device))
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            after = _agree(session, None)
        result.update(kept_dense=kept, plan_before=speed.summarize_plan(plan), plan_after=speed.summarize_plan(final))
        if after is not None:
            result["groups_after"] = speed.summarize(after_items, after)
            still = [n for n in final if after[n]["slow"]]
            result["slow_after"] = still
            if still:
                session.log(f"[speed check] note: {len(still)} matrices are not faster at the new "
                            f"{_knob_text(final, cls)} either; they stay factorized (one pass, not iterated)")
    session.speed_check = result
    session._speed_check_memo = (memo_key, {n: dict(p) for n, p in final.items()})
    return final
