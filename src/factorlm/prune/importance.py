"""Importance criteria for unstructured pruning: *what* to keep, separate from *how* masks are
applied (:mod:`.pruner`) -- the Torch-Pruning split of importance vs structure.

Every criterion maps the target weights ``{name: W}`` to scores ``{name: S}`` of the same shapes,
**higher = keep**.  Two are provided (LPAF, Ren & Zhu 2024, call them UP_zero and UP_first):

* ``magnitude`` (zero-order, UP_zero): ``S = |W|`` -- stateless, needs no gradients.
* ``movement`` (first-order, UP_first; Sanh et al. 2020): ``S = - sum_t W^(t) * dL/dW^(t)``,
  accumulated after every backward.  ``-W dL/dW`` is the first-order Taylor estimate of the loss
  *decrease* obtained by moving ``W`` away from zero, so weights that training pushes away from
  zero score high and weights shrinking towards zero score low, whatever their current magnitude.
  LPAF's key finding is that masks from this criterion leave matrices with a low-rank structure.

The movement gradient is the gradient w.r.t. the *effective* (masked) weight, so pruned weights
keep collecting scores and can come back (see :class:`~factorlm.prune.pruner.Pruner`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch

from ..errors import check
from ..registry import Registry

#: criterion name -> Importance subclass
IMPORTANCES: Registry[type["Importance"]] = Registry("importance criterion")


def register_importance(name: str):
    return IMPORTANCES.register(name, name_attr="name")


class Importance:
    """Interface: ``reset`` once, ``accumulate`` after every backward, ``scores`` when masks are due."""

    name: ClassVar[str] = "abstract"
    #: True if :meth:`accumulate` needs ``dL/dW`` (the pruner then provides it after each backward)
    needs_grad: ClassVar[bool] = False

    def reset(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Forget accumulated state and size it for ``weights``."""

    @torch.no_grad()
    def accumulate(self, weights: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor | None]) -> None:
        """Fold one optimisation step's gradients into the state (no-op for zero-order criteria)."""

    def scores(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """float32 scores with the shapes of ``weights``; higher = more important."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


@register_importance("magnitude")
class MagnitudeImportance(Importance):
    """Zero-order: ``|W|`` (Han et al. 2015; the gradual magnitude pruning of Zhu & Gupta 2017)."""

    @torch.no_grad()
    def scores(self, weights):
        return {n: w.detach().abs().float() for n, w in weights.items()}


@register_importance("movement")
class MovementImportance(Importance):
    """First-order: ``S += -W * dL/dW`` after every backward (Sanh et al. 2020, hard movement pruning).

    Scores are kept in float32 on each weight's device.  They are in loss units summed over steps,
    so only their order matters.  Gradients are read before unscaling: under fp16 AMP each step's
    contribution carries the (slowly varying) loss scale, and a step whose gradient overflowed
    adds nothing for that tensor; prefer bf16/fp32 for the pruning run.
    """

    needs_grad = True

    def __init__(self) -> None:
        self.S: dict[str, torch.Tensor] = {}

    def reset(self, weights):
        self.S = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}

    @torch.no_grad()
    def accumulate(self, weights, grads):
        for n, w in weights.items():
            g = grads.get(n)
            if g is None:
                continue
            if n not in self.S:
                self.S[n] = torch.zeros_like(w, dtype=torch.float32)
            elif self.S[n].device != w.device:  # the model was moved (e.g. by the accelerator)
                self.S[n] = self.S[n].to(w.device)
            contrib = w.detach().float() * g.detach().float()
            # an fp16 loss-scale overflow step (skipped by the optimizer) must not poison the scores;
            # checked per tensor without a host sync
            self.S[n].sub_(torch.where(torch.isfinite(contrib).all(), contrib, torch.zeros_like(contrib)))

    def scores(self, weights):
        check(all(n in self.S for n in weights), "movement scores are missing for some weights (was reset() called?)")
        return {n: self.S[n] for n in weights}

    def state_dict(self):
        return {"S": dict(self.S)}

    def load_state_dict(self, state):
        self.S = {n: t.float() for n, t in state["S"].items()}


@register_importance("sensitivity")
class SensitivityImportance(Importance):
    """First-order, smoothed: PLATON (Zhang et al., ICML 2022) ``S = I_bar * U_bar`` with
    ``I = |W * dL/dW|`` (first-order Taylor estimate of the loss change when W is zeroed), its
    exponential moving average ``I_bar`` and the EMA ``U_bar`` of its deviation (uncertainty).

    Unlike raw movement scores, which sum noisy per-step products and need long schedules (Sanh
    et al. prune over 10+ epochs), the sensitivity keeps a magnitude prior (``|W|`` multiplies the
    gradient) and smooths the noise away within ~1/(1-beta) steps, so it prunes well in the short
    CPU-sized schedules used here; it is the default first-order criterion of LPAF in factorlm.
    """

    needs_grad = True

    def __init__(self, beta1: float = 0.85, beta2: float = 0.95) -> None:
        from ..ranks.allocator import SensitivityTracker

        self.tracker = SensitivityTracker(beta1, beta2)

    def reset(self, weights):
        self.tracker.reset()

    @torch.no_grad()
    def accumulate(self, weights, grads):
        self.tracker.update_pairs((n, w, grads.get(n)) for n, w in weights.items())

    def scores(self, weights):
        out = {}
        for n, w in weights.items():
            s = self.tracker.score(n)
            out[n] = w.detach().abs().float() if s is None else s.to(w.device)  # before any gradient: |W|
        return out

    def state_dict(self):
        return {"ipt": dict(self.tracker.ipt_avg), "unc": dict(self.tracker.unc_avg)}

    def load_state_dict(self, state):
        self.tracker.ipt_avg = dict(state.get("ipt", {}))
        self.tracker.unc_avg = dict(state.get("unc", {}))


def get_importance(criterion: "str | Importance | type[Importance]") -> Importance:
    """An :class:`Importance` instance from a registered name, a class or an instance."""
    if isinstance(criterion, Importance):
        return criterion
    if isinstance(criterion, type) and issubclass(criterion, Importance):
        return criterion()
    check(isinstance(criterion, str), f"importance criterion must be a name or an Importance, got {criterion!r}")
    return IMPORTANCES.get(criterion)()
