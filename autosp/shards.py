"""Sequence-sharded outputs: which returned tensors are a rank's rows, and joining them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.weak import WeakIdKeyDictionary

from autosp.comm.faults import collective
from autosp.compiler.runtime import block_len
from autosp.errors import AutoSPError

_SHARDS: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass(frozen=True, slots=True)
class _ShardInfo:
    dim: int
    seq_len: int
    length: int
    group: dist.ProcessGroup


def register_shard(
    t: torch.Tensor, dim: int, seq_len: int, length: int, group: dist.ProcessGroup
) -> None:
    """Remember that ``t`` is this rank's valid rows along ``dim`` of an output of logical
    length ``seq_len + length``, sharded like a token sequence of ``seq_len``."""
    _SHARDS[t] = _ShardInfo(dim, seq_len, length, group)


def gather_sequence(t: torch.Tensor) -> torch.Tensor:
    """The full-length tensor from this rank's rows of a sequence-shaped output.

    Every rank of the group must call it. The backward keeps this rank's rows of the gradient,
    which is right when every rank computes the same thing from the gathered tensor.
    """
    info = _SHARDS.get(t)
    if info is None:
        raise AutoSPError(
            "autosp: gather_sequence() got a tensor that is not a sequence-sharded output of a "
            "parallelized model (pass the output itself, e.g. out.logits, before other ops)."
        )
    return _GatherRows.apply(t, info.dim, info.seq_len, info.length, info.group)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, dim, seq_len, length, group):  # noqa: ANN001, ANN205
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        block = block_len(seq_len, world)
        length += seq_len
        ctx.dim, ctx.start, ctx.rows = dim, min(rank * block, length), t.shape[dim]
        padded = t.new_zeros([block if d == dim else n for d, n in enumerate(t.shape)])
        padded.narrow(dim, 0, t.shape[dim]).copy_(t)
        parts = [torch.empty_like(padded) for _ in range(world)]
        with collective("gather_sequence's all_gather", group):
            dist.all_gather(parts, padded, group=group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, length)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad.narrow(ctx.dim, ctx.start, ctx.rows), None, None, None, None
