"""Gradual unstructured pruning of ``nn.Linear`` weights as a training :class:`Callback`.

How masks are applied
---------------------
Each target ``nn.Linear`` gets a non-persistent bool buffer ``prune_mask`` (moves with ``.to()``,
never saved) and an instance-level ``forward`` that computes ``F.linear(x, W * M, b)``.  Parameter
names, ``state_dict`` keys and the optimizer's parameter list are untouched, so the Trainer and the
checkpoint code see a plain model.  ``W * M`` goes through a small autograd function:

* forward: ``W_eff = W * M`` (pruned weights contribute nothing; also in eval mode);
* backward: ``G = dL/dW_eff`` is the gradient w.r.t. the *effective* weight, which is non-zero at
  pruned positions too.  With ``straight_through=True`` (default) ``W`` receives ``G`` unmasked --
  the straight-through estimator of movement pruning: pruned weights keep being updated and keep
  collecting movement score ``-W G``, so they can re-enter the mask at the next update.  With
  ``straight_through=False`` ``W`` receives ``G * M`` (pruned weights frozen, Sanh et al.'s weight
  update) while the criterion is still fed the unmasked ``G`` (captured in the backward).

Schedule: at ``on_step_begin`` of every ``update_every``-th step the target density is read from
the cubic schedule (:mod:`.schedule`) and masks are recomputed from the criterion's scores with an
exact top-k (:func:`.masks.compute_masks`).  Movement scores accumulate at ``on_after_backward``
(one backward per optimizer step is assumed, as in :mod:`factorlm.train.callbacks`).

After training, :meth:`Pruner.finalize` bakes the masks into the weights (zeros), removes the
forward override and the buffers, and returns ``(masks, scores)``.
"""

from __future__ import annotations

import functools
import math
import types
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FactorLMError, check
from ..train.callbacks import Callback
from .importance import Importance, get_importance
from .masks import SCOPES, compute_masks, kept_count, mask_density
from .schedule import cubic_density

MASK_BUFFER = "prune_mask"


# -- targets ------------------------------------------------------------------------------------
def resolve_targets(model: nn.Module, targets: "Iterable[str] | Mapping[str, nn.Module] | None" = None) -> dict[str, nn.Linear]:
    """``{qualified name: nn.Linear}`` from a list of module names, a ``{name: module}`` dict, or
    ``None`` = every ``nn.Linear`` inside an ``encoder`` (qualified name contains ``"encoder."``),
    i.e. all encoder linear weights of a BERT-like model (embeddings, pooler, heads excluded)."""
    if targets is None:
        found = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and "encoder." in f"{n}."}
        check(bool(found), "no nn.Linear found under an 'encoder' module; pass the target names explicitly")
        return found
    if isinstance(targets, Mapping):
        items = list(targets.items())
    else:
        items = [(n, None) for n in targets]
    out: dict[str, nn.Linear] = {}
    for name, mod in items:
        if mod is None:
            try:
                mod = model.get_submodule(name)
            except AttributeError:
                raise FactorLMError(f"no module named {name!r} in the model") from None
        check(isinstance(mod, nn.Linear), f"pruning target {name!r} is a {type(mod).__name__}, expected nn.Linear")
        out[name] = mod
    check(bool(out), "no pruning targets given")
    return out


# -- masked forward -----------------------------------------------------------------------------
class _MaskedWeight(torch.autograd.Function):
    """``W * M`` whose backward passes ``dL/d(W*M)`` to a sink and, unmasked or masked, to ``W``."""

    @staticmethod
    def forward(ctx, weight, mask, sink, straight_through):
        ctx.save_for_backward(mask)
        ctx.sink = sink
        ctx.straight_through = straight_through
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        if ctx.sink is not None:
            ctx.sink(grad)
        return (grad if ctx.straight_through else grad * mask), None, None, None


def _masked_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = _MaskedWeight.apply(self.weight, getattr(self, MASK_BUFFER), self._pruner_sink, self._pruner_straight_through)
    return F.linear(x, w, self.bias)


# -- callback -----------------------------------------------------------------------------------
class Pruner(Callback):
    """Gradual (cubic-schedule) unstructured pruning of ``targets`` to ``final_density``.

    Args:
        model: the model to prune (masks are installed on construction).
        targets: module names / ``{name: nn.Linear}`` / ``None`` (see :func:`resolve_targets`).
        importance: ``"movement"`` (first-order, LPAF's UP_first), ``"magnitude"`` (zero-order), or
            an :class:`~factorlm.prune.importance.Importance`.
        final_density: fraction of weights kept at the end (e.g. 0.3).
        initial_density, warmup_steps, cooldown_steps: cubic schedule (see :mod:`.schedule`;
            steps as ``int`` or fractions of training as ``float`` in [0, 1)).
        total_steps: schedule length; ``None`` = ``trainer.state.total_steps`` at ``on_train_begin``.
        scope: ``"per_matrix"`` (default: every matrix keeps the same fraction, matching LPAF's
            uniform per-matrix factorization budget) or ``"global"`` (one threshold for all).
        update_every: recompute masks every this many optimizer steps (1 = every step, as in
            movement pruning).
        straight_through: pass the unmasked gradient to ``W`` (see module doc).
    """

    def __init__(
        self,
        model: nn.Module,
        targets: "Iterable[str] | Mapping[str, nn.Module] | None" = None,
        importance: "str | Importance" = "movement",
        final_density: float = 0.3,
        *,
        initial_density: float = 1.0,
        warmup_steps: int | float = 0,
        cooldown_steps: int | float = 0,
        total_steps: int | None = None,
        scope: str = "per_matrix",
        update_every: int = 1,
        straight_through: bool = True,
    ):
        check(0.0 <= final_density <= 1.0, f"final_density must be in [0, 1], got {final_density}")
        check(0.0 <= initial_density <= 1.0, f"initial_density must be in [0, 1], got {initial_density}")
        check(scope in SCOPES, f"scope must be one of {SCOPES}, got {scope!r}")
        check(update_every >= 1, f"update_every must be >= 1, got {update_every}")
        self.model = model
        self.targets = resolve_targets(model, targets)
        self.importance = get_importance(importance)
        self.final_density = float(final_density)
        self.initial_density = float(initial_density)
        self.warmup_steps = warmup_steps
        self.cooldown_steps = cooldown_steps
        self.total_steps = total_steps
        self.scope = scope
        self.update_every = int(update_every)
        self.straight_through = bool(straight_through)
        #: density the current masks were computed for
        self.density = 1.0
        self._sinks: dict[str, torch.Tensor | None] = {}
        self._attached = False
        self.importance.reset(self.weights)
        self.attach()

    # -- plumbing -----------------------------------------------------------------------------
    @property
    def weights(self) -> dict[str, nn.Parameter]:
        return {n: m.weight for n, m in self.targets.items()}

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The live masks (bool, True = kept)."""
        check(self._attached, "the pruner is detached; use the masks returned by finalize()")
        return {n: getattr(m, MASK_BUFFER) for n, m in self.targets.items()}

    def _collect(self, name: str, grad: torch.Tensor) -> None:
        prev = self._sinks.get(name)
        self._sinks[name] = grad.detach().clone() if prev is None else prev + grad.detach()

    def attach(self) -> None:
        """Install all-ones masks and the masked forward on every target (idempotent)."""
        if self._attached:
            return
        capture = self.importance.needs_grad and not self.straight_through
        for name, mod in self.targets.items():
            check(not hasattr(mod, "_pruner_sink"), f"{name!r} is already being pruned by another Pruner")
            mod.register_buffer(MASK_BUFFER, torch.ones_like(mod.weight, dtype=torch.bool), persistent=False)
            mod._pruner_sink = functools.partial(self._collect, name) if capture else None
            mod._pruner_straight_through = self.straight_through
            mod.forward = types.MethodType(_masked_linear_forward, mod)
        self._attached = True
        self.density = 1.0

    def detach(self) -> None:
        """Remove masks and the masked forward *without* touching the weights."""
        if not self._attached:
            return
        for mod in self.targets.values():
            del mod.forward
            del mod._pruner_sink
            del mod._pruner_straight_through
            delattr(mod, MASK_BUFFER)
        self._attached = False
        self._sinks.clear()

    # -- masks --------------------------------------------------------------------------------
    def density_at(self, step: int) -> float:
        check(self.total_steps is not None, "Pruner.total_steps is unknown (pass it or run inside a Trainer)")
        return cubic_density(step, self.total_steps, self.final_density, self.initial_density,
                             self.warmup_steps, self.cooldown_steps)

    def scores(self) -> dict[str, torch.Tensor]:
        """Current importance scores (float32, higher = keep)."""
        return self.importance.scores({n: w.detach() for n, w in self.weights.items()})

    @torch.no_grad()
    def update_masks(self, density: float | None = None) -> dict[str, torch.Tensor]:
        """Recompute the masks at ``density`` (default: the current one) from the current scores."""
        density = self.density if density is None else float(density)
        if density >= 1.0:
            new = {n: torch.ones_like(w, dtype=torch.bool) for n, w in self.weights.items()}
        else:
            new = compute_masks(self.scores(), density, self.scope)
        for n, mod in self.targets.items():
            getattr(mod, MASK_BUFFER).copy_(new[n].to(mod.weight.device))
        self.density = density
        return self.masks

    def _masks_exact(self, density: float) -> bool:
        """Whether the live masks keep exactly what ``density`` prescribes (they may not, e.g. after
        the Trainer restored an earlier best checkpoint's buffers, or before the schedule ended)."""
        if not math.isclose(self.density, density, rel_tol=0.0, abs_tol=1e-12):
            return False
        masks = self.masks
        if self.scope == "per_matrix":
            return all(int(m.sum()) == kept_count(density, m.numel()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        return sum(int(m.sum()) for m in masks.values()) == kept_count(density, total)

    def sparsity_report(self) -> dict[str, float]:
        """``{name: density}`` of the live masks plus ``"__all__"``."""
        masks = self.masks
        rep = {n: float(m.float().mean()) for n, m in masks.items()}
        rep["__all__"] = mask_density(masks)
        return rep

    # -- callback hooks -----------------------------------------------------------------------
    def on_train_begin(self, trainer) -> None:
        if self.total_steps is None:
            self.total_steps = int(trainer.state.total_steps)
        self.update_masks(self.density_at(int(trainer.state.step)))

    def on_step_begin(self, trainer) -> None:
        step = int(trainer.state.step)
        if step % self.update_every:
            return
        density = self.density_at(step)
        # masks depend on (changing) scores, so refresh them whenever anything is pruned
        if density < 1.0 or density != self.density:
            self.update_masks(density)

    @torch.no_grad()
    def on_after_backward(self, trainer) -> None:
        if not self.importance.needs_grad:
            return
        if self.straight_through:
            grads = {n: w.grad for n, w in self.weights.items()}
        else:
            grads = dict(self._sinks)
        self.importance.accumulate({n: w.detach() for n, w in self.weights.items()}, grads)
        self._sinks.clear()

    # -- end ----------------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Bake masks into the weights (pruned entries := 0), remove hooks/buffers.

        If the live masks do not keep exactly ``final_density`` (training stopped before the schedule
        ended, no training happened, or the Trainer's ``keep_best`` restored an earlier, denser
        checkpoint's masks) they are first recomputed at ``final_density`` from the current scores.  Returns ``(masks, scores)``: bool keep-masks and float32 scores (scores
        taken before zeroing), on the weights' devices.  The model is a plain ``nn`` model after.
        """
        check(self._attached, "finalize() was already called")
        if not self._masks_exact(self.final_density):
            self.update_masks(self.final_density)
        scores = {n: s.detach().clone() for n, s in self.scores().items()}
        masks = {n: m.detach().clone() for n, m in self.masks.items()}
        for n, w in self.weights.items():
            w.mul_(masks[n].to(w.dtype))
        self.detach()
        return masks, scores

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"density": self.density, "importance": self.importance.state_dict()}
        if self._attached:
            state["masks"] = {n: m.detach().clone() for n, m in self.masks.items()}
        return state

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.importance.load_state_dict(state.get("importance", {}))
        if "masks" in state and self._attached:
            for n, mod in self.targets.items():
                getattr(mod, MASK_BUFFER).copy_(state["masks"][n].to(mod.weight.device))
            self.density = float(state.get("density", self.density))


# -- one-shot -----------------------------------------------------------------------------------
@torch.no_grad()
def prune_once(
    model: nn.Module,
    targets: "Iterable[str] | Mapping[str, nn.Module] | None",
    criterion_scores: "str | Importance | Mapping[str, torch.Tensor]",
    density: float,
    scope: str = "per_matrix",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One-shot pruning (no training): zero all but the top-``density`` weights, in place.

    ``criterion_scores`` is a zero-order criterion (``"magnitude"`` -> UP_zero baseline), an
    :class:`Importance` with accumulated state, or precomputed ``{name: scores}``.
    Returns ``(masks, scores)`` like :meth:`Pruner.finalize`.
    """
    mods = resolve_targets(model, targets)
    weights = {n: m.weight.detach() for n, m in mods.items()}
    if isinstance(criterion_scores, Mapping):
        missing = [n for n in mods if n not in criterion_scores]
        check(not missing, f"no scores for {missing}")
        scores = {n: criterion_scores[n].detach().float() for n in mods}
    else:
        imp = get_importance(criterion_scores)
        check(not imp.needs_grad or bool(imp.state_dict().get("S")),
              f"the {imp.name!r} criterion needs training gradients; use Pruner for it")
        scores = imp.scores(weights)
    masks = compute_masks(scores, density, scope)
    for n, m in mods.items():
        m.weight.mul_(masks[n].to(device=m.weight.device, dtype=m.weight.dtype))
    return masks, scores


# -- save / load --------------------------------------------------------------------------------
def save_pruning_state(path, masks: Mapping[str, torch.Tensor], scores: Mapping[str, torch.Tensor] | None = None,
                       metadata: Mapping[str, str] | None = None) -> None:
    """Write ``masks`` (bool) and ``scores`` (float32) to one safetensors file
    (keys ``mask/<name>`` and ``score/<name>``)."""
    from safetensors.torch import save_file

    tensors = {f"mask/{n}": m.detach().to("cpu", torch.bool).contiguous() for n, m in masks.items()}
    for n, s in (scores or {}).items():
        tensors[f"score/{n}"] = s.detach().to("cpu", torch.float32).contiguous()
    save_file(tensors, str(path), metadata={"format": "factorlm-pruning", **dict(metadata or {})})


def load_pruning_state(path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(masks, scores)`` written by :func:`save_pruning_state` (``scores`` may be empty)."""
    import os

    from safetensors.torch import load_file

    check(os.path.isfile(str(path)), f"pruning state file not found: {path}")
    tensors = load_file(str(path), device=str(device))
    masks = {k[len("mask/"):]: v for k, v in tensors.items() if k.startswith("mask/")}
    scores = {k[len("score/"):]: v for k, v in tensors.items() if k.startswith("score/")}
    return masks, scores
