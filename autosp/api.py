"""The public entry point: ``autosp.parallelize(model)``."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
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
from autosp.mesh import Layout, resolve_layout

logger = logging.getLogger(__name__)


LOGGER_METHODS = ("debug", "info", "warning", "warn", "error", "warning_once", "info_once")
"""Logging calls that Dynamo skips instead of breaking the graph (models warn mid-forward;
transformers adds ``warning_once`` to ``logging.Logger`` when it is imported)."""


def _logger_methods() -> set[Any]:
    return {getattr(logging.Logger, n) for n in LOGGER_METHODS if hasattr(logging.Logger, n)}


class SequenceParallel(nn.Module):
    """A module whose forward runs sequence-parallel over ``group``; see ``parallelize``."""

    def __init__(self, module: nn.Module, layout: Layout, config: Config) -> None:
        super().__init__()
        self.module = module
        self.layout = layout
        group = self.group = layout.sp
        self.config = config
        self._state = TraceState()
        hybrid = {}
        if config.attention in ("auto", "hybrid"):
            world = dist.get_world_size(group)
            for size in range(2, world):
                if world % size == 0:
                    hybrid[size] = hybrid_groups(group, size)
        install_output_hooks(module)
        mean = ("", 1)
        if config.dp_mean == "tokens" and layout.dp > 1:
            mean = (layout.grads.group_name, layout.dp)
        backend = AutoSPBackend(group, config, self._state, hybrid, mean)
        # Not a submodule: the state dict has the inner module's keys only (Note [Plain keys]).
        self.__dict__["_compiled"] = torch.compile(module, backend=backend, fullgraph=True)
        self.register_load_state_dict_pre_hook(_nest_keys)
        channel = host_channel_for(group) if config.sync_grads or config.check_inputs else None
        self._grad_sync = None
        if config.sync_grads:
            grads_channel = channel if layout.grads is group else host_channel_for(layout.grads)
            self._grad_sync = GradSync(
                module, layout.grads, config.bucket_mb, grads_channel, dp=layout.dp
            )
        self._input_check = (
            InputCheck(group, channel) if config.check_inputs and channel is not None else None
        )

    @property
    def plans(self) -> list[Plan]:
        """What the compiler did, one plan per compiled graph (attention, loss, gathered ops)."""
        return self._state.plans

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradient accumulation without a reduction per micro-batch, as ``DDP.no_sync``:
        backward passes inside the block leave each rank's partial gradients in ``.grad``; the
        first backward after it reduces everything accumulated since the last reduction.
        Costs one extra copy of the accumulated gradients until then."""
        if self._grad_sync is None:
            yield
            return
        with self._grad_sync.deferred():
            yield

    def release_grad_sync(self) -> None:
        """Stop reducing gradients here, for a wrapper that reduces them itself
        (``autosp.integrations.ddp.wrap_ddp``)."""
        if self._grad_sync is not None:
            self._grad_sync.remove()
            self._grad_sync = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        refuse_ddp_around(self)
        refuse_unmanaged_fsdp(self)
        self._state.seq_len = mark_sequence(args, kwargs)
        self._state.label_inputs = label_inputs(args, kwargs)
        if self._input_check is not None:
            self._input_check(named_tensors(args, kwargs))
        try:
            # optimize_ddp=False: inside DDP, Dynamo would split the graph at DDP's buckets.
            with torch._dynamo.config.patch(
                ignore_logger_methods=_logger_methods(), optimize_ddp=False
            ):
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
        """The inner model's state dict, with its own keys (Note [Plain keys])."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.load_state_dict(*args, **kwargs)

    def _fqn_modifiers(self) -> dict[str, str]:
        """The inner model's top-level names, reached through ``module``: how
        ``torch.distributed.checkpoint.state_dict`` (``get_model_state_dict``) learns that this
        wrapper adds nothing to the keys (Note [Plain keys])."""
        inner = self.module
        names = [n for n, _ in inner.named_children()]
        names += [n for n, _ in inner.named_parameters(recurse=False)]
        names += [n for n, _ in inner.named_buffers(recurse=False)]
        return dict.fromkeys(names, "module")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def _nest_keys(module: SequenceParallel, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Note [Plain keys]: ``SequenceParallel.state_dict`` gives the inner model's keys, also
    under a parent (``DDP(parallel).state_dict()`` has ``module.`` + the plain keys, as DDP
    around the plain model). A parent's ``load_state_dict`` loads this module's children by
    their paths, the inner model at ``module.``: move this module's keys there.
    ``torch.distributed.checkpoint.state_dict`` gets the same plain keys (``_fqn_modifiers``)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + "module." + key.removeprefix(prefix)] = state_dict.pop(key)


def refuse_ddp_around(model: SequenceParallel) -> None:
    """Refuse a ``DistributedDataParallel`` around ``model`` unless ``wrap_ddp`` set it up.

    Each rank's gradient is a partial sum over its rows: the true gradient is the *sum* over
    the sequence-parallel group (and the mean over data-parallel groups). DDP *averages* over
    its own group and writes ``.grad`` after the backward: by itself it divides the sum by the
    degree, and beside autosp's own reduction it reduces twice. ``wrap_ddp`` gives DDP a comm
    hook that sums over ``dp x sp`` and divides by ``dp``, and turns autosp's reduction off."""
    from autosp.integrations.ddp import is_prepared

    ddp = DistributedDataParallel._get_active_ddp_module()
    if ddp is None or (is_prepared(ddp, model) and model._grad_sync is None):
        return
    raise AutoSPError(
        "autosp: the sequence-parallel model is wrapped in a DistributedDataParallel that "
        "autosp did not set up. DDP averages gradients over its group, but each rank of the "
        "sequence-parallel group holds a partial gradient that must be summed over that group "
        "(and autosp's own reduction would run as well). Either drop DDP: "
        "parallelize(model, mesh=autosp.mesh.sequence_parallel_mesh(sp)) reduces over data and "
        "sequence parallel ranks itself; or build the wrapper with "
        "autosp.integrations.ddp.wrap_ddp(parallel_model) (for a DDP built elsewhere, e.g. by "
        "accelerate, call autosp.integrations.ddp.prepare_ddp(ddp) before the first step)."
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
    mesh: DeviceMesh | None = None,
    sp_size: int | None = None,
    config: Config | None = None,
    **options: Any,
) -> SequenceParallel:
    """Make ``model``'s training step sequence-parallel over ``group``.

    Every rank of the group calls the returned module with the same full-length batch; the
    loss is that of one process on the whole batch, sequence-shaped outputs come back as this
    rank's rows (``gather_sequence`` joins them) and parameter gradients are summed over the
    group after ``backward()``. With data parallelism (a ``("dp", "sp")`` mesh) each SP group
    takes its own batch and the gradients are the mean over DP groups of those sums.

    Args:
        model: any module whose forward uses ``scaled_dot_product_attention``.
        group: the sequence-parallel ranks: a ProcessGroup, a 1-D DeviceMesh, or None for
            all ranks of the default group; or a 2-D ``("dp", "sp")`` DeviceMesh (as ``mesh``).
        mesh: a 2-D DeviceMesh with dims ``("dp", "sp")`` (``autosp.mesh.sequence_parallel_mesh``).
        sp_size: ranks per SP group: builds that mesh over the default group.
        config: a ``Config``; or give its fields as keyword options (``backend="aot_eager"``).

    Raises:
        AutoSPError: torch.distributed is not initialised, the mesh has other dims or sizes
            that do not divide the world, more than one of group/mesh/sp_size is given, or
            ``model`` is a DistributedDataParallel module or has ``fully_shard`` applied
            inside (use ``autosp.integrations.fsdp.shard``).
    """
    if config is not None and options:
        raise TypeError("autosp: pass either config= or keyword options, not both")
    if isinstance(model, DistributedDataParallel):
        raise AutoSPError(
            "autosp: parallelize() was given a DistributedDataParallel module. DDP averages "
            "gradients over its group, but the sequence-parallel ranks' gradients must be "
            "summed, so DDP goes outside: parallelize the inner model (ddp.module), then either "
            "pass mesh=autosp.mesh.sequence_parallel_mesh(sp) (autosp reduces over data and "
            "sequence parallel ranks) or wrap the result with "
            "autosp.integrations.ddp.wrap_ddp(parallel_model)."
        )
    refuse_fsdp_inside(model)
    config = config or Config(**options)
    return SequenceParallel(model, resolve_layout(group, mesh, sp_size), config)
