"""Collectives over the sequence-parallel group, as ``torch.library`` custom ops.

Every op takes the group by name (``ProcessGroup.group_name``) so that it can live in a
compiled graph; each has a fake (shape) implementation and a registered autograd formula.

Gradient convention (see ``autosp/compiler/placement.py``): a *sharded* value carries the
gradient of its own slice; a *replicated* value carries a partial gradient (the true gradient
is the sum over ranks); a *partial* value carries the full gradient on every rank.

=================  =======================  ===========================================
op                 forward                  backward
=================  =======================  ===========================================
all_to_all         split dim a, concat b    all_to_all with a and b swapped
all_gather         shard -> full (dim d)    reduce-scatter (partial grad -> shard grad)
all_reduce         partial -> replicated    all_reduce  (partial grad -> full grad)
all_reduce_loss    partial -> replicated    identity    (the caller seeds the same grad on
                                                          every rank, as ``loss.backward()``)
scale_grad         identity                 grad * factor
sum_grad           identity                 all_reduce (partial grad -> full grad)
=================  =======================  ===========================================
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from autosp.comm.faults import collective

_counts: Counter[str] = Counter()

# torch 2.13 renames the single-tensor collectives (the old names warn); 2.11 has the old ones.
_all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter[str]]:
    """Count the autosp collectives that run inside the block, by op name."""
    start = Counter(_counts)
    result: Counter[str] = Counter()
    try:
        yield result
    finally:
        result.update(_counts - start)


def _group(name: str) -> dist.ProcessGroup:
    return _resolve_process_group(name)


# --------------------------------------------------------------------------- all_to_all


@torch.library.custom_op("autosp::all_to_all", mutates_args=())
def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: str) -> torch.Tensor:
    """Split ``x`` into P chunks along ``scatter_dim``, send chunk i to rank i, and concatenate
    the chunks received along ``gather_dim`` (in rank order)."""
    _counts["all_to_all"] += 1
    pg = _group(group)
    world = dist.get_world_size(pg)
    send = torch.stack(x.chunk(world, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    with collective("an all_to_all", pg):
        dist.all_to_all_single(recv, send, group=pg)
    return torch.cat(recv.unbind(0), dim=gather_dim)


@all_to_all.register_fake
def _(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: str) -> torch.Tensor:
    world = dist.get_world_size(_group(group))
    shape = list(x.shape)
    shape[scatter_dim] = shape[scatter_dim] // world
    shape[gather_dim] = shape[gather_dim] * world
    return x.new_empty(shape)


def _all_to_all_backward(ctx, grad: torch.Tensor):  # noqa: ANN001
    return all_to_all(grad, ctx.gather_dim, ctx.scatter_dim, ctx.group), None, None, None


def _all_to_all_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    _, ctx.scatter_dim, ctx.gather_dim, ctx.group = inputs


all_to_all.register_autograd(_all_to_all_backward, setup_context=_all_to_all_setup)


# --------------------------------------------------------------------------- all_gather


def _written_along(
    like: torch.Tensor, shape: list[int], dim: int, write: Callable[[torch.Tensor], None]
) -> torch.Tensor:
    """A new tensor of ``shape`` whose rows along ``dim`` are filled by ``write`` (a collective
    that fills a contiguous buffer along its first dim). Written in place when that view is
    contiguous, else staged and copied. Never a view of a buffer made here: autograd refuses
    in-place writes into a view that a custom op's output is of (``y[:, 0] = v``)."""
    result = like.new_empty(shape)
    moved = result.movedim(dim, 0)
    if moved.is_contiguous():
        write(moved)
        return result
    staged = torch.empty_like(moved, memory_format=torch.contiguous_format)
    write(staged)
    result.copy_(staged.movedim(0, dim))
    return result


@torch.library.custom_op("autosp::all_gather", mutates_args=())
def all_gather(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (all ranks hold the same shape)."""
    _counts["all_gather"] += 1
    pg = _group(group)
    shape = list(x.shape)
    shape[dim] *= dist.get_world_size(pg)
    moved = x.movedim(dim, 0).contiguous()

    def run(out: torch.Tensor) -> None:
        with collective("an all_gather", pg):
            _all_gather_single(out, moved, group=pg)

    return _written_along(x, shape, dim, run)


@all_gather.register_fake
def _(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = shape[dim] * dist.get_world_size(_group(group))
    return x.new_empty(shape)


@torch.library.custom_op("autosp::reduce_scatter", mutates_args=())
def reduce_scatter(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    """Sum ``x`` over ranks and keep this rank's chunk along ``dim``."""
    _counts["reduce_scatter"] += 1
    pg = _group(group)
    shape = list(x.shape)
    shape[dim] //= dist.get_world_size(pg)
    moved = x.movedim(dim, 0).contiguous()

    def run(out: torch.Tensor) -> None:
        with collective("a reduce_scatter", pg):
            _reduce_scatter_single(out, moved, group=pg)

    return _written_along(x, shape, dim, run)


@reduce_scatter.register_fake
def _(x: torch.Tensor, dim: int, group: str) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = shape[dim] // dist.get_world_size(_group(group))
    return x.new_empty(shape)


def _all_gather_backward(ctx, grad: torch.Tensor):  # noqa: ANN001
    return reduce_scatter(grad, ctx.dim, ctx.group), None, None


def _reduce_scatter_backward(ctx, grad: torch.Tensor):  # noqa: ANN001
    return all_gather(grad, ctx.dim, ctx.group), None, None


def _dim_group_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    _, ctx.dim, ctx.group = inputs


all_gather.register_autograd(_all_gather_backward, setup_context=_dim_group_setup)
reduce_scatter.register_autograd(_reduce_scatter_backward, setup_context=_dim_group_setup)


# --------------------------------------------------------------------------- all_reduce


def _sum_over_ranks(x: torch.Tensor, group: str, name: str) -> torch.Tensor:
    _counts[name] += 1
    out = x.contiguous().clone()
    pg = _group(group)
    with collective(f"an {name}", pg):
        dist.all_reduce(out, group=pg)
    return out


@torch.library.custom_op("autosp::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    """Sum ``x`` over ranks; the backward sums the gradient over ranks too."""
    return _sum_over_ranks(x, group, "all_reduce")


@torch.library.custom_op("autosp::all_reduce_loss", mutates_args=())
def all_reduce_loss(x: torch.Tensor, group: str) -> torch.Tensor:
    """Sum ``x`` over ranks; identity backward (every rank seeds the same output gradient)."""
    return _sum_over_ranks(x, group, "all_reduce_loss")


@all_reduce.register_fake
def _(x: torch.Tensor, group: str) -> torch.Tensor:
    return x.new_empty(x.shape)


@all_reduce_loss.register_fake
def _(x: torch.Tensor, group: str) -> torch.Tensor:
    return x.new_empty(x.shape)


def _group_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.group = inputs[1]


def _all_reduce_backward(ctx, grad: torch.Tensor):  # noqa: ANN001
    return all_reduce(grad, ctx.group), None


def _identity_backward(ctx, grad: torch.Tensor):  # noqa: ANN001
    return grad, None


all_reduce.register_autograd(_all_reduce_backward, setup_context=_group_setup)
all_reduce_loss.register_autograd(_identity_backward, setup_context=_group_setup)


# --------------------------------------------------------------------------- scale_grad


@torch.library.custom_op("autosp::scale_grad", mutates_args=())
def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward; multiplies the gradient by ``factor`` in the backward."""
    return x.clone()


@scale_grad.register_fake
def _(x: torch.Tensor, factor: float) -> torch.Tensor:
    return torch.empty_like(x)


def _scale_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.factor = inputs[1]


def _scale_backward(ctx, grad: torch.Tensor):  # noqa: ANN001
    return grad * ctx.factor, None


scale_grad.register_autograd(_scale_backward, setup_context=_scale_setup)


# --------------------------------------------------------------------------- sum_grad


@torch.library.custom_op("autosp::sum_grad", mutates_args=())
def sum_grad(x: torch.Tensor, group: str) -> torch.Tensor:
    """Identity in the forward; sums the gradient over ranks in the backward. Turns the
    partial gradients of replicated values into the full gradient ``all_reduce_loss`` expects."""
    return x.clone()


@sum_grad.register_fake
def _(x: torch.Tensor, group: str) -> torch.Tensor:
    return torch.empty_like(x)


sum_grad.register_autograd(_all_reduce_backward, setup_context=_group_setup)
