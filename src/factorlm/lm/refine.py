"""Stage (optional, inside the calibration stream): per-block refinement of the compressed factors.

``--refine-steps N`` (default 0: off).  After every target of decoder block ``i`` has been replaced,
its trainable parameters take ``N`` optimizer steps on

    L = ||block_c(x~) - block_d(x)||^2 / ||block_d(x)||^2

over the calibration windows: ``x~`` the hidden states the *compressed* model hands block ``i`` (the
shifted inputs), ``block_d(x)`` the *dense* block's output on the dense model's hidden states of the same
tokens, so each block learns to undo the error of everything before it, not only its own.  Then the
stream goes on with the refined block's outputs.

Origin: AA-SVD (atulkumarin/AA-SVD, ``finetune_layer`` after each layer's compression): the dense
targets on the dense inputs, the compressed block on the shifted inputs, an MSE loss, AdamW at 1e-4 with
10% linear warm-up and a cosine decay to 0.1x, gradient clipping at 1.0.  As published: those.  Differs:
the loss is normalised by the target's energy (so one learning rate suits every block, the same minimiser);
the length is given in optimizer steps (AA-SVD: 25 passes over its calibration batches, which on a
2-core CPU would cost hours for a 135M model), cycling over the calibration batches, and the learning rate
defaults to 3e-3 for such short runs (SmolLM2-135M, rtn-lowrank int3-g64-zp + 3.9%, blocks 0-1, 32 steps:
block output error -6% at 1e-4, -19% at 1e-3, -27% at 3e-3); weight decay 0
(AA-SVD 0.01: a pull of the factors toward zero that is not part of the objective); what trains is the
targets' factors (``--refine-params factors``, default; a quantized layer's codes and scales stay; its int8
factors train as floats and are stored as int8 again, by the same RTN, before the guard measures) or every
floating parameter of the block (``all``: norms and biases too, as AA-SVD's ``include: all``); and a
**keep-best guard**: the loss is measured before and after (on what is stored) over the last 1/8 of the
calibration batches, which the steps never train on, and a block whose held-out loss rose is restored (a
too-large learning rate or an over-fitted block cannot make the model worse than its one-shot fit there).  bf16 weights train through torchao's AdamW with stochastic rounding
(:mod:`factorlm.train.optim`), fp32 through torch's.

``--refine-loss fisher`` (factorlm's, opt-in; default ``mse`` as above): the error is measured through
``M_i``, the symmetric root of the damped output-gradient Gram of block ``i``'s output hidden state on the
dense model (:func:`factorlm.lm.gradients.block_output_metrics`, one more backward per calibration window
over ``--grad-batches`` batches, damping 0.01 of the mean diagonal): ``L = ||(y_c - y_d) M_i||^2 /
||y_d M_i||^2``, K-FAC's estimate of the loss increase the block's output error causes -- the refinement
counterpart of ``--method kfac``'s fit, whose loss-aware choices the plain MSE would otherwise pull back
toward the dense outputs.  The guard measures the same weighted loss.

Cost per block: ``N`` forward+backward passes of one block on one calibration batch plus two forward
passes over the guard's batches (SmolLM2-135M, batches of 8 x 256 tokens, one AVX2 core: ~0.7 s a step).
Memory beyond the stream's: the dense hidden states of the calibration windows (a second ``n x seq x hidden`` set, as ``--sequential anchored`` keeps), one copy of
the dense block, the block's activations of one batch for the backward, and AdamW's two moments of the
trained parameters (for one block at a time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import check
from ..models.state import frozen_eval

PARAMS = ("factors", "all")


@dataclass
class RefineSpec:
    steps: int
    lr: float = 3e-3
    params: str = "factors"
    warmup: float = 0.1  # share of the steps of linear warm-up (AA-SVD)
    floor: float = 0.1  # the cosine decays to this share of lr (AA-SVD)
    clip: float = 1.0
    guard: float = 0.125  # share of the calibration batches held out for the keep-best guard

    def held_out(self, n_batches: int) -> int:
        """How many of ``n_batches`` the guard measures on (never trained on); 0 (measure on the training
        batches) when there is only one."""
        return 0 if n_batches < 2 else max(1, int(round(self.guard * n_batches)))

    def __post_init__(self):
        check(self.steps >= 0, f"--refine-steps must be >= 0, got {self.steps}")
        check(self.lr > 0, f"--refine-lr must be > 0, got {self.lr}")
        check(self.params in PARAMS, f"--refine-params must be one of {', '.join(PARAMS)}, got {self.params!r}")


def trainable(block: nn.Module, local_targets: Sequence[str], params: str) -> list[nn.Parameter]:
    """The parameters refinement trains: the targets' floating non-bias parameters (``factors``) or every
    floating parameter of the block (``all``)."""
    if params == "all":
        return [p for p in block.parameters() if p.is_floating_point()]
    out = []
    for n in local_targets:
        for name, p in block.get_submodule(n).named_parameters():
            if p.is_floating_point() and name != "bias" and p.numel():
                out.append(p)
    return out


def _loss(block, call, target, metric: torch.Tensor | None = None) -> torch.Tensor:
    """``||y - t||^2 / ||t||^2``, or with ``metric`` M (``--refine-loss fisher``) ``||(y - t) M||^2 / ||t M||^2``."""
    y = call(block)
    t = target.to(y.dtype).float()
    d = y.float() - t
    if metric is not None:
        M = metric.to(device=d.device, dtype=torch.float32)
        d, t = d @ M, t @ M
    return d.pow(2).sum() / t.pow(2).sum().clamp_min(1e-30)


@torch.no_grad()
def _mean_loss(block, calls, targets, metric=None) -> float:
    return sum(float(_loss(block, c, t, metric)) for c, t in zip(calls, targets)) / len(calls)


def refine_block(block: nn.Module, local_targets: Sequence[str], calls: Sequence, targets: Sequence[torch.Tensor],
                 spec: RefineSpec, metric: torch.Tensor | None = None) -> dict[str, Any]:
    """Refine one compressed block in place (see the module docstring); returns what happened:
    relative output error before / after over the calibration batches (weighted by ``metric`` when given:
    ``--refine-loss fisher``, in the steps and in the guard), whether it was kept."""
    from ..train.optim import make_optimizer

    check(len(calls) == len(targets) and len(calls) > 0, "refinement needs the dense outputs of every batch")
    held = spec.held_out(len(calls))  # the guard's batches: the last ones, never trained on (when there are 2+)
    train_calls, train_targets = (calls[:-held], targets[:-held]) if held else (calls, targets)
    guard_calls, guard_targets = (calls[-held:], targets[-held:]) if held else (calls, targets)
    before = _mean_loss(block, guard_calls, guard_targets, metric)
    saved = {k: v.detach().clone() for k, v in block.state_dict().items()}  # one block: the keep-best copy
    thawed = [m for m in block.modules() if hasattr(m, "thaw_factors")]
    for m in thawed:  # int8 factors train as floats and are stored as int8 again before the guard measures
        m.thaw_factors()
    params = trainable(block, local_targets, spec.params)
    if not params or spec.steps == 0:
        for m in thawed:
            m.freeze_factors()
        return {"error_before": round(before, 6), "error_after": round(before, 6), "kept": False, "trained": 0,
                "guard_batches": held or len(calls)}
    bf16 = any(p.dtype == torch.bfloat16 for p in params)
    opt = make_optimizer([{"params": params}], "adamw-sr" if bf16 else "adamw", spec.lr, 0.0)
    warm = max(1, int(spec.warmup * spec.steps))

    def lr_at(step: int) -> float:  # AA-SVD: linear warm-up, then cosine down to floor x lr
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, spec.steps - warm)
        return spec.floor + (1 - spec.floor) * 0.5 * (1 + math.cos(math.pi * progress))

    try:  # eval mode, no dropout: the dense targets are deterministic
        with frozen_eval(block, trainable=params), torch.enable_grad():
            for step in range(spec.steps):
                for g in opt.param_groups:  # torchao's optimizers keep lr as a tensor (set it in place)
                    lr = spec.lr * lr_at(step)
                    if torch.is_tensor(g["lr"]):
                        g["lr"].fill_(lr)
                    else:
                        g["lr"] = lr
                b = step % len(train_calls)
                loss = _loss(block, train_calls[b], train_targets[b], metric)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, spec.clip)
                opt.step()
        del opt
    finally:
        for m in thawed:
            m.freeze_factors()
    trained = sum(p.numel() for p in params)
    del params
    after = _mean_loss(block, guard_calls, guard_targets, metric)  # what is stored (int8 factors re-quantized)
    kept = math.isfinite(after) and after <= before
    if not kept:  # keep-best: never worse than the one-shot fit
        block.load_state_dict(saved)
    return {"error_before": round(before, 6), "error_after": round(after if kept else before, 6),
            "kept": bool(kept), "trained": trained, "guard_batches": held or len(calls)}

