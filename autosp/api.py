"""The public entry point: ``autosp.parallelize(model)``."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from autosp.comm.faults import InputCheck, host_channel_for
from autosp.comm.grad_sync import GradSync
from autosp.compiler.attention.hybrid import hybrid_groups
from autosp.compiler.backend import AutoSPBackend, TraceState
from autosp.compiler.propagate import Plan
from autosp.config import Config
from autosp.errors import AutoSPError
from autosp.integrations.transformers import install_output_hooks

logger = logging.getLogger(__name__)


LOGGER_METHODS = ("debug", "info", "warning", "warn", "error", "warning_once", "info_once")
"""Logging calls that Dynamo skips instead of breaking the graph (models warn mid-forward;
transformers adds ``warning_once`` to ``logging.Logger`` when it is imported)."""


def _logger_methods() -> set[Any]:
    return {getattr(logging.Logger, n) for n in LOGGER_METHODS if hasattr(logging.Logger, n)}


def resolve_group(group: dist.ProcessGroup | DeviceMesh | None) -> dist.ProcessGroup:
    """The sequence-parallel ProcessGroup from a group, a 1-D DeviceMesh or the default."""
    if not dist.is_available() or not dist.is_initialized():
        raise AutoSPError(
            "autosp: torch.distributed is not initialised. Call "
            "torch.distributed.init_process_group() first (launch with torchrun, or use "
            "`autosp train`, which launches the ranks for you)."
        )
    if group is None:
        return dist.group.WORLD
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise AutoSPError(
                f"autosp: the DeviceMesh has {group.ndim} dimensions; pass the 1-D sub-mesh of "
                "the sequence-parallel dimension, e.g. mesh['sp']."
            )
        return group.get_group()
    return group


class SequenceParallel(nn.Module):
    """A module whose forward runs sequence-parallel over ``group``; see ``parallelize``."""

    def __init__(self, module: nn.Module, group: dist.ProcessGroup, config: Config) -> None:
        super().__init__()
        self.module = module
        self.group = group
        self.config = config
        self._state = TraceState()
        hybrid = {}
        if config.attention in ("auto", "hybrid"):
            world = dist.get_world_size(group)
            for size in range(2, world):
                if world % size == 0:
                    hybrid[size] = hybrid_groups(group, size)
        install_output_hooks(module)
        backend = AutoSPBackend(group, config, self._state, hybrid)
        self._compiled = torch.compile(module, backend=backend, fullgraph=True)
        channel = host_channel_for(group) if config.sync_grads or config.check_inputs else None
        self._grad_sync = (
            GradSync(module, group, config.bucket_mb, channel) if config.sync_grads else None
        )
        self._input_check = (
            InputCheck(group, channel) if config.check_inputs and channel is not None else None
        )

    @property
    def plans(self) -> list[Plan]:
        """What the compiler did, one plan per compiled graph (attention, loss, gathered ops)."""
        return self._state.plans

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        refuse_ddp_around(self.group, self.config)
        refuse_unmanaged_fsdp(self)
        self._state.seq_len = mark_sequence(args, kwargs)
        self._state.label_inputs = label_inputs(args, kwargs)
        if self._input_check is not None:
            self._input_check(named_tensors(args, kwargs))
        try:
            with torch._dynamo.config.patch(ignore_logger_methods=_logger_methods()):
                out = self._compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as err:
            if isinstance(err.inner_exception, AutoSPError):
                raise err.inner_exception.with_traceback(None) from None
            raise
        except torch._dynamo.exc.FailOnRecompileLimitHit as err:
            limit = torch._dynamo.config.recompile_limit
            raise AutoSPError(
                f"autosp: torch.compile reached its recompile limit ({limit}, "
                f"torch._dynamo.config.recompile_limit) for {type(self.module).__name__}.forward."
                " Each parallelized instance of one class, and each new batch size or input "
                "layout, compiles that code again. Parallelize one model and reuse it, or raise "
                "the limit before compiling: torch._dynamo.config.recompile_limit = 64."
            ) from err
        except torch._dynamo.exc.Unsupported as err:
            hint = ""
            if "flex_attention" in str(err):
                hint = (
                    " The break is in FlexAttention's block-mask construction: load the model "
                    "with attn_implementation='sdpa' or 'eager' (autosp recognises the same "
                    "masks there)."
                )
            raise AutoSPError(
                "autosp: the model's forward could not be captured as one graph "
                f"({type(err).__name__}: {str(err).splitlines()[0]}). autosp needs the whole "
                "forward in one graph; remove the graph break (see TORCH_LOGS=graph_breaks)." + hint
            ) from err
        return out

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.load_state_dict(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def refuse_ddp_around(group: dist.ProcessGroup, config: Config) -> None:
    """Refuse a ``DistributedDataParallel`` around this module whose gradients would be wrong.

    Each rank's gradient is a partial sum over its rows: the true gradient is the *sum* over
    the sequence-parallel group. DDP *averages* over its own group and writes ``.grad`` after
    the backward: with ``sync_grads`` on, it overwrites autosp's sum; with it off, the average
    divides the sum by the degree, unless a comm hook sums over a group that holds every
    sequence-parallel rank (the caller's choice, allowed)."""
    ddp = DistributedDataParallel._get_active_ddp_module()
    if ddp is None:
        return
    sp_ranks = set(dist.get_process_group_ranks(group))
    ddp_ranks = set(dist.get_process_group_ranks(ddp.process_group))
    if not config.sync_grads and ddp._comm_hooks and sp_ranks <= ddp_ranks:
        return
    raise AutoSPError(
        "autosp: the sequence-parallel model is wrapped in DistributedDataParallel. DDP "
        "averages gradients over its group, but each rank of the sequence-parallel group holds "
        "a partial gradient that must be summed over that group: "
        + (
            "DDP overwrites the sums autosp makes (sync_grads=True). "
            if config.sync_grads
            else "without a comm hook that sums over every sequence-parallel rank, the "
            "gradients come out divided by the degree or not summed at all. "
        )
        + "Do not wrap it in DDP: keep sync_grads=True and, for data parallelism across "
        "sequence-parallel groups, average the gradients over the data-parallel group after "
        "backward (dist.all_reduce(p.grad, op=ReduceOp.AVG, group=dp_group))."
    )


def refuse_fsdp_inside(model: nn.Module) -> None:
    """Refuse a model with ``fully_shard`` applied inside it: its hooks would run inside
    autosp's one compiled graph, which Dynamo cannot trace through them (Note [FSDP2 around
    autosp] in ``autosp/integrations/fsdp.py``)."""
    inner = [name or "the model" for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    if inner:
        raise AutoSPError(
            f"autosp: fully_shard() was applied to {', '.join(inner[:3])} before autosp. "
            "autosp compiles the whole forward as one graph, and FSDP's per-module hooks "
            "inside it break that graph (Dynamo does not trace them). Apply no fully_shard "
            "yourself: call "
            "autosp.integrations.fsdp.shard(model, mesh) on the plain model."
        )


def refuse_unmanaged_fsdp(module: SequenceParallel) -> None:
    """Refuse ``fully_shard(autosp.parallelize(model))`` done by hand: FSDP would average the
    partial gradients over every rank (dividing the sum over ``sp`` by the degree) and
    ``sync_grads``' hooks sit on the parameters FSDP replaced."""
    if isinstance(module, FSDPModule) and not getattr(module, "_autosp_fsdp", False):
        raise AutoSPError(
            "autosp: fully_shard() was applied to the parallelized model by hand. FSDP "
            "averages gradients over all its ranks, but the sequence-parallel ranks' partial "
            "gradients must be summed: the result would be off by the degree. Call "
            "autosp.integrations.fsdp.shard(model, mesh) on the plain model instead."
        )


def label_inputs(args: tuple, kwargs: dict) -> frozenset[str]:
    """The names (as ``named_tensors`` gives them) under which the call passes its ``labels=``
    tensor: ``labels``, and every other argument that is the same tensor (``labels=input_ids``
    reaches the graph once, under one of the names); empty without labels."""
    labels = kwargs.get("labels")
    if labels is None:
        return frozenset()
    return frozenset(name for name, t in named_tensors(args, kwargs).items() if t is labels)


def named_tensors(args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """The tensor arguments of a call by the caller's names (``argument 1`` for positional)."""
    named = {f"argument {i}": t for i, t in enumerate(args) if isinstance(t, torch.Tensor)}
    named.update((k, t) for k, t in kwargs.items() if isinstance(t, torch.Tensor))
    return named


def mark_sequence(args: tuple, kwargs: dict) -> int:
    """Mark the sequence dimension of every token input dynamic; return the sequence length.

    The sequence is the longest dimension among the token inputs (all dimensions of integer
    tensors, all but the feature dimension of floating ones): long-context training has far
    more tokens than sequences in a batch. Compilation then checks that attention runs along it.
    """
    tensors = [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]
    if not tensors:
        raise AutoSPError("autosp: the model was called without tensor inputs")

    def token_dims(t: torch.Tensor) -> range:
        return range(t.dim() if not t.is_floating_point() else t.dim() - 1)

    seq_len = max((t.shape[d] for t in tensors for d in token_dims(t)), default=0)
    if seq_len < 2:
        shapes = [tuple(t.shape) for t in tensors]
        raise AutoSPError(f"autosp: the inputs have no sequence to split (shapes {shapes})")
    for t in tensors:
        for d in token_dims(t):
            if t.shape[d] == seq_len:
                torch._dynamo.mark_dynamic(t, d)
    return seq_len


def parallelize(
    model: nn.Module,
    *,
    group: dist.ProcessGroup | DeviceMesh | None = None,
    config: Config | None = None,
    **options: Any,
) -> SequenceParallel:
    """Make ``model``'s training step sequence-parallel over ``group``.

    Every rank of the group calls the returned module with the same full-length batch; the
    loss is that of one process on the whole batch, sequence-shaped outputs come back as this
    rank's rows (``gather_sequence`` joins them) and parameter gradients are summed over the
    group after ``backward()``.

    Args:
        model: any module whose forward uses ``scaled_dot_product_attention``.
        group: the sequence-parallel ranks: a ProcessGroup, a 1-D DeviceMesh, or None for
            all ranks of the default group.
        config: a ``Config``; or give its fields as keyword options (``backend="aot_eager"``).

    Raises:
        AutoSPError: torch.distributed is not initialised, the group is not 1-D, or
            ``model`` is a DistributedDataParallel module or has ``fully_shard`` applied
            inside (use ``autosp.integrations.fsdp.shard``).
    """
    if config is not None and options:
        raise TypeError("autosp: pass either config= or keyword options, not both")
    if isinstance(model, DistributedDataParallel):
        raise AutoSPError(
            "autosp: parallelize() was given a DistributedDataParallel module. DDP averages "
            "gradients over its group, but the sequence-parallel ranks' gradients must be "
            "summed. Parallelize the inner model (ddp.module) and do not wrap it in DDP; for "
            "data parallelism across sequence-parallel groups, average the gradients over the "
            "data-parallel group after backward."
        )
    refuse_fsdp_inside(model)
    config = config or Config(**options)
    return SequenceParallel(model, resolve_group(group), config)
