"""Random ops on sharded values: every rank draws its own numbers.

Note [Random ops]
-----------------
Every rank runs the same program from the same generator state, which keeps replicated values
equal on all ranks. A random op on a *sharded* value must not draw from that state directly:
rank ``r`` would draw for its rows exactly the numbers rank 0 draws for its own, so the dropout
masks of all shards would be equal, correlated along the sequence (and under Ulysses, the
attention dropout of every head shard equal to that of the first). Instead such an op draws one
seed from the global CPU generator, the same on every rank (so the global state stays in step
across ranks, whatever the op), and draws its numbers from a generator of the value's device
seeded by that seed and the rank: independent across ranks and across calls.

The masks are not those of one process, which only drawing the whole tensor on every rank and
keeping one's rows could give (``P`` times the random numbers, and an unsharded activation's
memory per dropout). Dropout thus matches one process in distribution, not in value; the
backward reuses the forward's mask (it is an output of the graph's forward, never redrawn).
Dropout of a replicated value keeps the global generator: every rank draws the same mask.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from autosp.compiler.args import arguments
from autosp.compiler.placement import Shard
from autosp.compiler.propagate import ShardingPass, UnsupportedOp, rule

_SEEDS = 2**32
"""The CPU generator (mt19937) keeps 32 bits of a seed: per-rank seeds differ in those."""


@torch.library.custom_op(
    "autosp::rank_keep_mask", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def rank_keep_mask(x: torch.Tensor, p: float, rank: int) -> torch.Tensor:
    """A boolean mask like ``x`` keeping each element with probability ``1 - p``, drawn from
    this rank's own stream (Note [Random ops])."""
    seed = int(torch.randint(_SEEDS, ()))
    gen = torch.Generator(device=x.device)
    gen.manual_seed((seed + rank * 0x9E3779B9) % _SEEDS)
    draws = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    return draws.bernoulli_(1.0 - p, generator=gen).bool()


@rank_keep_mask.register_fake
def _(x, p, rank):  # noqa: ANN001, ANN202
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)


def rank_dropout(x: torch.Tensor, p: float, rank: int, inplace: bool = False) -> torch.Tensor:
    """``F.dropout(x, p, training=True)`` with this rank's own mask (Note [Random ops])."""
    if p == 1.0:
        return x.mul_(0.0) if inplace else x * 0.0
    keep = rank_keep_mask(x, p, rank)
    scale = 1.0 / (1.0 - p)
    if inplace:
        return x.mul_(keep).mul_(scale)
    return x * keep * scale


@rule("dropout")
def shard_dropout(sp: ShardingPass, node: Node) -> None:
    """``F.dropout`` / ``torch.dropout`` of a sharded value: this rank's own mask."""
    args = arguments(node)
    if args is None:
        raise UnsupportedOp("its arguments match no known signature")
    x, p = args["input"], args.get("p", 0.5)
    training, inplace = args.get("training", args.get("train", True)), args.get("inplace", False)
    placement = sp.placement(x)
    if not isinstance(placement, Shard):
        raise UnsupportedOp("dropout of a partial sum")
    if not training or (isinstance(p, (int, float)) and p == 0):
        sp.env[node], sp.placements[node] = sp.env[x], placement
        return
    sp.env[node] = sp.call(rank_dropout, sp.env[x], p, sp.group.rank, inplace)
    sp.placements[node] = placement
