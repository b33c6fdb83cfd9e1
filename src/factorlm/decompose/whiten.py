"""Activation-aware low-rank fits of one linear layer: SVD-LLM whitening, ASVD scaling, plain SVD.

*Papers*:

- SVD-LLM: X. Wang, Y. Zheng, Z. Wan, M. Zhang, "SVD-LLM: Truncation-aware Singular Value
  Decomposition for Large Language Model Compression", ICLR 2025, https://arxiv.org/abs/2403.07378
  (code: https://github.com/AIoT-MLSys-Lab/SVD-LLM).
- ASVD: Z. Yuan, Y. Shang, Y. Song, Q. Wu, Y. Yan, G. Sun, "ASVD: Activation-aware Singular Value
  Decomposition for Compressing Large Language Models", 2023, https://arxiv.org/abs/2312.05821
  (code: https://github.com/hahnyuan/ASVD4LLM).

*The common objective*: a linear layer ``y = x W^T``, ``W`` (out, in), calibration inputs ``X``
(n tokens, in) with Gram ``G = X^T X``.  Both papers minimise the layer's output error

    min_{rank W' <= k}  ||(W - W') X^T||_F^2  =  ||(W - W') S||_F^2   for any S with S S^T = G,

through an SVD of the *scaled* weight ``W S = U Sigma V^T``.  For any ``S`` (singular or not) *a*
minimiser is the projection ``W' = U_k U_k^T W`` (with a singular ``S``, adding any ``D`` with
``D S = 0`` gives others; with tied singular values ``U_k`` itself is not unique): ``W' S`` has rank <= k, so by Eckart-Young on
``W S`` the error is at least ``sum_{i>k} sigma_i^2``, and ``U_k U_k^T W S = U_k Sigma_k V_k^T``
attains it.  ``U_k`` depends on ``S`` only through ``W S S^T W^T``, so every square root of ``G``
gives the same ``W'``.

*As published*:

- SVD-LLM ("truncation-aware data whitening"): ``S = cholesky(G)``, ``W S = U Sigma V^T``,
  ``W' = U_k Sigma_k V_k^T S^{-1}`` with an explicit inverse, factors
  ``W_u = U_k Sigma_k^{1/2}``, ``W_v = Sigma_k^{1/2} V_k^T S^{-1}``.  The theorem: the output error
  of truncating at rank k equals ``sum_{i>k} sigma_i^2`` (so the smallest singular values are
  exactly the cheapest to drop).  The published code accumulates ``G`` in float32, factorises it
  in float64 and, when Cholesky fails, shifts ``G`` by ``(1e-6 - lambda_min) I``; it then runs the
  SVD in float32.  The paper's second stage (parameter update by sequential LoRA fine-tuning of
  ``W_u`` then ``W_v``) is training, not part of this module.
- ASVD: ``S = diag(s)``, ``s_j = (mean_t |x_tj|)^alpha`` with ``alpha = 0.5``,
  ``W' = U_k Sigma_k V_k^T S^{-1}`` (published code: a randomized ``torch.svd_lowrank(W S, q=k)``
  instead of an exact SVD, ``s += 1e-6`` before dividing, and the
  abs-mean is the sum over calibration batches of each batch's mean -- proportional to the token
  mean for equal-length sequences, and a constant factor in ``s`` changes nothing).  ASVD's
  sensitivity-based rank search and KV-cache absorption are orchestration, not maths, and are
  not here.
- Plain SVD: ``S = I`` (Eckart-Young on ``W`` itself).

*Differs here* (with ``damp = 0``, none changes ``W'`` where the published formula succeeds without
its fall-backs; where SVD-LLM's Cholesky fails it shifts ``G`` by ``(1e-6 - lambda_min) I``, or
adds ``1e-6 I`` to ``S`` before an ``inv``, and so gets another ``W'``; ASVD's exact SVD here
differs from its randomized one by the randomized error):

- **``S`` from a symmetric eigendecomposition, not Cholesky** (:func:`whitening_scale`):
  ``G = Q diag(lam) Q^T`` in float64, ``lam`` clamped at 0, ``S = Q diag(sqrt(lam))``.  Any
  ``S S^T = G`` gives the same ``W'`` (above), so this equals SVD-LLM whenever Cholesky succeeds,
  and it is defined when ``G`` is only positive *semi*-definite (fewer tokens than features, dead
  channels) without the published ad-hoc shift.
- **No inverse**: ``W' = U_k U_k^T W`` instead of ``U_k Sigma_k V_k^T S^{-1}`` -- equal whenever
  ``S`` is invertible, but free of the conditioning blow-up of ``S^{-1}`` (``cond(S) =
  sqrt(cond(G))``) and valid for singular ``S``.  Where ``G`` is singular the directions it does
  not see are left to the arbitrary zero-singular-value vectors of the SVD; the optional
  ``damp`` (``G + damp * mean(diag G) I``; 0 in these functions = the published objective, 1e-6
  by default in ``factorlm compress --task lm --method whiten``) regularises that, as GPTQ's
  damping does, at the price of a tiny change of ``W'``.
- **Gram summed in float64** (:class:`InputStats`: each update's ``X^T X`` in float32, or float64
  for float64 input) and the SVD in float64 (published: float32 Gram and SVD); the factors are cast back to ``W``'s dtype.
- **Factor split**: ``A = U_k``, ``B = U_k^T W``, then each rank-1 term is rebalanced so that
  ``||A[:, i]|| = ||B[i]||`` (:func:`factors_from_basis`); the papers split ``Sigma_k^{1/2}`` to
  both sides, which balances ``W S``'s factors rather than ``W``'s.  ``A B`` is identical.
- **ASVD's floor** is relative, ``s >= eps * max(s)`` (published: ``+1e-6`` absolute), and it only
  keeps the SVD well posed: no division by ``s`` happens here.

*Defaults and why*: ``damp = 0`` in these functions (the published objective; the CLI's
``--damp`` defaults to 1e-6 so that directions the calibration never excites are ordered as plain
SVD orders them); ``alpha = 0.5`` (ASVD's published default).

*Through the small side* (:func:`scaled_factors`, :func:`scaled_spectrum`): only ``U`` and ``Sigma``
of ``W S`` are ever needed, so no ``Vh`` is computed and no problem is wider than ``min(out, in)``:

- ``out <= in``: ``U, Sigma^2 = eigh(W S S^T W^T)``; for whitening ``S S^T = G' = G + damp * mean(diag
  G) I`` is used directly (:class:`GramScale`), so the ``in x in`` eigendecomposition of ``G`` is never
  formed (``down_proj`` of Llama-3-8B: a 4096-wide problem instead of two 14336-wide ones);
- ``out > in``: ``V, Sigma^2 = eigh(S^T W^T W S)`` (in x in, the small side) and ``U = W S V Sigma^{-1}``
  for the singular values above ``1e-12 * sigma_max`` (the others get zero columns: their directions
  carry no scaled energy, so every choice is optimal).

Both run in float64 (``torch.linalg.eigh``); squaring the singular values squares the condition
number of the problem, which float64 absorbs (tests compare against a float64 SVD of ``W S`` on
ill-conditioned Grams in both orientations).

These functions are pure tensor maths: collecting the inputs (hooks), choosing ranks and replacing
modules live elsewhere.  Callers that need both the spectrum (rank allocation) and the factors do
one decomposition with :func:`scaled_factors` and truncate it at any rank with :func:`factors_from_basis`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check

__all__ = [
    "GramScale", "InputStats", "asvd", "asvd_scale", "factors_from_basis", "output_error", "scaled_factors",
    "scaled_spectrum", "scaled_svd", "whiten_svd", "whitening_scale",
]


_GRAM_CHUNK = 1 << 24  # entries of one float32 block of x^T x (InputStats.update)
_LIVE = torch.finfo(torch.float64).eps ** 0.5  # relative floor of a resolved singular value (out > in)


class InputStats:
    """Streaming statistics of a layer's inputs: float64 Gram X^T X, sum of |x| per feature, token count."""

    def __init__(self, in_features: int, *, gram: bool = True, absmean: bool = False, device=None):
        check(isinstance(in_features, int) and in_features >= 1, f"in_features must be a positive integer, got {in_features!r}")
        check(gram or absmean, "InputStats needs at least one of gram=True or absmean=True")
        self.in_features = in_features
        self.want_gram = bool(gram)
        self.want_absmean = bool(absmean)
        self.device = torch.device(device) if device is not None else None
        self.tokens: int = 0
        self.gram: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None
        if self.device is not None:
            self._allocate(self.device)

    def _allocate(self, device: torch.device) -> None:
        self.device = device
        n = self.in_features
        if self.want_gram and self.gram is None:
            self.gram = torch.zeros(n, n, dtype=torch.float64, device=device)
        if self.want_absmean and self.abs_sum is None:
            self.abs_sum = torch.zeros(n, dtype=torch.float64, device=device)

    @property
    def abs_mean(self) -> torch.Tensor | None:
        """``sum_t |x_t| / tokens`` per feature (float64), or None without ``absmean=True``."""
        if self.abs_sum is None:
            return None
        return self.abs_sum / max(self.tokens, 1)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add the tokens of ``x`` (..., in), any float dtype; leading dims are flattened."""
        check(x.is_floating_point(), f"InputStats.update needs a floating-point tensor, got {x.dtype}")
        check(x.dim() >= 1 and x.shape[-1] == self.in_features,
              f"InputStats.update: last dimension must be {self.in_features}, got shape {tuple(x.shape)}")
        if self.device is None:
            self._allocate(x.device)
        # one update's products in float32 (float64 input stays float64: 4x cheaper on CPUs, and a
        # batch's few thousand tokens lose nothing that matters), summed across updates in float64
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.detach().reshape(-1, self.in_features).to(device=self.device, dtype=cd)
        if self.gram is not None:  # x^T x in column blocks of at most ~2^24 entries: no in x in float32
            n = self.in_features    # temporary beside the float64 sum (14336 wide: 67 MB, not 822 MB)
            step = n if n * n <= _GRAM_CHUNK else max(1, _GRAM_CHUNK // n)
            for a in range(0, n, step):
                self.gram[:, a: a + step].add_(x.T @ x[:, a: a + step])  # float64 += float32, element-wise
        if self.abs_sum is not None:
            self.abs_sum += x.abs().sum(dim=0, dtype=torch.float64)
        self.tokens += x.shape[0]

    @torch.no_grad()
    def merge_(self, other: "InputStats") -> "InputStats":
        """Add ``other``'s sums into this accumulator (chunked / distributed collection); returns self."""
        check(isinstance(other, InputStats), f"merge_ needs an InputStats, got {type(other).__name__}")
        check(other.in_features == self.in_features,
              f"cannot merge InputStats of {other.in_features} features into one of {self.in_features}")
        check(other.want_gram == self.want_gram and other.want_absmean == self.want_absmean,
              "cannot merge InputStats that collect different statistics (gram / absmean)")
        if other.tokens == 0:
            return self
        if self.device is None:
            self._allocate(other.device)
        if self.gram is not None:
            self.gram += other.gram.to(self.device)
        if self.abs_sum is not None:
            self.abs_sum += other.abs_sum.to(self.device)
        self.tokens += other.tokens
        return self

    def __repr__(self) -> str:
        return (f"InputStats(in_features={self.in_features}, tokens={self.tokens}, gram={self.want_gram}, "
                f"absmean={self.want_absmean}, device={self.device})")


def whitening_scale(gram: torch.Tensor, damp: float = 0.0) -> torch.Tensor:
    """(in, in) float64 ``S`` with ``S S^T = G + damp * mean(diag G) I``, via ``eigh`` with the
    eigenvalues clamped at 0 (so a semi-definite / rank-deficient ``G`` is fine)."""
    G = _checked_gram(gram, damp)
    mean_diag = float(G.diagonal().mean())
    lam, Q = torch.linalg.eigh(G)
    lam = lam.clamp_min(0.0)
    if damp > 0:
        lam = lam + damp * mean_diag
    return Q * lam.sqrt()


def asvd_scale(abs_mean: torch.Tensor, alpha: float = 0.5, eps: float = 1e-6) -> torch.Tensor:
    """ASVD's diagonal (in,) float64: ``s_j = abs_mean_j ** alpha``, floored at ``eps * max(s)``
    (dead channels stay finite); all ones if every channel is zero (no information: plain SVD)."""
    check(abs_mean.dim() == 1, f"abs_mean must be 1-D (in_features,), got shape {tuple(abs_mean.shape)}")
    check(alpha >= 0 and eps > 0, f"asvd_scale needs alpha >= 0 and eps > 0, got alpha={alpha!r}, eps={eps!r}")
    m = abs_mean.detach().to(torch.float64)
    check(bool(torch.isfinite(m).all()) and bool((m >= 0).all()), "abs_mean must be finite and non-negative")
    s = m.pow(alpha)
    top = float(s.max())
    if top <= 0:
        return torch.ones_like(s)
    return s.clamp_min(eps * top)


@dataclass(frozen=True)
class GramScale:
    """Whitening given by its Gram: ``S S^T = G + damp * mean(diag G) I`` without forming ``S``
    (:func:`scaled_factors` uses ``G`` directly when ``out <= in``, without copying it; :meth:`matrix` is ``S``)."""

    gram: torch.Tensor
    damp: float = 0.0

    def matrix(self) -> torch.Tensor:
        return whitening_scale(self.gram, self.damp)


def _checked_gram(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """The Gram in float64, checked (:func:`_gram_view`) and symmetrised."""
    G, _ = _gram_view(gram, damp)
    return (G + G.T) / 2


def _gram_view(gram: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """``(G, c)``: the Gram in float64 (no copy when it is float64 already; not symmetrised) and the
    damping ``c = damp * mean(diag G)``; one-line errors for a bad shape, damp or non-finite / zero Gram."""
    check(gram.dim() == 2 and gram.shape[0] == gram.shape[1], f"Gram matrix must be square, got shape {tuple(gram.shape)}")
    check(damp >= 0 and damp == damp and damp != float("inf"), f"damp must be a finite number >= 0, got {damp!r}")
    G = gram.detach().to(torch.float64)
    check(bool(torch.isfinite(G).all()), "Gram matrix has NaN/Inf entries (non-finite layer inputs during calibration?)")
    mean = float(G.diagonal().mean())
    check(mean > 0, "Gram matrix is zero: no calibration tokens (or only zero inputs) reached this layer")
    return G, damp * mean


def _scaled_weight(W: torch.Tensor, scale) -> torch.Tensor:
    """``W S`` in float64 on ``W``'s device: ``scale`` None (identity), (in,) diagonal, (in, m) matrix
    or a :class:`GramScale` (its ``S`` is formed)."""
    check(W.dim() == 2, f"W must be a 2-D (out, in) matrix, got shape {tuple(W.shape)}")
    W64 = W.detach().to(torch.float64)
    if scale is None:
        return W64
    if isinstance(scale, GramScale):
        check(scale.gram.shape[0] == W.shape[1],
              f"Gram matrix is {tuple(scale.gram.shape)}, W has {W.shape[1]} input features")
        scale = scale.matrix()
    S = scale.detach().to(device=W.device, dtype=torch.float64)
    if S.dim() == 1:
        check(S.shape[0] == W.shape[1], f"diagonal scale has {S.shape[0]} entries, W has {W.shape[1]} input features")
        return W64 * S
    check(S.dim() == 2 and S.shape[0] == W.shape[1],
          f"scale matrix must be ({W.shape[1]}, m), got shape {tuple(S.shape)}")
    return W64 @ S


def _small_side(W: torch.Tensor, scale) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    """``("left", W S S^T W^T, None)`` when ``out <= in`` (and ``S`` is not wider than ``in``), else
    ``("right", S^T W^T W S, W S)``; float64 symmetric matrices on ``W``'s device."""
    check(W.dim() == 2, f"W must be a 2-D (out, in) matrix, got shape {tuple(W.shape)}")
    out, inn = W.shape
    if out <= inn:
        if isinstance(scale, GramScale):
            check(scale.gram.shape[0] == inn, f"Gram matrix is {tuple(scale.gram.shape)}, W has {inn} input features")
            # W (G + c I) W^T = W G W^T + c W W^T, symmetrised after: no in x in copy of G is made
            G, c = _gram_view(scale.gram, scale.damp)
            W64 = W.detach().to(torch.float64)
            M = (W64 @ G.to(W64.device)) @ W64.T
            if c > 0:
                M.add_(W64 @ W64.T, alpha=c)
        else:
            WS = _scaled_weight(W, scale)
            M = WS @ WS.T
        return "left", (M + M.T) / 2, None
    WS = _scaled_weight(W, scale)
    N = WS.T @ WS
    return "right", (N + N.T) / 2, WS


def scaled_spectrum(W: torch.Tensor, scale) -> torch.Tensor:
    """Singular values of ``W S`` (descending, float64, on CPU), through the small side (eigenvalues
    only); ``sum_{i>k} s_i^2`` is the output error of rank k on the calibration data when ``S S^T = G``."""
    _, M, _ = _small_side(W, scale)
    lam = torch.linalg.eigvalsh(M).flip(0).clamp_min(0.0)
    return lam[: min(W.shape)].sqrt().cpu()


def scaled_factors(W: torch.Tensor, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, sigma)``: the ``min(out, in)`` left singular vectors and singular values of ``W S``
    (descending), float64 on ``W``'s device, through the small side (module docstring); truncate with
    :func:`factors_from_basis` at any rank."""
    side, M, WS = _small_side(W, scale)
    lam, Q = torch.linalg.eigh(M)
    lam, Q = lam.flip(0).clamp_min(0.0), Q.flip(1)
    r = min(W.shape)
    sigma = lam[:r].sqrt()
    if side == "left":
        return Q[:, :r], sigma
    V = Q[:, :r]
    # sigma^2 are eigenvalues, resolved to ~eps * sigma_max^2, so sigma below ~sqrt(eps) * sigma_max is noise:
    # those directions get zero columns (W S V / sigma would not be orthonormal there)
    live = sigma > _LIVE * float(sigma[0]) if r and float(sigma[0]) > 0 else torch.zeros_like(sigma, dtype=torch.bool)
    U = (WS @ V) / torch.where(live, sigma, torch.ones_like(sigma))
    return U * live, sigma


def factors_from_basis(W: torch.Tensor, U: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` in ``W``'s dtype and device with ``A B = U_k U_k^T W`` (``U_k = U[:, :rank]``),
    rebalanced so that ``||A[:, i]|| = ||B[i]||`` for every i."""
    check(W.dim() == 2, f"W must be a 2-D (out, in) matrix, got shape {tuple(W.shape)}")
    max_rank = min(W.shape[0], W.shape[1], U.shape[1])
    check(isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= max_rank,
          f"rank must be an integer in [1, {max_rank}] for a {tuple(W.shape)} matrix, got {rank!r}")
    check(U.dim() == 2 and U.shape[0] == W.shape[0], f"basis U must have {W.shape[0]} rows, got shape {tuple(U.shape)}")
    Uk = U[:, :rank].to(device=W.device, dtype=torch.float64)
    B = Uk.T @ W.detach().to(torch.float64)
    norms = B.norm(dim=1)
    root = torch.where(norms > 0, norms, torch.ones_like(norms)).sqrt()
    A = Uk * root
    B = B / root[:, None]
    return A.to(W.dtype), B.to(W.dtype)


def scaled_svd(W: torch.Tensor, rank: int, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors ``(A, B)`` of ``W`` in the ``S``-weighted norm ``||(W - AB) S||_F``:
    ``A B = U_k U_k^T W`` with ``U_k`` from :func:`scaled_factors` (float64, the small side); ``W``'s dtype and device."""
    check(W.dim() == 2, f"W must be a 2-D (out, in) matrix, got shape {tuple(W.shape)}")
    max_rank = min(W.shape)
    check(isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= max_rank,
          f"rank must be an integer in [1, {max_rank}] for a {tuple(W.shape)} matrix, got {rank!r}")
    U, _ = scaled_factors(W, scale)
    return factors_from_basis(W, U, rank)


def output_error(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, gram: torch.Tensor) -> float:
    """``||(W - A B) X^T||_F^2 = trace(D G D^T)``, ``D = W - A B``, in float64 (clamped at 0 against rounding)."""
    dev = W.device
    D = W.detach().to(torch.float64) - A.detach().to(device=dev, dtype=torch.float64) @ B.detach().to(device=dev, dtype=torch.float64)
    G = gram.detach().to(device=dev, dtype=torch.float64)
    check(G.shape == (W.shape[1], W.shape[1]), f"Gram matrix must be ({W.shape[1]}, {W.shape[1]}), got shape {tuple(G.shape)}")
    return max(float(((D @ G) * D).sum()), 0.0)


def whiten_svd(W: torch.Tensor, rank: int, gram: torch.Tensor, damp: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-LLM: rank-``rank`` factors minimising the output error on the inputs whose Gram is ``gram``."""
    return scaled_svd(W, rank, GramScale(gram, damp))


def asvd(W: torch.Tensor, rank: int, abs_mean: torch.Tensor, alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """ASVD: rank-``rank`` factors of ``W diag(abs_mean ** alpha)``, mapped back to ``W``."""
    return scaled_svd(W, rank, asvd_scale(abs_mean, alpha))
