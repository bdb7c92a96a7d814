"""Parameters sharded over the ``dp x sp`` ranks and gathered inside autosp's graph, one use at
a time: the memory of ZeRO-3 and of FSDP2 with one unit per layer.

Note [Parameters gathered in the graph]
    FSDP2 and ZeRO-3 gather a layer's parameters in hooks on that layer. autosp compiles the
    whole forward as one graph, which those hooks cannot enter (Note [FSDP2 around autosp],
    Note [DeepSpeed around autosp]). So here the gathering is part of the model's forward:
    every parameter is replaced by this rank's shard (its rows along dim 0, padded to a
    multiple of the world; SimpleFSDP's design, with ``torch.nn.utils.parametrize``), and
    reading the parameter gathers it::

        module.weight  ->  all_gather(shard, dim 0)[:rows]  ->  scale_grad(1 / dp)
                           backward: reduce-scatter (sum)  <-  gradient / dp

    Dynamo traces the read where the model makes it, so the compiled graph gathers each
    parameter just before its use and frees it after; the backward gathers it again (Note
    [Gathering parameters again]) instead of keeping it. The gather's backward sums the
    partial gradients over all ``dp * sp`` ranks into each rank's shard; the scale makes
    that the mean over ``dp`` of the sum over ``sp`` (Note [Layout of the mesh]). So
    ``shard.grad`` after ``backward()`` is this rank's rows of the exact gradient, and an
    optimizer built on ``model.parameters()`` (the shards) steps them.

    Per rank between steps: 1/world of the parameters, gradients and optimizer state; during
    the step, one gathered parameter (plus what the compiler keeps in flight) instead of all.
    Tied parameters (embedding and head) stay one shard, gathered at each use.

    What needs the group, because each rank holds a part: the gradient norm
    (``clip_grad_norm_``) and full state dicts (``full_state_dict`` / ``load_full_state_dict``).
    Reading ``module.weight`` outside the forward gathers it: a collective every rank of the
    mesh must make.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.utils import parametrize

from autosp.api import SequenceParallel, parallelize
from autosp.comm import ops
from autosp.errors import AutoSPError
from autosp.integrations import require_plain_model
from autosp.mesh import resolve_layout

logger = logging.getLogger(__name__)


class GatheredShard(nn.Module):
    """The parametrization: this rank's rows of a parameter -> the whole parameter."""

    def __init__(
        self, shape: torch.Size, group: dist.ProcessGroup, dp: int, dtype: torch.dtype | None
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.rows = shape[0] if shape else 1
        self.group_name = group.group_name
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.dp = dp
        self.dtype = dtype

    def forward(self, shard: torch.Tensor) -> torch.Tensor:
        if self.dtype is not None:
            shard = shard.to(self.dtype)
        full = ops.all_gather(shard, 0, self.group_name).narrow(0, 0, self.rows)
        if self.dp > 1:
            full = ops.scale_grad(full, 1.0 / self.dp)
        return full.view(self.shape)

    def right_inverse(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of ``full``, zero-padded so every rank holds as many."""
        rows = full.reshape(self.rows, *self.shape[1:])
        per_rank = -(-self.rows // self.world)
        padded = rows.new_zeros((per_rank * self.world, *rows.shape[1:]))
        padded[: self.rows] = rows
        return padded.chunk(self.world)[self.rank].clone()


def shard(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None = None,
    **options: Any,
) -> SequenceParallel:
    """Shard ``model``'s parameters over the whole ``("dp", "sp")`` mesh and make it
    sequence-parallel over ``mesh["sp"]``; the compiled graph gathers each parameter at its
    use (Note [Parameters gathered in the graph]).

    Every rank of one SP group passes the same batch (``autosp.data_parallel_sampler``).
    Build the optimizer on the returned module's parameters (the shards), after this call;
    clip with ``clip_grad_norm_`` and save with ``full_state_dict``.

    Args:
        model: the plain model (not yet parallelized or sharded).
        mesh: the ``("dp", "sp")`` mesh of ``autosp.sequence_parallel_mesh``.
        param_dtype: gather (and reduce the gradients) in this dtype, e.g. ``torch.bfloat16``;
            the shards and the optimizer stay in their own dtype. None: as stored.
        **options: ``autosp.Config`` fields (``backend=``, ``attention=``...).

    Raises:
        AutoSPError: the mesh is not ``("dp", "sp")``, ``model`` is already parallelized or
            has parametrizations, or ``sync_grads=True`` was asked for.
    """
    require_plain_model(
        "sharded.shard",
        "sharded parameters",
        model,
        mesh,
        options,
        "the gathers' backward already sums the gradients over every rank",
    )
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise AutoSPError(
            "autosp: sharded.shard() needs a model without parametrizations (weight norm, "
            "spectral norm, an earlier shard()): a parametrized parameter is computed, not "
            "stored, so there is nothing to shard. Remove them "
            "(torch.nn.utils.parametrize.remove_parametrizations) or use "
            "autosp.integrations.fsdp.shard."
        )
    layout = resolve_layout(mesh, None, None)
    shapes = {id(p): p.shape for p in model.parameters()}  # shard() changes them in place
    shards: dict[int, nn.Parameter] = {}
    for module in list(model.modules()):
        for name, param in list(module.named_parameters(recurse=False)):
            shape = shapes[id(param)]
            gathered = GatheredShard(shape, layout.grads, layout.dp, param_dtype)
            tied = shards.get(id(param))
            if tied is not None:
                # register_parametrization shards the attribute in place (``set_``): give it
                # a stand-in, then point the module at the one shard of the tied parameter.
                setattr(module, name, nn.Parameter(torch.empty(shape, device="meta")))
            parametrize.register_parametrization(module, name, gathered, unsafe=True)
            holder = module.parametrizations[name]
            if tied is not None:
                holder.original = tied
            else:
                shards[id(param)] = holder.original
    options["sync_grads"] = False
    sp_model = parallelize(model, group=mesh, **options)
    sp_model._autosp_shard_group = layout.grads
    logger.info(
        "autosp: %d parameters sharded over %d ranks (dp %d x sp %d), gathered in the graph",
        len(shards),
        dist.get_world_size(layout.grads),
        layout.dp,
        mesh["sp"].size(),
    )
    return sp_model


def _group(model: SequenceParallel) -> dist.ProcessGroup:
    group = getattr(model, "_autosp_shard_group", None)
    if group is None:
        raise AutoSPError(
            "autosp: this model's parameters are not sharded by "
            "autosp.integrations.sharded.shard(); use torch's own function for it."
        )
    return group


def _parametrized(model: SequenceParallel) -> list[tuple[str, nn.Module, str]]:
    """(full name, module, attribute) of every sharded parameter, in module order."""
    return [
        (f"{path}.{name}" if path else name, module, name)
        for path, module in model.module.named_modules()
        if parametrize.is_parametrized(module)
        for name in module.parametrizations
    ]


@torch.no_grad()
def clip_grad_norm_(model: SequenceParallel, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the shards of every rank: the global 2-norm of
    the gradient (as one process computes it), and every shard's gradient scaled by
    ``min(1, max_norm / norm)``."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float64)
    for g in grads:
        squares += (g.double() ** 2).sum()
    dist.all_reduce(squares, group=_group(model))
    norm = squares.sqrt().float()
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return norm


@torch.no_grad()
def full_state_dict(model: SequenceParallel) -> dict[str, torch.Tensor]:
    """The plain model's state dict (its keys, whole tensors) on every rank: a collective."""
    _group(model)
    state = {
        key: value
        for key, value in model.module.state_dict().items()
        if ".parametrizations." not in f".{key}"
    }
    for key, module, name in _parametrized(model):
        state[key] = getattr(module, name).detach().clone()
    return state


@torch.no_grad()
def load_full_state_dict(model: SequenceParallel, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a plain model's state dict (its keys, whole tensors) into the shards."""
    _group(model)
    sharded = {key: (module, name) for key, module, name in _parametrized(model)}
    missing = sorted(set(sharded) - set(state_dict))
    rest = {key: value for key, value in state_dict.items() if key not in sharded}
    result = model.module.load_state_dict(rest, strict=False)
    missing += [k for k in result.missing_keys if ".parametrizations." not in f".{k}"]
    if missing or result.unexpected_keys:
        raise AutoSPError(
            f"autosp: the state dict does not match the model: missing {missing}, unexpected "
            f"{result.unexpected_keys}. Pass the state dict of the same (plain) model."
        )
    for key, (module, name) in sharded.items():
        dtype = module.parametrizations[name].original.dtype
        setattr(module, name, state_dict[key].to(dtype))  # right_inverse: this rank's rows
