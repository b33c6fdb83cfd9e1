"""Block-wise low-rank approximation: cut ``W`` into a grid of blocks, truncated SVD per block.

``W`` (out, in) is cut into ``nblocks_out x nblocks_in`` equal blocks ``W_ij`` of shape
``(out / nblocks_out, in / nblocks_in)``; block ``(i, j)`` is approximated by ``A_ij @ B_ij`` of
rank ``r_ij``.  Because the blocks share no parameters, the Frobenius error splits into a sum over
blocks, ``||W - W~||^2 = sum_ij ||W_ij - A_ij B_ij||^2``, and the joint optimum is the
independent Eckart-Young optimum of every block: one **batched** truncated SVD over the stack of
blocks (all blocks have the same shape).

Factor layout (shared with :class:`factorlm.layers.blockwise.BlockLowRankLinear`): the per-block
factors are concatenated along the rank axis in row-major block order ``(i, j)``:

* ``A``: ``(out / nblocks_out, K)``, columns ``offset_ij : offset_ij + r_ij`` are ``A_ij``;
* ``B``: ``(K, in / nblocks_in)``, rows ``offset_ij : offset_ij + r_ij`` are ``B_ij``;

with ``K = sum_ij r_ij``.  With a uniform rank ``r`` this is simply
``A.view(n_out, nblocks_out, nblocks_in, r)[:, i, j]`` and ``B.view(nblocks_out, nblocks_in, r, n_in)[i, j]``.

``block_rank`` is an ``int`` (the same rank for every block) or a ``nblocks_out x nblocks_in``
nested list (per-block ranks, ``0 <= r_ij <= min(block shape)``; a rank-0 block is all zeros).
"""

from __future__ import annotations

from numbers import Integral
from typing import Sequence, Union

import torch

from ..errors import FactorLMError, check
from .svd import svd

BlockRank = Union[int, Sequence[Sequence[int]]]


def is_uniform(block_rank: BlockRank) -> bool:
    """True for a single (uniform) integer rank, False for a per-block nested list."""
    return isinstance(block_rank, Integral) and not isinstance(block_rank, bool)


def check_grid(out_features: int, in_features: int, nblocks_out: int, nblocks_in: int, what: str = "block grid") -> tuple[int, int]:
    """Validate a ``nblocks_out x nblocks_in`` grid for an (out, in) matrix; returns the block shape."""
    for name, nb in (("nblocks_out", nblocks_out), ("nblocks_in", nblocks_in)):
        check(isinstance(nb, int) and not isinstance(nb, bool) and nb >= 1, f"{what}: {name} must be a positive integer, got {nb!r}")
    check(
        out_features % nblocks_out == 0 and in_features % nblocks_in == 0,
        f"{what}: a {out_features}x{in_features} matrix cannot be cut into {nblocks_out}x{nblocks_in} equal blocks "
        f"({out_features} % {nblocks_out} = {out_features % nblocks_out}, {in_features} % {nblocks_in} = {in_features % nblocks_in})",
    )
    return out_features // nblocks_out, in_features // nblocks_in


def normalize_block_ranks(block_rank: BlockRank, nblocks_out: int, nblocks_in: int, max_rank: int) -> tuple[tuple[int, ...], ...]:
    """``block_rank`` (int or nested list) -> ``nblocks_out x nblocks_in`` tuple of ints, validated."""
    if isinstance(block_rank, bool):
        raise FactorLMError(f"block_rank must be an integer or a {nblocks_out}x{nblocks_in} list of integers, got {block_rank!r}")
    if is_uniform(block_rank):
        block_rank = int(block_rank)
        check(1 <= block_rank <= max_rank, f"block_rank must be in [1, {max_rank}] for blocks of this shape, got {block_rank}")
        return tuple(tuple(block_rank for _ in range(nblocks_in)) for _ in range(nblocks_out))
    try:
        ranks = tuple(tuple(int(r) if int(r) == r else None for r in row) for row in block_rank)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise FactorLMError(
            f"block_rank must be an integer or a {nblocks_out}x{nblocks_in} list of integers, got {block_rank!r}"
        ) from None
    check(
        len(ranks) == nblocks_out and all(len(row) == nblocks_in for row in ranks) and all(r is not None for row in ranks for r in row),
        f"per-block ranks must be a {nblocks_out}x{nblocks_in} list of integers, got {block_rank!r}",
    )
    check(all(0 <= r <= max_rank for row in ranks for r in row), f"per-block ranks must be in [0, {max_rank}], got {block_rank!r}")
    check(sum(r for row in ranks for r in row) >= 1, "per-block ranks are all 0 (the layer would have no weights)")
    return ranks  # type: ignore[return-value]


def rank_offsets(ranks: tuple[tuple[int, ...], ...]) -> list[int]:
    """Start of every block's slice along the rank axis, row-major, plus the total ``K`` at the end."""
    offs = [0]
    for row in ranks:
        for r in row:
            offs.append(offs[-1] + r)
    return offs


def split_blocks(W: torch.Tensor, nblocks_out: int, nblocks_in: int) -> torch.Tensor:
    """``(out, in)`` -> ``(nblocks_out, nblocks_in, out/nblocks_out, in/nblocks_in)``, ``[i, j]`` = block ``W_ij``."""
    n_out, n_in = check_grid(W.shape[0], W.shape[1], nblocks_out, nblocks_in)
    return W.reshape(nblocks_out, n_out, nblocks_in, n_in).transpose(1, 2)


def merge_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_blocks`."""
    bo, bi, n_out, n_in = blocks.shape
    return blocks.transpose(1, 2).reshape(bo * n_out, bi * n_in)


def batched_truncated_svd(blocks: torch.Tensor, rank: int, compute_dtype: torch.dtype | None = None):
    """Balanced rank-``rank`` factors of every matrix in a stack ``(..., m, n)``: ``(..., m, r)``, ``(..., r, n)``.

    Computed (and returned) in float32/float64 - the batched analogue of
    :func:`factorlm.decompose.svd.truncated_svd` (``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) Vh_r``).
    """
    U, S, Vh = svd(blocks, compute_dtype)
    root = S[..., :rank].sqrt()
    return U[..., :rank] * root[..., None, :], root[..., :, None] * Vh[..., :rank, :]


def blockwise_lowrank(
    W: torch.Tensor,
    nblocks_out: int,
    nblocks_in: int,
    block_rank: BlockRank,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal (Frobenius) block-wise low-rank factors ``(A, B)`` of ``W`` in the layout described above.

    One batched SVD over the ``nblocks_out * nblocks_in`` blocks, in float32/float64; returned in
    ``W``'s dtype.  ``A``: ``(out/nblocks_out, K)``, ``B``: ``(K, in/nblocks_in)``.
    """
    n_out, n_in = check_grid(W.shape[0], W.shape[1], nblocks_out, nblocks_in)
    ranks = normalize_block_ranks(block_rank, nblocks_out, nblocks_in, min(n_out, n_in))
    rmax = max(r for row in ranks for r in row)
    A4, B4 = batched_truncated_svd(split_blocks(W, nblocks_out, nblocks_in), rmax, compute_dtype)
    return _assemble(A4, B4, ranks, is_uniform(block_rank), W.dtype)


def _assemble(A4, B4, ranks, uniform: bool, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block factors (``A4[i][j]`` (n_out, >= r_ij), ``B4[i][j]`` (>= r_ij, n_in)) -> the layout's ``(A, B)``."""
    if uniform:  # one stacked tensor per factor: a pure reshape
        n_out, n_in = A4.shape[2], B4.shape[3]
        A = A4[..., : ranks[0][0]].permute(2, 0, 1, 3).reshape(n_out, -1)
        B = B4[..., : ranks[0][0], :].reshape(-1, n_in)
    else:
        A = torch.cat([A4[i][j][:, :r] for i, row in enumerate(ranks) for j, r in enumerate(row)], dim=1)
        B = torch.cat([B4[i][j][:r, :] for i, row in enumerate(ranks) for j, r in enumerate(row)], dim=0)
    return A.to(dtype).contiguous(), B.to(dtype).contiguous()


def block_kwargs(kwargs: dict, shape: tuple[int, int], rows: slice, cols: slice) -> dict:
    """The share of a weighted decomposition's per-matrix arguments that belongs to one block.

    Tensors shaped like the matrix (a pruning mask, first-order scores) are cut to the block; a 1-D
    tensor is a per-feature weight along the axis named by ``kwargs["dim"]`` (1 = columns = input
    features, the default and FWSVD's convention; 0 = rows) and is cut to the block's features.
    Everything else is passed through.
    """
    out = {}
    for k, v in kwargs.items():
        if torch.is_tensor(v) and v.dim() == 2 and tuple(v.shape) == tuple(shape):
            v = v[rows, cols]
        elif torch.is_tensor(v) and v.dim() == 1:
            axis = kwargs.get("dim", 1)
            axis = 1 if axis is None else axis
            check(v.numel() == shape[axis], f"{k}: {v.numel()} weights for an axis of {shape[axis]} features")
            v = v[cols] if axis == 1 else v[rows]
        out[k] = v
    return out


def per_block_factors(decompose, W: torch.Tensor, nblocks_out: int, nblocks_in: int, ranks, **kwargs):
    """Fit every block ``W_ij`` with a matrix-level decomposition ``decompose(W_ij, r_ij, **kw_ij) -> (A, B)``.

    ``kw_ij`` = :func:`block_kwargs`.  A weighted Frobenius objective whose weights are elementwise
    (sparsity-aware SVD) or per feature (FWSVD) separates over the blocks of a block structure, so
    fitting each block with its own share of the weights solves the structure's weighted problem
    (exactly, when ``decompose`` is exact on a matrix, as FWSVD is).  Returns nested lists
    ``A4[i][j]`` (n_out, r_ij), ``B4[i][j]`` (r_ij, n_in).
    """
    n_out, n_in = check_grid(W.shape[0], W.shape[1], nblocks_out, nblocks_in)
    A4 = [[None] * nblocks_in for _ in range(nblocks_out)]
    B4 = [[None] * nblocks_in for _ in range(nblocks_out)]
    for i in range(nblocks_out):
        for j in range(nblocks_in):
            rows, cols = slice(i * n_out, (i + 1) * n_out), slice(j * n_in, (j + 1) * n_in)
            A4[i][j], B4[i][j] = decompose(W[rows, cols], ranks[i][j], **block_kwargs(kwargs, W.shape, rows, cols))
    return A4, B4


def blockwise_weighted(
    decompose, W: torch.Tensor, block_rank: BlockRank, nblocks_out: int = 2, nblocks_in: int = 2, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise low-rank factors ``(A, B)`` of ``W`` from a matrix-level (e.g. weighted) decomposition per block.

    ``blockwise_weighted(truncated_svd, W, r, 2, 2)`` is :func:`blockwise_lowrank`; with
    ``fisher_weighted_svd`` and ``importance=...`` it is FWSVD for the block structure.
    """
    n_out, n_in = check_grid(W.shape[0], W.shape[1], nblocks_out, nblocks_in)
    ranks = normalize_block_ranks(block_rank, nblocks_out, nblocks_in, min(n_out, n_in))
    A4, B4 = per_block_factors(decompose, W, nblocks_out, nblocks_in, ranks, **kwargs)
    return _assemble(A4, B4, ranks, False, W.dtype)


def blockwise_to_dense(A: torch.Tensor, B: torch.Tensor, nblocks_out: int, nblocks_in: int, block_rank: BlockRank) -> torch.Tensor:
    """The ``(out, in)`` matrix represented by block-wise factors ``(A, B)``."""
    n_out, n_in = A.shape[0], B.shape[1]
    ranks = normalize_block_ranks(block_rank, nblocks_out, nblocks_in, min(n_out, n_in))
    offs = rank_offsets(ranks)
    check(A.shape[1] == B.shape[0] == offs[-1], f"factors have rank axis {A.shape[1]}/{B.shape[0]}, expected {offs[-1]}")
    if is_uniform(block_rank):
        A4 = A.reshape(n_out, nblocks_out, nblocks_in, int(block_rank)).permute(1, 2, 0, 3)
        B4 = B.reshape(nblocks_out, nblocks_in, int(block_rank), n_in)
        return merge_blocks(A4 @ B4)
    rows = []
    for i in range(nblocks_out):
        cols = []
        for j in range(nblocks_in):
            k = i * nblocks_in + j
            cols.append(A[:, offs[k]:offs[k + 1]] @ B[offs[k]:offs[k + 1]])
        rows.append(torch.cat(cols, dim=1))
    return torch.cat(rows, dim=0)


def blockwise_optimal_error(W: torch.Tensor, nblocks_out: int, nblocks_in: int, block_rank: BlockRank) -> float:
    """The optimal Frobenius error ``sqrt(sum_ij sum_{k > r_ij} s_k(W_ij)^2)`` of any block-wise approximation."""
    n_out, n_in = check_grid(W.shape[0], W.shape[1], nblocks_out, nblocks_in)
    ranks = normalize_block_ranks(block_rank, nblocks_out, nblocks_in, min(n_out, n_in))
    dt = torch.float64 if W.dtype == torch.float64 else torch.float32
    S = torch.linalg.svdvals(split_blocks(W.to(dt), nblocks_out, nblocks_in))
    return float(sum(S[i, j, r:].pow(2).sum() for i, row in enumerate(ranks) for j, r in enumerate(row)) ** 0.5)
