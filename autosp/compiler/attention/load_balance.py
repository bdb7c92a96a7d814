"""Load balancing for causal ring attention: move each rank's rows to a zigzag layout.

Note [Load balancing]
---------------------
Under causal attention the contiguous layout gives the last rank ``P`` blocks of work and the
first one: the ring runs at the speed of the slowest rank. Split the sequence into ``2P``
chunks of ``L/2`` rows instead and give rank ``r`` chunks ``r`` and ``2P - 1 - r`` (one from
the head, one from the tail)::

    P = 3     contiguous: rank 0 [0 1]  rank 1 [2 3]  rank 2 [4 5]
              zigzag:     rank 0 [0 5]  rank 1 [1 4]  rank 2 [2 3]

Then at every ring step each rank does the same ``(L/2) x L`` share of work (the ring kernel
picks the half blocks, Note [Ring attention]). Only attention sees the zigzag layout: the
ring op moves its query/key/value rows there with one all-to-all each and brings the output
back, so the rest of the graph, padding included, keeps Note [Placements and padding].
The backward moves the gradients the opposite way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from autosp.comm.faults import collective
from autosp.comm.ops import _counts, _group


def contiguous_chunks(rank: int, world: int) -> tuple[int, int]:
    """The two global chunks rank ``rank`` holds in the contiguous layout, in local order."""
    return 2 * rank, 2 * rank + 1


def zigzag_chunks(rank: int, world: int) -> tuple[int, int]:
    """The two global chunks rank ``rank`` holds in the zigzag layout, in local order."""
    return rank, 2 * world - 1 - rank


def _permute(x: torch.Tensor, dim: int, group: str, to_zigzag: bool) -> torch.Tensor:
    """Move the rows of ``x`` (this rank's block along ``dim``) between the two layouts."""
    pg = _group(group)
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    src, dst = contiguous_chunks, zigzag_chunks
    if not to_zigzag:
        src, dst = dst, src
    owner_src = {g: r for r in range(world) for g in src(r, world)}
    owner_dst = {g: r for r in range(world) for g in dst(r, world)}
    rows = x.movedim(dim, 0)
    half = rows.shape[0] // 2
    held = dict(zip(src(rank, world), rows.split(half), strict=True))
    outgoing = sorted(held, key=lambda g: (owner_dst[g], g))
    incoming = sorted(dst(rank, world), key=lambda g: (owner_src[g], g))
    send = torch.cat([held[g] for g in outgoing]).contiguous()
    received = torch.empty_like(send)
    with collective("a load-balancing all_to_all", pg):
        dist.all_to_all_single(
            received,
            send,
            [half * sum(owner_src[g] == p for g in incoming) for p in range(world)],
            [half * sum(owner_dst[g] == p for g in outgoing) for p in range(world)],
            group=pg,
        )
    _counts["load_balance_all_to_all"] += 1
    chunks = dict(zip(incoming, received.split(half), strict=True))
    return torch.cat([chunks[g] for g in dst(rank, world)]).movedim(0, dim).contiguous()


@torch.library.custom_op("autosp::permute_chunks", mutates_args=())
def permute_chunks(x: torch.Tensor, dim: int, group: str, to_zigzag: bool) -> torch.Tensor:
    """This rank's rows along ``dim`` in the zigzag layout (or back, ``to_zigzag=False``)."""
    return _permute(x, dim, group, to_zigzag)


@permute_chunks.register_fake
def _(x, dim, group, to_zigzag):  # noqa: ANN001, ANN202
    return x.new_empty(x.shape)


def _setup(ctx, inputs, output) -> None:  # noqa: ANN001
    _, ctx.dim, ctx.group, ctx.to_zigzag = inputs


def _backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202
    return permute_chunks(grad, ctx.dim, ctx.group, not ctx.to_zigzag), None, None, None


permute_chunks.register_autograd(_backward, setup_context=_setup)
