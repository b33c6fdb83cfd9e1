"""Projection of a dense matrix onto (generalised, rectangular, block-rank-r) Monarch matrices.

Monarch (Dao et al. 2022) is ``M = P L P^T R`` with block-diagonal ``L``, ``R`` and the
"reshape-transpose" permutation ``P``.  Generalised here to ``out != in`` and block rank ``r >= 1``
with ``b = nblocks`` blocks (``n_in = in / b``, ``n_out = out / b``):

* ``R``: ``(b, b*r, n_in)`` - block ``j`` maps input group ``j`` to ``b*r`` values, ``r`` for each
  of the ``b`` output groups (rows ``i*r : (i+1)*r`` are destined for output group ``i``);
* the permutation sends value ``(j, i, t)`` to position ``(i, j, t)``;
* ``L``: ``(b, n_out, b*r)`` - block ``i`` maps the ``b*r`` values gathered from all input groups
  to output group ``i`` (columns ``j*r : (j+1)*r`` come from input group ``j``).

Hence block ``(i, j)`` (``n_out x n_in``) of ``M`` is ``L[i][:, j*r:(j+1)*r] @ R[j][i*r:(i+1)*r, :]``,
a rank-``r`` product, and every slice of ``L``/``R`` occurs in exactly one block.  So the set of
such Monarch matrices is **exactly** the set of matrices whose ``b x b`` grid blocks all have rank
``<= r``, the Frobenius error separates over blocks, and the optimal projection is the truncated
SVD of each block independently.

Relation to Dao et al.'s square definition (``n = b^2``, ``b x b`` blocks): their ``L P^T R`` is
exactly our ``r = 1`` layer (block ``(i, j)`` = ``L_i[:, j] R_j[i, :]``), and their
``M = P L P^T R`` carries one more fixed permutation of the *output* coordinates, so their class is
ours with ``W``'s rows permuted by ``P`` (project ``P^T W``, then apply ``P``; a fixed relabelling
of output features - we group rows contiguously, which is what a rectangular layer needs).  For
that class, per-block truncated SVD is their analytical optimum.  Any variant that orders the rows
of ``R`` / columns of ``L`` differently (e.g. interleaved instead of contiguous slices, ``R`` block
height ``q = b*r``) is a fixed re-indexing of the parameters, i.e. the same function class.
"""

from __future__ import annotations

from numbers import Integral

import torch

from .blockwise import (batched_truncated_svd, blockwise_optimal_error, check_grid, merge_blocks, per_block_factors,
                        split_blocks)


def check_monarch(out_features: int, in_features: int, nblocks: int, block_rank: int | None = None) -> tuple[int, int]:
    """Validate Monarch parameters for an (out, in) matrix; returns ``(out/nblocks, in/nblocks)``."""
    from ..errors import check

    n_out, n_in = check_grid(out_features, in_features, nblocks, nblocks, what=f"monarch with nblocks={nblocks}")
    if block_rank is not None:
        check(
            isinstance(block_rank, Integral) and not isinstance(block_rank, bool) and 1 <= block_rank <= min(n_out, n_in),
            f"block_rank must be an integer in [1, {min(n_out, n_in)}] for a {out_features}x{in_features} matrix "
            f"with nblocks={nblocks}, got {block_rank!r}",
        )
    return n_out, n_in


def blocks_to_monarch(A4: torch.Tensor, B4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block factors ``A4 (b, b, n_out, r)``, ``B4 (b, b, r, n_in)`` (block ``[i, j]``) -> ``(L, R)``."""
    b, _, n_out, r = A4.shape
    n_in = B4.shape[-1]
    L = A4.permute(0, 2, 1, 3).reshape(b, n_out, b * r)  # L[i][:, j*r + t] = A4[i, j][:, t]
    R = B4.permute(1, 0, 2, 3).reshape(b, b * r, n_in)  # R[j][i*r + t]    = B4[i, j][t]
    return L, R


def monarch_to_blocks(L: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`blocks_to_monarch` (views where possible): ``A4 (b, b, n_out, r)``, ``B4 (b, b, r, n_in)``."""
    b, n_out, br = L.shape
    r = br // b
    A4 = L.reshape(b, n_out, b, r).permute(0, 2, 1, 3)
    B4 = R.reshape(b, b, r, R.shape[-1]).permute(1, 0, 2, 3)
    return A4, B4


def monarch_to_dense(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """The ``(out, in)`` matrix ``P L P^T R`` represented by ``L (b, out/b, b*r)``, ``R (b, b*r, in/b)``."""
    A4, B4 = monarch_to_blocks(L, R)
    return merge_blocks(A4 @ B4)


def monarch_project(
    W: torch.Tensor, nblocks: int, block_rank: int, compute_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Frobenius-optimal Monarch factors ``(L, R)`` of ``W`` (out, in), in ``W``'s dtype.

    ``L``: ``(nblocks, out/nblocks, nblocks*block_rank)``, ``R``: ``(nblocks, nblocks*block_rank, in/nblocks)``.
    One batched truncated SVD over the ``nblocks^2`` blocks, computed in float32/float64.
    """
    check_monarch(W.shape[0], W.shape[1], nblocks, block_rank)
    A4, B4 = batched_truncated_svd(split_blocks(W, nblocks, nblocks), block_rank, compute_dtype)
    L, R = blocks_to_monarch(A4, B4)
    return L.to(W.dtype).contiguous(), R.to(W.dtype).contiguous()


def monarch_weighted(decompose, W: torch.Tensor, block_rank: int, nblocks: int = 4, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Monarch factors ``(L, R)`` of ``W`` from a matrix-level (e.g. weighted) decomposition of each grid block.

    A Monarch matrix is a ``nblocks x nblocks`` grid of rank-``block_rank`` blocks (module docstring),
    so a weighted fit separates over the blocks: see :func:`~factorlm.decompose.blockwise.per_block_factors`.
    ``monarch_weighted(truncated_svd, W, r, b)`` equals :func:`monarch_project`.
    """
    check_monarch(W.shape[0], W.shape[1], nblocks, block_rank)
    ranks = [[block_rank] * nblocks for _ in range(nblocks)]
    A4, B4 = per_block_factors(decompose, W, nblocks, nblocks, ranks, **kwargs)
    A4 = torch.stack([torch.stack(row) for row in A4])
    B4 = torch.stack([torch.stack(row) for row in B4])
    L, R = blocks_to_monarch(A4, B4)
    return L.to(W.dtype).contiguous(), R.to(W.dtype).contiguous()


def monarch_optimal_error(W: torch.Tensor, nblocks: int, block_rank: int) -> float:
    """The optimal Frobenius error of any Monarch approximation (tail singular values of every block)."""
    check_monarch(W.shape[0], W.shape[1], nblocks, block_rank)
    return blockwise_optimal_error(W, nblocks, nblocks, block_rank)
