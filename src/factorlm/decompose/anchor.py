"""The anchored fit: compress a layer so that the *compressed* model's inputs reproduce the *dense* model's
outputs (issue 31 item 1a).

Sequential calibration (:mod:`factorlm.lm.calibrate`, ``--sequential layer``) fits each layer to its own
outputs on the shifted inputs ``X~`` that the already-compressed layers before it produce:
``min ||X~ W^T - X~ W'^T||``, so the errors of earlier layers are never corrected, only not worsened.
The anchored fit targets the dense model's outputs instead (AA-SVD, github.com/atulkumarin/AA-SVD: "fit the
factors on the shifted inputs of the already-compressed model to the original outputs"):

    min_{rank W' <= k} ||X W^T - X~ W'^T||_F,     X, X~: (tokens, in), the dense and the shifted inputs.

Closed form.  With ``C = X~^T X~`` and the cross-Gram ``M = X~^T X``, the unconstrained minimiser is
``W_c = W M^T C^{-1}`` (least squares of ``X W^T`` on ``X~``), and by Pythagoras (the residual
``X W^T - X~ W_c^T`` is orthogonal to the columns of ``X~``)

    ||X W^T - X~ W'^T||^2 = ||X W^T - X~ W_c^T||^2 + ||X~ (W_c - W')^T||^2,

so the rank-k problem is SVD-LLM's whitened truncation of ``W_c`` under ``C``
(:mod:`factorlm.decompose.whiten`), and a quantizer with an input Gram (GPTQ,
:mod:`factorlm.decompose.gptq`) or a whitened correction (EoRA) applies to ``W_c`` under ``C`` unchanged.
With the ridge below the same holds under ``C + lam I`` (the objective is then
``const + ||(W_c - W') (C + lam I)^(1/2)||^2``), which is the Gram the truncation and the correction use.
Both Grams are summed in float64 from paired batches (the same windows through the dense and the
compressed prefix).  The solve is a ridge toward the dense weight, ``+ lam ||W_c - W||^2`` with ``lam =
damp * mean(diag C)`` (``--anchor-damp``, default 0.01, GPTQ's relative damping): without it, directions
the calibration tokens barely excite get weights fitted to noise, which new inputs then amplify.  Differs from AA-SVD: no
per-block refinement step after the closed form (item 1c), and the cross-Gram is streamed, never the inputs.
"""

from __future__ import annotations

import torch

from ..errors import check
from .whiten import InputStats, _gram_view


class PairedStats:
    """Streaming ``C = X~^T X~`` (``.gram``, kept by the wrapped :class:`InputStats`) and ``M = X~^T X``
    (``.cross``), float64, from batches of shifted inputs ``x~`` and dense inputs ``x`` of the same tokens."""

    def __init__(self, base: InputStats):
        check(base.want_gram, "the anchored fit needs the input Gram (a method whose statistics include it)")
        self.base = base
        self.cross: torch.Tensor | None = None

    def __getattr__(self, name):  # tokens, gram, in_features, ...: the wrapped statistics
        if "base" not in self.__dict__:  # during copy / pickle, before __init__
            raise AttributeError(name)
        return getattr(self.__dict__["base"], name)

    @torch.no_grad()
    def update_pair(self, shifted: torch.Tensor, dense: torch.Tensor) -> None:
        check(shifted.shape == dense.shape, f"paired inputs differ in shape: {tuple(shifted.shape)} vs "
                                            f"{tuple(dense.shape)}")
        self.base.update(shifted)
        n = self.base.in_features
        cd = torch.float64 if shifted.dtype == torch.float64 else torch.float32
        a = shifted.detach().reshape(-1, n).to(self.base.device, cd)
        b = dense.detach().reshape(-1, n).to(self.base.device, cd)
        if self.cross is None:
            self.cross = torch.zeros(n, n, dtype=torch.float64, device=self.base.device)
        self.cross += (a.T @ b).double()


def anchored_target(W: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """``W_c = (W M^T + lam W) (C + lam I)^{-1}``, ``lam = damp * mean(diag C)``, in ``W``'s dtype (computed in
    float64): the weight whose outputs on the shifted inputs best reproduce ``W``'s outputs on the dense
    inputs, with a ridge ``lam ||W_c - W||^2`` toward the dense weight (directions the calibration inputs
    barely excite keep ``W``'s values instead of being fitted to noise; ``damp = 0``: plain least squares)."""
    out, inp = W.shape
    check(tuple(cross.shape) == (inp, inp), f"cross-Gram must be {inp}x{inp}, got {tuple(cross.shape)}")
    check(damp >= 0, f"the anchored fit's damping must be >= 0, got {damp}")
    C, _ = _gram_view(gram.to(W.device), 0.0)
    C = (C + C.T) / 2
    lam = damp * float(C.diagonal().mean())
    C.diagonal().add_(max(lam, 1e-12 * float(C.diagonal().mean())))
    L, info = torch.linalg.cholesky_ex(C)
    check(int(info) == 0, "the anchored fit's Gram is not positive definite: raise --anchor-damp")
    Wt = W.detach().to(torch.float64).T
    rhs = cross.to(W.device, torch.float64) @ Wt  # M W^T: (in, out)
    if lam:
        rhs += lam * Wt
    return torch.cholesky_solve(rhs, L).T.contiguous().to(W.dtype)
