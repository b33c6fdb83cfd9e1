"""Mixed-rank linear layer for LPAF's mixed-rank fine-tuning (Ren & Zhu, LREC-COLING 2024).

A :class:`MixedRankLinear` wraps a trainable factorized module ``f`` (any
:class:`~factorlm.layers.base.FactorizedLinear`: low-rank, Monarch, ...) and the frozen pruned
dense matrix ``W_i`` it was factorized from.  In training, each forward draws one switch per matrix

    z ~ Bernoulli(p),    y = (1 - z) * f(x) + z * (x W_i^T + b)

-- a *switch*, not a blend: only the selected branch is computed.  ``b`` is ``f``'s bias (shared,
trained in both branches).  Substituting the accurate dense matrix for some factorized ones
gives the other factorized matrices a better-conditioned context to fit during the early phase of
re-training, while ``p`` is annealed to 0 (see :mod:`factorlm.train.mixed_rank`) so the network
ends up trained purely in its factorized form.  In eval mode (or ``p == 0``) ``y = f(x)``.

``W_i`` is a non-persistent buffer: never trained, not in ``parameters()``, dropped from
``state_dict()``; ``num_params`` / ``flops`` / ``to_dense`` / ``spec`` describe ``f`` only (the
twin is training-only scaffolding).  :func:`unwrap_mixed_rank` restores the bare ``f`` modules.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FactorLMError, check
from .base import FactorizedLinear, register_structure, structure_from_spec


@register_structure("mixed_rank")
class MixedRankLinear(FactorizedLinear):
    """``factorized`` (child module) + frozen dense twin ``dense_weight`` (buffer), switched per forward.

    Attributes:
        p: probability of using the dense twin in a training forward (set by a schedule).
        force: ``None`` (sample), ``0`` (always factorized) or ``1`` (always dense); overrides
            ``p`` and the train/eval mode.  Also see :meth:`forced`.
        last_z: the branch used by the latest forward (0 factorized, 1 dense).
    """

    def __init__(self, factorized: FactorizedLinear, dense_weight: torch.Tensor, p: float = 0.0,
                 generator: torch.Generator | None = None):
        # FactorizedLinear.__init__ would create a bias parameter; the bias is factorized's (shared)
        nn.Module.__init__(self)
        check(isinstance(factorized, FactorizedLinear), f"expected a FactorizedLinear, got {type(factorized).__name__}")
        shape = (factorized.out_features, factorized.in_features)
        check(tuple(dense_weight.shape) == shape, f"dense twin has shape {tuple(dense_weight.shape)}, expected {shape}")
        self.in_features = factorized.in_features
        self.out_features = factorized.out_features
        self.factorized = factorized
        ref = next(factorized.parameters())
        self.register_buffer("dense_weight", dense_weight.detach().to(device=ref.device, dtype=ref.dtype).clone(),
                             persistent=False)
        self.p = float(p)
        self.force: int | None = None
        self.generator = generator
        self.last_z = 0

    # the bias is the factorized module's
    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        return self.factorized.bias

    def sample_z(self) -> int:
        """Draw (or read the forced) branch for one forward."""
        if self.force is not None:
            return int(self.force)
        if not self.training or self.p <= 0.0:
            return 0
        if self.p >= 1.0:
            return 1
        return int(torch.rand((), generator=self.generator).item() < self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.sample_z()
        self.last_z = z
        if z:
            return F.linear(x, self.dense_weight, self.bias)
        return self.factorized(x)

    def forced(self, z: int | None):
        """Context manager: ``with layer.forced(1): ...`` runs with ``force = z`` then restores it."""
        return force_mixed_rank(self, z)

    # -- FactorizedLinear interface: the factorized part only -----------------------------------
    @property
    def weight_dtype(self) -> torch.dtype:
        return self.factorized.weight_dtype

    def to_dense(self) -> torch.Tensor:
        return self.factorized.to_dense()

    def weight_params(self) -> int:
        return self.factorized.weight_params()

    def weight_flops(self) -> int:
        return self.factorized.weight_flops()

    def num_params(self) -> int:
        return self.factorized.num_params()

    def flops(self) -> int:
        return self.factorized.flops()

    def extra_spec(self) -> dict[str, Any]:
        return self.factorized.extra_spec()

    def spec(self) -> dict[str, Any]:
        """The factorized module's spec: a saved wrapped model reloads as the bare structure."""
        return self.factorized.spec()

    @classmethod
    def from_spec(cls, spec, *, dtype=None, device=None):
        """Rebuild from ``{"structure": "mixed_rank", "inner": <spec>}`` or a bare inner spec
        (twin zero-initialised; it is training-only and never saved)."""
        inner_spec = spec.get("inner", spec)
        check(inner_spec.get("structure") != "mixed_rank", "a mixed_rank spec needs an 'inner' structure spec")
        inner = structure_from_spec(inner_spec, dtype=dtype, device=device)
        out_f, in_f = inner_spec["shape"]
        return cls(inner, torch.zeros(out_f, in_f, dtype=dtype, device=device))

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}, force={self.force}"


class force_mixed_rank:
    """Context manager setting ``force`` on one MixedRankLinear or every one inside a model."""

    def __init__(self, module: nn.Module, z: int | None):
        check(z in (None, 0, 1), f"force must be None, 0 or 1, got {z!r}")
        self.layers = mixed_rank_layers(module) if not isinstance(module, MixedRankLinear) else {"": module}
        self.z = z
        self._saved: dict[str, int | None] = {}

    def __enter__(self):
        self._saved = {n: m.force for n, m in self.layers.items()}
        for m in self.layers.values():
            m.force = self.z
        return self

    def __exit__(self, *exc):
        for n, m in self.layers.items():
            m.force = self._saved[n]
        return False


def mixed_rank_layers(model: nn.Module) -> dict[str, MixedRankLinear]:
    """``{qualified name: MixedRankLinear}`` inside ``model`` (nested ones are not searched)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MixedRankLinear)}


def set_mixed_rank_p(model: nn.Module, p: float) -> None:
    for m in mixed_rank_layers(model).values():
        m.p = float(p)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def wrap_mixed_rank(model: nn.Module, dense_weights: Mapping[str, torch.Tensor], p: float = 0.0,
                    generator: torch.Generator | None = None) -> nn.Module:
    """Replace the FactorizedLinear at each name of ``dense_weights`` by a :class:`MixedRankLinear`
    with that (pruned, dense) twin.  In place; returns ``model``."""
    for name, W in dense_weights.items():
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise FactorLMError(f"no module named {name!r} in the model") from None
        check(isinstance(mod, FactorizedLinear) and not isinstance(mod, MixedRankLinear),
              f"{name!r} is a {type(mod).__name__}, expected a (non-mixed) FactorizedLinear")
        new = MixedRankLinear(mod, W, p=p, generator=generator)
        new.train(mod.training)  # inherit the mode (a fresh module would be in training mode)
        _replace(model, name, new)
    return model


def unwrap_mixed_rank(model: nn.Module) -> nn.Module:
    """Replace every :class:`MixedRankLinear` by its inner factorized module (e.g. before saving).
    In place; returns ``model`` (a bare MixedRankLinear passed in is returned unwrapped)."""
    if isinstance(model, MixedRankLinear):
        return model.factorized
    for name in list(mixed_rank_layers(model)):
        _replace(model, name, model.get_submodule(name).factorized)
    return model


__all__ = [
    "MixedRankLinear",
    "force_mixed_rank",
    "mixed_rank_layers",
    "set_mixed_rank_p",
    "unwrap_mixed_rank",
    "wrap_mixed_rank",
]
