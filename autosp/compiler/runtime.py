"""Functions that the rewritten graph calls: converting between placements.

They are plain torch code (traced by the inner compiler) around the collectives of
``autosp.comm``. ``seq_len`` is always the full token length ``S``; a value's own logical
length is ``S + length`` (see Note [Placements and padding]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from autosp.comm import ops


def block_len(seq_len: int, world: int) -> int:
    """Tokens per rank: ``L = 2 * ceil(S / 2P)``, even so that a load-balanced ring can split
    every block in halves (Note [Placements and padding])."""
    return 2 * ((seq_len + 2 * world - 1) // (2 * world))


def pad_dim(
    x: torch.Tensor, dim: int, size: int, value: float | bool | None = None
) -> torch.Tensor:
    """Pad ``x`` along ``dim`` at the end up to ``size`` with ``value``, or with copies of its
    last row when ``value`` is None (Note [Placements and padding]: padding rows stay as finite
    as real ones, so ``0 / 0`` never starts there); padding rows pass no gradient back.

    The width is symbolic, so a width of 0 (length divisible by P) does not specialise the
    compiled graph.
    """
    dim = dim % x.dim()
    if value is None:
        rows = torch.arange(size, device=x.device)
        copied = x.index_select(dim, rows.clamp(max=x.shape[dim] - 1))
        real = (rows < x.shape[dim]).view([-1 if d == dim else 1 for d in range(x.dim())])
        return torch.where(real, copied, copied.detach())  # no gradient from padding rows
    widths = [0, 0] * (x.dim() - 1 - dim) + [0, size - x.shape[dim]]
    return F.pad(x, widths, value=value)


def shard(
    x: torch.Tensor,
    dim: int,
    seq_len: int,
    rank: int,
    world: int,
    inner: int = 0,
    length: int = 0,
    pad_value: float | bool | None = None,
) -> torch.Tensor:
    """Replicated full tensor -> this rank's block of rows along ``dim`` (no communication).

    A merged dimension (``inner`` > 0) is viewed as ``(outer, seq_len + length, inner)``.
    Rows past the logical length are filled with ``pad_value``, or copies of the last row.
    """
    block = block_len(seq_len, world)
    dim = dim % x.dim()
    if inner:
        rows = x.unflatten(dim, (-1, seq_len + length, inner))
        return shard(rows, dim + 1, seq_len, rank, world, 0, length, pad_value).flatten(
            dim, dim + 2
        )
    padded = pad_dim(x, dim, block * world, pad_value)
    return padded.narrow(dim, rank * block, block)


def gather(
    x: torch.Tensor,
    dim: int,
    seq_len: int,
    world: int,
    group: str,
    inner: int = 0,
    length: int = 0,
) -> torch.Tensor:
    """This rank's block -> the full tensor of logical length ``seq_len + length``."""
    block = block_len(seq_len, world)
    dim = dim % x.dim()
    if inner:
        rows = x.unflatten(dim, (-1, block, inner))
        full = gather(rows, dim + 1, seq_len, world, group, 0, length)
        return full.flatten(dim, dim + 2)
    full = ops.all_gather(x, dim, group)
    return full.narrow(dim, 0, seq_len + length)


def mask_rows(mask: torch.Tensor, seq_len: int, first: int, rows: int, total: int) -> torch.Tensor:
    """Query rows ``[first, first + rows)`` of an ``[..., S, S]`` attention mask (boolean,
    True = attend, or additive) padded to ``total`` positions: padding keys are hidden, padding
    queries see every key (no empty softmax row). A mask of one row (the same for every query)
    stays one row."""
    allow, hide = (True, False) if mask.dtype == torch.bool else (0.0, float("-inf"))
    if mask.shape[-2] != 1:
        mask = pad_dim(mask, -2, total, allow).narrow(-2, first, rows)
    return pad_dim(mask, -1, total, hide)


def full_size(x: torch.Tensor, dim: int, seq_len: int, world: int, inner: int, length: int) -> int:
    """The single-process size of dimension ``dim`` of a sharded value."""
    if not inner:
        return seq_len + length
    outer = x.shape[dim] // (block_len(seq_len, world) * inner)
    return outer * (seq_len + length) * inner


def valid_rows(seq_len: int, length: int, rank: int, world: int) -> int:
    """How many of this rank's rows lie inside the logical length (the rest is padding)."""
    block = block_len(seq_len, world)
    return max(0, min(block, seq_len + length - rank * block))


def row_mask(
    x: torch.Tensor, dim: int, seq_len: int, rank: int, world: int, inner: int, length: int
) -> torch.Tensor:
    """True on this rank's rows of ``x`` along ``dim`` that lie inside the logical length
    (False on padding rows), shaped to broadcast against ``x``."""
    dim = dim % x.dim()
    rows = torch.arange(x.shape[dim], device=x.device)
    if inner:
        rows = rows // inner % block_len(seq_len, world)
    valid = rows < valid_rows(seq_len, length, rank, world)
    return valid.view([-1 if d == dim else 1 for d in range(x.dim())])


def sum_rows(
    x: torch.Tensor,
    reduce_dims: list[int] | None,
    keepdim: bool,
    dtype: torch.dtype | None,
    mean: bool,
    dim: int,
    seq_len: int,
    rank: int,
    world: int,
    inner: int,
    length: int,
) -> torch.Tensor:
    """This rank's term of a sum (or mean) of ``x`` over ``reduce_dims`` (all if None), which
    include its sequence ``dim``: padding rows are left out and a mean divides by the whole
    count, so the sum over ranks is the single-process value."""
    kept = torch.where(row_mask(x, dim, seq_len, rank, world, inner, length), x, 0)
    dims = list(range(x.dim())) if reduce_dims is None else [d % x.dim() for d in reduce_dims]
    total = kept.sum(dims, keepdim=keepdim, dtype=dtype)
    if not mean:
        return total
    count = 1
    for d in dims:
        count = count * (
            full_size(x, d, seq_len, world, inner, length) if d == dim % x.dim() else x.shape[d]
        )
    return total / count


def histc_rows(
    x: torch.Tensor,
    bins: int,
    low: float,
    high: float,
    dim: int,
    seq_len: int,
    rank: int,
    world: int,
    inner: int,
    length: int,
) -> torch.Tensor:
    """This rank's term of ``torch.histc`` over a sharded ``x``: padding rows are moved out of
    the range ``[low, high]``, which histc leaves out."""
    outside = high + (high - low) + 1
    kept = torch.where(row_mask(x, dim, seq_len, rank, world, inner, length), x, outside)
    return torch.histc(kept, bins=bins, min=low, max=high)


def reduce_partial(x: torch.Tensor, group: str) -> torch.Tensor:
    """Partial -> replicated."""
    return ops.all_reduce(x, group)
