"""Sparsity-aware (weighted) low-rank approximation: LPAF step 2.

*Paper*: S. Ren, K. Q. Zhu, "Low-Rank Prune-And-Factorize for Language Model Compression",
LREC-COLING 2024, https://arxiv.org/abs/2306.14152.  Solver background: N. Srebro, T. Jaakkola,
"Weighted Low-Rank Approximations", ICML 2003.

*As published*: each matrix ``W`` (out, in) of the pruned model (pruned entries are 0) is
factorized as

    min_{A (out, k), B (k, in)}  || Omega * (W - A B) ||_F^2  =  sum_ij Omega_ij^2 (W - A B)_ij^2,

elementwise, with ``Omega`` of ``W``'s shape taken from step 1:

* "w/ S" (the paper's default): ``Omega`` = the first-order pruning importance scores ``S`` of
  every entry (kept and pruned alike);
* "w/ M" (ablation): ``Omega`` = the binary keep-mask ``M``, so pruned entries are free and the fit
  is low-rank matrix completion of the kept entries.

The weighted problem has no closed form in general; Srebro & Jaakkola's EM is the classical
algorithm for it, the one this module treats as the reference, and the default solver.

*Differs here* (each an option; ``sparsity_aware_svd``'s defaults are the paper's objective):

- **Score normalisation** (:func:`normalized_scores`).  A mapping from raw scores to ``Omega`` is
  needed and is ours: ``s / max(s)`` for non-negative scores, ``(s - min) / (max - min)`` when any
  score is negative.  For non-negative scores this *is* the raw-score objective (the minimiser
  does not depend on the scale of ``Omega``).  Signed scores (movement pruning) cannot be used raw:
  inside the norm a negative weight acts as ``s^2``, which would give the entries training pushed
  hardest towards zero the *largest* weights.  Nothing to restore.
- **Solver: Srebro-Jaakkola EM from the truncated SVD, up to 1000 steps (it stops earlier when
  an iteration lowers the objective by a relative 1e-4 or less, or -- the plateau rule, issue 30 --
  once its last 20 steps gained at most 1% of what it has gained so far), for every Omega**
  (``solver="auto"`` = ``"em_subspace"``).  The paper names no solver.  With first-order scores the
  objective's exact minimiser is degenerate: once a weight is pruned its score ``|w g|`` vanishes
  (PLATON's pruned entries score ~1e-10 of the largest on MiniLM, kept ones span 3-4 decades), so
  "w/ S" leaves ``A B`` nearly free on the pruned 75% and alternating least squares, which reaches
  that minimiser, fills them with values up to 375x the matrix's largest entry:
  ``||W - A B|| / ||W||`` averaged 4.10 over MiniLM's 36 matrices (plain SVD: 0.56), and the
  factorized model's MRPC F1 after step 2 varied from 0 to 79 between runs of the same fit
  (BENCHMARKS.md, issue 11 part 4; ``benchmarks/omega.py``).  EM from the SVD start moves towards
  the weighted fit without leaving the neighbourhood of ``W`` -- each iterate is a rank-k
  approximation of an entrywise convex combination of ``W`` and the previous iterate -- and on the same model
  it kept the error at 0.56 with max ``|A B|`` 0.96x ``max |W|``, while lowering the paper's
  objective to 0.13x the SVD's on average (J / J_svd; ALS: 0.06 at that cost).  ``solver="als"``
  (alternating least squares, exact per half-step, O(out * in * k^2) per sweep) and ``"em"`` (EM
  with the exact SVD M-step) remain options; ALS is the better solver of the *objective* (table
  below), not of the matrix.
- **0/1 masks ("w/ M") use EM** with one block-power step per iteration (``"em_subspace"``,
  Srebro-Jaakkola EM with an inexact, still monotone M-step: 5x cheaper per step and, measured,
  the same progress per step as the exact SVD M-step).  ``solver="em"`` gives the exact M-step.
- ``omega="scores_quantile"`` (kept entries weighted by their score's quantile among kept entries,
  pruned ones a flat ``1e-3``; factorlm's earlier construction) and ``decomposition="row"`` (``Omega``
  collapsed to one weight per input column, solved in closed form as FWSVD -- an approximation of
  the elementwise objective, exact only for column weights) are not in the paper.
- The maths runs in float32 (float64 for a float64 ``W`` or with ``compute_dtype``).  Measured on a
  1536x384 matrix with synthetic scores, float32 ALS matches float64 to 7 digits of the weighted
  error; with first-order scores ALS's degenerate result depends on rounding (one MiniLM matrix:
  ||W - A B|| / ||W|| = 3.19 in float32, 7.30 in float64).
- Per-block structures (``monarch_weighted`` / ``blockwise_weighted``) call this per block, so
  signed scores are min-max normalised per block (non-negative ones: no difference).

*Defaults and why* (measured: all-MiniLM-L6-v2 layer 0, each matrix pruned by magnitude to 25%
density, rank 64, scores ``|W|`` ("magnitude"), ``|W * G|`` ("sensitivity", ``G`` ~ N(0, 1)) and
``-W * G`` ("movement", signed); float32, 1 CPU thread (shared machine, +-30%).  ``gap`` =
``J_t / J_best - 1`` where ``J_best`` is the lowest weighted error any run reached (>= 100 ALS
sweeps, 1000-2000 EM steps); EM's exact and subspace M-steps give gaps per step within 10% of
each other, so one EM column serves both)::

    matrix     Omega        start   EM gap @100 / @1000   EM stop (tol 1e-4)   ALS gap @5 / @20     ALS stop (tol 1e-3) / (tol 1e-4)
    384x384    magnitude    2.37    0.35 / 0.065          it 647, gap 0.092    0.070 / 0.021        it 20, 0.021 / it 71, 0.0054
    384x384    sensitivity  9.3     2.3  / 0.60           it 1835, gap 0.41    0.24  / 0.079        it 41, 0.040 / it 132, 0.010
    384x384    movement     0.018   1.8e-4 / <1e-4        it 16, gap 1.2e-3    6.6e-4 / 1.6e-4      it 3, 1.1e-3 / it 7, 4.6e-4
    1536x384   magnitude    1.47    0.75 / 0.15           > 1000               0.039 / 0.010        it 15, 0.014 / it 58, 0.0024
    1536x384   sensitivity  4.46    2.4  / 0.66           > 1000               0.13  / 0.038        it 30, 0.025 / > 100 (= ref.)
    1536x384   movement     0.014   6.0e-4 / 1.3e-4 @644  it 20, gap 2.2e-3    7.1e-4 / 2.0e-4      it 3, 1.1e-3 / it 7, 5.3e-4
    384x1536   magnitude    2.23    1.6  / 1.4            it 485, gap 1.5      0.040 / 3.2e-3       it 17, 5.8e-3 / it 27, 6e-6
    384x1536   sensitivity  6.24    5.5  / 4.4            > 1000               0.14  / 0.042        it 30, 0.025 / it 74, 1.8e-4
    1536x384   mask (w/M)   8.95    0.49 / 0.0 (ref)      > 1000 (-0.11 @4000) ALS @100: +0.087 (17 s)

    time per step (EM exact / EM subspace / ALS sweep): 1536x384 and 384x1536 at rank 64:
    28-31 / 5.2-6.9 / 170-210 ms; 384x384 at rank 64: 14-26 / 2.1-2.4 / 44-80 ms; at rank 128:
    14-24 / 5.6-7.4 / 300-490 ms.

*The plateau rule* (``plateau=0.01, window=20``; ``plateau=0`` restores the cap-and-tol rule).  With
first-order scores EM's objective falls fast and then creeps: at BERT-base's sizes (768x768 rank 96,
3072x768 / 768x3072 rank 153, PLATON-like synthetic scores; ``benchmarks/lpaf_scale.py``) half of the
1000-step gain comes in ~20 steps, 90% only after ~400, and the per-step tol never fires, so the cap
decided: 34 min for BERT-base's 72 matrices on one CPU thread.  The plateau rule stops at ~300 steps
with ~86% of the 1000-step gain (the model barely depends on it: LPAF with plain SVD in step 2 is
within noise of the default, BENCHMARKS.md).  For a geometrically converging fit (``J_t - J* ~ r^t``)
the rule stops once the last 20 steps gain 1% of the total, which leaves ~1% of the initial excess
at fast rates but a third of it at ``r = 0.999``; tests of the solver's optima pass ``plateau=0``.  The
EM-subspace loop carries ``Z = A B`` in its state and takes the next right basis from a QR of the
projected rows instead of their SVD (the same iterates; 1.3-1.5x faster per step at these sizes).

This table compares the solvers on the objective alone, with synthetic gradients, before the
degenerate minimiser was found on real first-order scores (above).  ``solver="auto"`` is now
EM-subspace for every Omega with ``iters=1000`` (5.5 s per 1536x384 matrix; ~3 min for MiniLM's 36
matrices at rank 64, measured by ``benchmarks/omega.py``); ``solver="als"`` stops after 7-74 sweeps on 1536x384 and 384x1536 (1.3-14 s
per matrix) within 0.25% of the best value seen, or at its cap (100 sweeps).  Matrix completion from
25% of the entries is slow for every solver -- 4000 EM steps still gain 11% -- raise ``iters`` to go
further for a 0/1 mask (with first-order scores, not: see above).  ``omega="scores_quantile"`` (floored
at ``eps``, not degenerate) also runs EM by default now, where ALS progresses faster.  The
stopping rule is the relative decrease per iteration ``(J_{t-1} - J_t) / J_{t-1} <= tol``; note
that it fires long before the optimum for slow solvers (EM with score weights at tol 1e-3 stops
27-570% above it), so for EM the iteration cap, not ``tol``, sets the quality.  ALS cost grows as
O(out * in * k^2): ~4x per doubling of the rank (on a GPU this is negligible).

*Lifecycle*: pure functions, no state: tensors in, factors ``(A, B)`` with ``A @ B ~ W`` out in
``W``'s dtype on ``W``'s device.  LPAF calls :func:`sparsity_aware_svd` once per target matrix
after step 1 finalised the masks/scores (``LowRankLinear.from_linear(..., decompose=...)``), before
the mixed-rank fine-tuning; nothing here keeps the scores or masks.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

from ..errors import check
from .omega import OMEGAS, make_omega, mask_to_omega, normalized_scores, score_quantile_omega  # noqa: F401 (re-exported)
from .svd import compute_dtype_for, split_factors, svd, truncated_svd

#: values of ``sparsity_aware_svd(decomposition=...)`` (LPAF's ``--decomposition``)
DECOMPOSITIONS = ("em", "row", "svd")
#: values of ``sparsity_aware_svd(omega=...)`` (LPAF's ``--omega``)
#: values of ``sparsity_aware_svd(solver=...)`` / ``weighted_low_rank(solver=...)``
SOLVERS = ("auto", "als", "em", "em_subspace")
#: older spellings (``weighted_svd_em``'s own ``solver`` values)
SOLVER_ALIASES = {"svd": "em", "subspace": "em_subspace"}

#: the defaults (measured: module docstring)
DEFAULT_SOLVER = "auto"
DEFAULT_ITERS = {"als": 100, "em": 1000, "em_subspace": 1000}
DEFAULT_TOL = 1e-4
#: EM's plateau rule (``weighted_svd_em(plateau=, window=)``): stop when the last 20 steps gained at most
#: 1% of what EM has gained so far (measured at BERT-base's sizes: benchmarks/lpaf_scale.py)
DEFAULT_PLATEAU = 0.01
DEFAULT_WINDOW = 20

#: ``init`` of the iterative solvers: None / "svd" / "weighted" / "best" or factors ``(A0, B0)``
Init = Union[str, Sequence[torch.Tensor], None]


def _check_rank(W: torch.Tensor, rank: int) -> None:
    check(W.dim() == 2, f"expected a matrix, got shape {tuple(W.shape)}")
    check(1 <= rank <= min(W.shape), f"rank must be in [1, {min(W.shape)}] for a {W.shape[0]}x{W.shape[1]} matrix, got {rank}")


def weighted_error(W: torch.Tensor, Omega: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    """``|| Omega * (W - A B) ||_F^2`` (computed in float64)."""
    W64, O64 = W.to(torch.float64), Omega.to(torch.float64)
    R = W64 - A.to(torch.float64) @ B.to(torch.float64)
    return float((O64 * R).pow(2).sum())


# -- shared plumbing ---------------------------------------------------------------------------------
def _rank_k(X: torch.Tensor, rank: int):
    """Balanced factors of the best rank-``rank`` approximation of ``X`` plus its right basis ``V``
    (in, k).  A wide ``X`` is decomposed through ``X^T`` (LAPACK is ~2x faster on tall input)."""
    if X.shape[0] < X.shape[1]:
        U, S, Vh = torch.linalg.svd(X.T, full_matrices=False)  # X = Vh^T S U^T
        U, Vh = Vh[:rank].T, U[:, :rank].T
    else:
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    A, B = split_factors(U, S, Vh, rank)
    return A, B, Vh[:rank].T


def _setup(W: torch.Tensor, Omega: torch.Tensor, rank: int, iters: int, tol: float, compute_dtype):
    """Checks; ``(Wc, Om, w, cd)`` with ``w = (Omega / max)^2`` in [0, 1], or None if ``Omega == 0``."""
    _check_rank(W, rank)
    check(Omega.shape == W.shape, f"Omega must have W's shape {tuple(W.shape)}, got {tuple(Omega.shape)}")
    check(iters >= 0 and tol >= 0, f"iters and tol must be >= 0, got {iters}, {tol}")
    cd = compute_dtype_for(W, compute_dtype)
    Wc = W.detach().to(cd)
    Om = Omega.detach().to(device=Wc.device, dtype=cd).clamp_min(0)
    mx = Om.max()
    if float(mx) <= 0.0:
        return None
    return Wc, Om, (Om / mx).pow(2), cd


def _initial_factors(Wc: torch.Tensor, w: torch.Tensor, rank: int, init: Init, err: Callable) -> tuple:
    if init is None or isinstance(init, str):
        choice = init or "svd"
        check(choice in ("best", "svd", "weighted"), f"init must be None, 'svd', 'weighted', 'best' or (A, B), got {init!r}")
        cands = []
        if choice in ("best", "svd"):
            cands.append(_rank_k(Wc, rank)[:2])
        if choice in ("best", "weighted"):
            cands.append(_rank_k(w * Wc, rank)[:2])
        return min(cands, key=lambda c: err(*c))
    A0, B0 = init
    check(tuple(A0.shape) == (Wc.shape[0], rank) and tuple(B0.shape) == (rank, Wc.shape[1]),
          f"init factors must have shapes {(Wc.shape[0], rank)} and {(rank, Wc.shape[1])}")
    return A0.detach().to(Wc), B0.detach().to(Wc)


def _iterate(step: Callable, state: tuple, err: Callable, iters: int, tol: float, guard: bool, cd,
             plateau: float = 0.0, window: int = DEFAULT_WINDOW, err_of_state: Callable | None = None) -> tuple:
    """Run ``state = step(*state)`` (``state[:2] = (A, B)``) with the stopping rules and the guard.

    Stops after ``iters`` steps; when one step lowers ``J`` by a relative ``tol`` or less; or, with
    ``plateau > 0``, at the first ``t >= window`` where the last ``window`` steps lowered ``J`` by at
    most ``plateau`` times what all ``t`` steps gained (``J_{t-window} - J_t <= plateau (J_0 - J_t)``:
    the error has stopped falling, relative to the progress made).  ``err_of_state(state)`` (default
    ``err(*state[:2])``) computes ``J`` from a state."""
    of = err_of_state or (lambda st: err(*st[:2]))
    history = [of(state)]
    for _ in range(iters):
        new = step(*state)
        e = of(new)
        prev = history[-1]
        if guard and e > prev:  # round-off at convergence: keep the better previous iterate
            break
        state = new
        history.append(e)
        if prev - e <= tol * max(prev, torch.finfo(cd).tiny):
            break
        t = len(history) - 1
        if plateau > 0 and t >= window and history[t - window] - e <= plateau * (history[0] - e):
            break
    return state, history


# -- Srebro-Jaakkola EM ------------------------------------------------------------------------------
def _subspace_step(X: torch.Tensor, V: torch.Tensor, rank: int):
    """One block-power step from the right basis ``V`` of ``Z_{t-1}``: ``Q = orth(X V)``, ``Z = Q Q^T X``.

    ``||X - Q Q^T X|| <= ||X - X V V^T|| <= ||X - Z_{t-1}||`` (``Q Q^T X`` is the best approximation
    of ``X`` with columns in ``span(X V)``, which holds ``X V V^T``; ``X V V^T`` is the best with rows
    in ``span(V)``, which holds ``Z_{t-1}``), so this still decreases the EM bound -- a *generalised*
    EM step -- at O(out * in * k) instead of a full SVD.
    """
    Q, _ = torch.linalg.qr(X @ V)
    C = Q.T @ X  # (k, in)
    u, s, vh = torch.linalg.svd(C, full_matrices=False)
    A, B = split_factors(Q @ u, s, vh, rank)
    return A, B, vh[:rank].T


def weighted_svd_em_step(
    W: torch.Tensor, w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, solver: str = "svd",
    V: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One raw (unguarded) EM step for ``min sum w (W - A B)^2`` from ``Z = A B``.

    E-step: fill in ``X = w * W + (1 - w) * Z``; M-step: ``Z' =`` the best rank-k approximation of
    ``X`` (``solver="svd"``) or one block-power step towards it (``"subspace"``, from the right basis
    ``V`` of ``Z``; computed from ``B`` when None).  ``Q(Z) = ||X - Z||_F^2 + const`` majorises
    ``J(Z) = sum w (W - Z)^2`` (the gap is ``sum (1 - w)(Z - Z_{t-1})^2 >= 0``) and touches it at
    ``Z_{t-1}``, so ``J(Z') <= Q(Z') <= Q(Z_{t-1}) = J(Z_{t-1})``.  ``W``, ``w``, ``A``, ``B`` share
    one float dtype; ``w`` must lie in [0, 1].  Returns ``(A', B', V')``.
    """
    check(solver in ("svd", "subspace"), f"solver must be 'svd' or 'subspace', got {solver!r}")
    rank = A.shape[1]
    Z = A @ B
    X = Z + w * (W - Z)  # = w * W + (1 - w) * Z
    if solver == "svd":
        return _rank_k(X, rank)
    if V is None:
        V = torch.linalg.qr(B.T)[0]
    return _subspace_step(X, V, rank)


def weighted_svd_em(
    W: torch.Tensor,
    Omega: torch.Tensor,
    rank: int,
    iters: int | None = None,
    tol: float = DEFAULT_TOL,
    init: Init = None,
    compute_dtype: torch.dtype | None = None,
    solver: str = "svd",
    guard: bool = True,
    plateau: float = DEFAULT_PLATEAU,
    window: int = DEFAULT_WINDOW,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Rank-``rank`` factors minimising ``||Omega * (W - A B)||_F^2`` by Srebro-Jaakkola EM.

    Args:
        W: (out, in) matrix.  Omega: weights >= 0 of the same shape (only relative values matter:
            the EM runs on ``w = (Omega / max Omega)^2`` in [0, 1]; the minimiser is unchanged).
        rank: target rank k.
        iters: maximum EM iterations (None: ``DEFAULT_ITERS``, 1000).  tol: stop when the relative
            decrease of the weighted error over one iteration, ``(J_{t-1} - J_t) / J_{t-1}``, falls
            to ``tol`` or below.  Convergence is slow when the typical ``w`` is small next to the
            largest (module docstring); with first-order scores that slowness is what keeps the
            iterates near ``W`` (the objective's exact minimiser, which :func:`weighted_svd_als`
            reaches, is degenerate), so a much larger ``iters`` drifts towards it.
        init: ``None``/``"svd"`` (default) = the truncated SVD of ``W``; ``"weighted"`` = that of
            ``w * W`` (the first EM step from ``Z = 0``); ``"best"`` = the better of the two under
            ``J``; or explicit factors ``(A0, B0)``.
        compute_dtype: float32/float64 (default float32, float64 for float64 ``W``).
        solver: ``"svd"`` = exact EM (a full SVD per iteration); ``"subspace"`` = one block-power
            step per iteration (generalised EM, also monotone; measured: same progress per step
            on MiniLM matrices, ~5x cheaper).
        plateau, window: stop at the first ``t >= window`` where the last ``window`` iterations lowered
            the error by at most ``plateau`` times the whole gain so far (``plateau=0``: only ``iters``
            and ``tol`` stop it, the rule before issue 30).  EM's weighted error falls fast and then
            creeps for thousands of iterations; at BERT-base's sizes the default (0.01 over 20) ends
            it after a few hundred iterations with ~80-90% of what 1000 would gain.
        guard: stop, without accepting it, at the first iterate whose error exceeds the previous
            one's.  Exact arithmetic never triggers it (:func:`weighted_svd_em_step` never increases
            ``J``); round-off at convergence can.  ``guard=False`` records every raw iterate.

    Returns:
        ``(A, B, history)``: factors in ``W``'s dtype and ``history[t] = ||Omega * (W - A_t B_t)||_F^2``
        (``history[0]`` = the initialisation).
    """
    check(solver in ("svd", "subspace"), f"solver must be 'svd' or 'subspace', got {solver!r}")
    iters = DEFAULT_ITERS["em"] if iters is None else iters
    prep = _setup(W, Omega, rank, iters, tol, compute_dtype)
    if prep is None:  # nothing observed: any rank-k matrix is optimal
        A, B = truncated_svd(W, rank, compute_dtype)
        return A, B, [0.0]
    Wc, Om, w, cd = prep

    def err(A, B) -> float:
        return float((Om * (Wc - A @ B)).pow(2).sum())

    check(plateau >= 0 and int(window) >= 1, f"plateau must be >= 0 and window >= 1, got {plateau}, {window}")
    A, B = _initial_factors(Wc, w, rank, init, err)
    if solver == "subspace":
        # the loop carries (Q, C, V, Z): Z = Q C, V an orthonormal basis of C's rows (a QR of C^T, not
        # C's SVD: only the span enters the next step, so the iterates are _subspace_step's); the
        # balanced factors come from one SVD of the last C
        def step(Q, C, V, Z):
            X = Z + w * (Wc - Z)
            Q = torch.linalg.qr(X @ V)[0]
            C = Q.T @ X
            return Q, C, torch.linalg.qr(C.T)[0], Q @ C

        state = (None, None, torch.linalg.qr(B.T)[0], A @ B)
        (Q, C, _, _), history = _iterate(step, state, err, iters, tol, guard, cd, plateau, int(window),
                                         err_of_state=lambda st: float((Om * (Wc - st[3])).pow(2).sum()))
        if C is not None:
            u, sv, vh = torch.linalg.svd(C, full_matrices=False)
            A, B = split_factors(Q @ u, sv, vh, rank)
        return A.to(W.dtype), B.to(W.dtype), history
    (A, B, _), history = _iterate(lambda A, B, V: weighted_svd_em_step(Wc, w, A, B, solver, V),
                                  (A, B, None), err, iters, tol, guard, cd, plateau, int(window))
    return A.to(W.dtype), B.to(W.dtype), history


# -- alternating weighted least squares --------------------------------------------------------------
def _wls_rows(W: torch.Tensor, w: torch.Tensor, B: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin_A sum w (W - A B)^2``, one weighted regression per row:
    ``a_i = (B diag(w_i) B^T)^{-1} B diag(w_i) W_i^T``.  Each k x k Gram matrix gets ``ridge * tr / k``
    on its diagonal (a row with fewer than k observed entries -- a 0/1 ``w`` -- is underdetermined;
    the ridge picks its small-norm solution).  Rows go in chunks so the (chunk, k, in) intermediate
    stays around 32 MB."""
    m, n = W.shape
    k = B.shape[0]
    rhs = (w * W) @ B.T  # (m, k)
    out = torch.empty_like(rhs)
    eye = torch.eye(k, dtype=W.dtype, device=W.device)
    step = max(1, (8 << 20) // max(1, k * n))
    for i in range(0, m, step):
        G = (B[None] * w[i:i + step, None, :]) @ B.T  # (c, k, k)
        tr = G.diagonal(dim1=1, dim2=2).sum(-1) / k
        G = G + (ridge * tr.clamp_min(torch.finfo(W.dtype).tiny))[:, None, None] * eye
        L, info = torch.linalg.cholesky_ex(G)
        if bool((info > 0).any()):  # numerically singular despite the ridge: least squares
            out[i:i + step] = torch.linalg.lstsq(G, rhs[i:i + step, :, None]).solution[..., 0]
        else:
            out[i:i + step] = torch.cholesky_solve(rhs[i:i + step, :, None], L)[..., 0]
    return out


def weighted_svd_als_step(
    W: torch.Tensor, w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, ridge: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One raw ALS sweep for ``min sum w (W - A B)^2``: ``A`` exactly given ``B``, then ``B`` given the
    new ``A``; each half-step is an exact minimisation, so ``J`` cannot increase (up to the ridge,
    default ``10 * eps`` of the dtype, relative).  ``w >= 0`` of any scale.  Returns ``(A', B')``."""
    if ridge is None:
        ridge = 10 * torch.finfo(W.dtype).eps
    A = _wls_rows(W, w, B, ridge)
    B = _wls_rows(W.T, w.T, A.T, ridge).T
    return A, B


def weighted_svd_als(
    W: torch.Tensor,
    Omega: torch.Tensor,
    rank: int,
    iters: int | None = None,
    tol: float = DEFAULT_TOL,
    init: Init = None,
    compute_dtype: torch.dtype | None = None,
    guard: bool = True,
    ridge: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Rank-``rank`` factors minimising ``||Omega * (W - A B)||_F^2`` by alternating weighted least squares.

    The objective of :func:`weighted_svd_em`, solved by block-coordinate descent: given ``B``, each
    row of ``A`` is a weighted linear regression with a closed form (the inner step of Srebro &
    Jaakkola's gradient method, their sec. 3), and symmetrically for ``B``.  Unlike EM's, its
    progress does not depend on how small the typical weight is next to the largest.  Cost per
    sweep O(out * in * k^2).  ``iters`` None: ``DEFAULT_ITERS["als"]`` (100).  The other arguments,
    ``history`` and ``guard`` as in :func:`weighted_svd_em` (ALS re-solves ``A`` first, so of an
    ``init`` only ``B0`` matters; the SVD start measured best, ahead of ``"weighted"`` and the
    column-collapsed closed form).
    """
    iters = DEFAULT_ITERS["als"] if iters is None else iters
    prep = _setup(W, Omega, rank, iters, tol, compute_dtype)
    if prep is None:
        A, B = truncated_svd(W, rank, compute_dtype)
        return A, B, [0.0]
    Wc, Om, w, cd = prep

    def err(A, B) -> float:
        return float((Om * (Wc - A @ B)).pow(2).sum())

    A, B = _initial_factors(Wc, w, rank, init, err)
    (A, B), history = _iterate(lambda A, B: weighted_svd_als_step(Wc, w, A, B, ridge), (A, B), err, iters, tol, guard, cd)
    return A.to(W.dtype), B.to(W.dtype), history


def weighted_low_rank(
    W: torch.Tensor,
    Omega: torch.Tensor,
    rank: int,
    solver: str = DEFAULT_SOLVER,
    iters: int | None = None,
    tol: float = DEFAULT_TOL,
    init: Init = None,
    compute_dtype: torch.dtype | None = None,
    guard: bool = True,
    plateau: float = DEFAULT_PLATEAU,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """``min ||Omega * (W - A B)||_F^2`` with ``solver`` in :data:`SOLVERS`: ``"als"``
    (:func:`weighted_svd_als`), ``"em"`` (exact EM, :func:`weighted_svd_em` ``solver="svd"``),
    ``"em_subspace"`` (generalised EM, ``solver="subspace"``) or ``"auto"`` (default: ``"em_subspace"``
    for every ``Omega``: ALS's exact minimiser is degenerate for first-order scores, module
    docstring).  ``iters`` None: the solver's ``DEFAULT_ITERS``; ``plateau``: EM's plateau rule
    (:func:`weighted_svd_em`; ALS stops by ``tol``).  Returns ``(A, B, history)``."""
    solver = SOLVER_ALIASES.get(solver, solver)
    check(solver in SOLVERS, f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "auto":  # EM for every Omega: ALS's exact minimiser is unbounded for first-order scores
        solver = "em_subspace"
    iters = DEFAULT_ITERS[solver] if iters is None else iters
    if solver == "als":
        return weighted_svd_als(W, Omega, rank, iters=iters, tol=tol, init=init, compute_dtype=compute_dtype, guard=guard)
    return weighted_svd_em(W, Omega, rank, iters=iters, tol=tol, init=init, compute_dtype=compute_dtype,
                           solver="svd" if solver == "em" else "subspace", guard=guard, plateau=plateau)


# -- the closed-form separable approximation ---------------------------------------------------------
def row_weighted_svd(
    W: torch.Tensor,
    Omega: torch.Tensor,
    rank: int,
    dim: int | None = 1,
    compute_dtype: torch.dtype | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form weighted SVD after collapsing ``w = Omega^2`` to separable weights.

    ``dim=1`` (default): one weight per *column* = input feature, ``c_j = mean_i w_ij`` (for a
    keep-mask: the fraction of column ``j`` that survived pruning), and

        min || (W - A B) diag(sqrt c) ||_F^2   solved exactly as FWSVD:  SVD of ``W diag(sqrt c)``,
        then ``B <- B diag(sqrt c)^{-1}``.

    (FWSVD calls this "row-weighted": it weights the rows of ``W^T``.)  Columns are the better-founded
    axis: the error a layer makes on its output, ``E||(W - AB) x||^2``, is weighted per input
    feature (the columns in nn.Linear's (out, in) layout), which is also the axis FWSVD's Fisher
    importance and activation-aware methods use, and ``c_j`` preserves each column's total weight.
    ``dim=0`` collapses to rows instead; ``dim=None`` uses the rank-one (independence) fit
    ``w_ij ~ r_i c_j / mean(w)`` and scales both sides -- exact whenever the weights are separable.
    Weights are floored at ``eps * max`` so fully pruned rows/columns stay invertible (their factors
    then come out as the least-squares fit in the retained subspace).  This is *not* the elementwise
    objective but a fast approximation of it (exact only for separable weights).
    """
    _check_rank(W, rank)
    check(Omega.shape == W.shape, f"Omega must have W's shape {tuple(W.shape)}, got {tuple(Omega.shape)}")
    check(dim in (0, 1, None), f"dim must be 0 (rows), 1 (columns) or None (both), got {dim!r}")
    cd = torch.float64 if compute_dtype is None else compute_dtype
    Wc = W.detach().to(cd)
    w = Omega.detach().to(device=Wc.device, dtype=cd).clamp_min(0).pow(2)
    if float(w.max()) <= 0.0:
        return truncated_svd(W, rank, compute_dtype)

    def scale(v: torch.Tensor) -> torch.Tensor:
        v = v / v.max()
        return v.clamp_min(eps).sqrt()

    r = scale(w.mean(dim=1)) if dim in (0, None) else None  # per row
    c = scale(w.mean(dim=0)) if dim in (1, None) else None  # per column
    X = Wc
    if r is not None:
        X = X * r[:, None]
    if c is not None:
        X = X * c[None, :]
    U, S, Vh = svd(X, cd)
    A, B = split_factors(U, S, Vh, rank)
    if r is not None:
        A = A / r[:, None]
    if c is not None:
        B = B / c[None, :]
    return A.to(W.dtype), B.to(W.dtype)


def sparsity_aware_svd(
    W: torch.Tensor,
    rank: int,
    mask: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    decomposition: str | None = None,
    *,
    omega: str | None = None,
    solver: str = DEFAULT_SOLVER,
    iters: int | None = None,
    tol: float = DEFAULT_TOL,
    init: Init = None,
    dim: int | None = 1,
    eps: float = 1e-3,
    compute_dtype: torch.dtype | None = None,
    mode: str | None = None,
    plateau: float = DEFAULT_PLATEAU,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LPAF's sparsity-aware SVD of a pruned matrix ``W``: factors ``(A, B)``, ``A @ B ~ W``.

    Args:
        W: (out, in) pruned matrix.  rank: target rank.
        mask: bool keep-mask of ``W``'s shape.  scores: the raw pruning importance scores.
        decomposition: ``"em"`` (default; LPAF ``--decomposition em``) = the paper's elementwise
            objective ``min ||Omega * (W - A B)||_F`` by :func:`weighted_low_rank` (``solver``,
            ``iters``, ``tol``, ``init``); ``"row"`` = the closed-form column-collapsed
            approximation :func:`row_weighted_svd` (``dim``); ``"svd"`` = plain truncated SVD
            (Omega ignored).  ``mode`` is the older name of this argument.
        omega: ``"scores"`` (LPAF "w/ S") = :func:`normalized_scores` of every entry;
            ``"scores_quantile"`` = :func:`score_quantile_omega` (kept-entry quantiles, pruned
            ``eps``); ``"mask"`` (LPAF "w/ M") = 0/1 keep-mask.  Default: ``"scores"`` if ``scores``
            is given, else ``"mask"`` if ``mask`` is given, else plain truncated SVD.  Where a mask
            is needed and ``mask`` is None, ``W != 0`` is used.
        solver: ``"auto"`` (default: EM-subspace for every Omega), ``"als"``, ``"em"`` (exact EM)
            or ``"em_subspace"`` (``"svd"`` / ``"subspace"`` accepted).
        iters: cap on iterations (None: the solver's default, EM 1000 / ALS 100).
        plateau: EM's plateau stopping rule (:func:`weighted_svd_em`; 0 = run to ``iters`` / ``tol``).
        compute_dtype: float32/float64 for the iterative fit (default float32, float64 for a
            float64 ``W``).

    Signature-compatible with ``LowRankLinear.from_linear(linear, rank, decompose=sparsity_aware_svd,
    mask=..., scores=...)`` and the per-block structures (``monarch_weighted`` / ``blockwise_weighted``
    slice ``mask`` / ``scores`` per block).
    """
    if mode is not None:
        check(decomposition is None or decomposition == mode,
              f"decomposition={decomposition!r} and its older name mode={mode!r} disagree")
        decomposition = mode
    decomposition = decomposition or "em"
    check(decomposition in DECOMPOSITIONS, f"decomposition must be one of {DECOMPOSITIONS}, got {decomposition!r}")
    check(omega is None or omega in OMEGAS, f"omega must be one of {OMEGAS}, got {omega!r}")
    check(SOLVER_ALIASES.get(solver, solver) in SOLVERS, f"solver must be one of {SOLVERS}, got {solver!r}")
    _check_rank(W, rank)
    if omega is None:
        omega = "scores" if scores is not None else "mask" if mask is not None else None
    if decomposition == "svd" or omega is None:
        return truncated_svd(W, rank, compute_dtype)
    Omega = make_omega(omega, W, mask, scores, eps)
    if decomposition == "row":
        return row_weighted_svd(W, Omega, rank, dim=dim, compute_dtype=compute_dtype)
    A, B, _ = weighted_low_rank(W, Omega, rank, solver=solver, iters=iters, tol=tol, init=init,
                                compute_dtype=compute_dtype, plateau=plateau)
    return A, B
