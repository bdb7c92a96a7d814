"""DistributedDataParallel around a sequence-parallel model, reducing over ``dp x sp``.

Note [DDP beside sequence parallelism]
    DDP reduces each gradient bucket over its group with its comm hook; the default hook
    divides by the group size and sums, an *average*. Under sequence parallelism a rank's
    gradient is a partial sum over its tokens, and the true gradient is the *sum* over the SP
    group, averaged over the DP groups (Note [Layout of the mesh]). So DDP runs over every rank
    of the ``dp x sp`` mesh with a hook that divides by ``dp`` (not ``dp * sp``) and sums: one
    all-reduce per bucket, as autosp's own reduction, and autosp's own reduction is turned off
    so nothing is reduced twice. ``ddp.no_sync()`` works as with any DDP model: partial
    gradients accumulate locally and the first backward after it reduces them all.

    DDP over only the SP ranks, or with its default hook, or beside autosp's own reduction,
    would be silently wrong: the model's forward raises unless ``prepare_ddp`` set DDP up.

Usage::

    mesh = autosp.mesh.sequence_parallel_mesh(sp=2)  # world 4: dp 2 x sp 2
    model = wrap_ddp(autosp.parallelize(model, mesh=mesh))
    model(input_ids=ids, labels=ids).loss.backward()  # ids: this SP group's batch

Checkpoints: ``model.module.state_dict()`` has the plain model's keys, ``model.state_dict()``
those of DDP around the plain model (``module.`` + plain); both load back either way.
"""

# No ``from __future__ import annotations``: DDP checks the hook's annotations as objects.
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from autosp.api import SequenceParallel
from autosp.comm.ops import _counts
from autosp.errors import AutoSPError


@dataclass(frozen=True, slots=True)
class HookState:
    """What the comm hook needs: DDP's group (every rank of the mesh) and the DP degree."""

    group: dist.ProcessGroup
    dp: int


def sum_sp_mean_dp_hook(
    state: HookState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket divided by ``dp``, summed over DDP's group (Note [DDP beside
    sequence parallelism]). Dividing first, as DDP's own hook does, keeps low-precision
    buckets in range; by a power of two it is exact."""
    buffer = bucket.buffer()
    if state.dp > 1:
        buffer.div_(state.dp)
    _counts["ddp_all_reduce"] += 1
    work = dist.all_reduce(buffer, group=state.group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_ddp(model: SequenceParallel, **ddp_options: Any) -> DistributedDataParallel:
    """``DistributedDataParallel(model)`` over the model's ``dp x sp`` ranks, set up by
    ``prepare_ddp``. ``ddp_options`` go to DDP (``bucket_cap_mb``, ``device_ids``...).

    Raises:
        AutoSPError: ``model`` is not a parallelized model, or ``process_group`` is given.
    """
    if not isinstance(model, SequenceParallel):
        raise AutoSPError(
            f"autosp: wrap_ddp() takes the result of autosp.parallelize(), got "
            f"{type(model).__name__}. Call parallelize(model, mesh=mesh) first."
        )
    if "process_group" in ddp_options or "device_mesh" in ddp_options:
        raise AutoSPError(
            "autosp: wrap_ddp() chooses DDP's group (every rank of the model's dp x sp mesh); "
            "do not pass process_group or device_mesh. Give the layout to parallelize(mesh=)."
        )
    ddp = DistributedDataParallel(model, process_group=model.layout.grads, **ddp_options)
    return prepare_ddp(ddp)


def prepare_ddp(ddp: DistributedDataParallel) -> DistributedDataParallel:
    """Set up a DDP that another library built around a parallelized model (e.g. accelerate's
    ``prepare``): register the comm hook and turn autosp's own reduction off. Call it before
    the first forward.

    Raises:
        AutoSPError: DDP wraps something else than a parallelized model, its group is not the
            model's ``dp x sp`` ranks, or it already has a comm hook.
    """
    model = ddp.module
    if not isinstance(model, SequenceParallel):
        raise AutoSPError(
            f"autosp: this DistributedDataParallel wraps {type(model).__name__}, not the result "
            "of autosp.parallelize(). Parallelize first, then wrap: "
            "wrap_ddp(autosp.parallelize(model, mesh=mesh))."
        )
    want = sorted(dist.get_process_group_ranks(model.layout.grads))
    have = sorted(dist.get_process_group_ranks(ddp.process_group))
    if have != want:
        raise AutoSPError(
            f"autosp: DistributedDataParallel runs over ranks {have}, but the model's gradients "
            f"are reduced over its dp x sp ranks {want} (dp={model.layout.dp}, sp="
            f"{dist.get_world_size(model.group)}). DDP averages over its group: over the "
            "sequence-parallel ranks alone it would divide their sum. Build DDP with "
            "process_group=model.layout.grads (or use wrap_ddp(model))."
        )
    if ddp._comm_hooks:
        raise AutoSPError(
            "autosp: this DistributedDataParallel already has a comm hook; autosp needs its own "
            "(sum over dp x sp, divide by dp). Do not register another."
        )
    ddp.register_comm_hook(HookState(ddp.process_group, model.layout.dp), sum_sp_mean_dp_hook)
    model.release_grad_sync()
    return ddp


def is_prepared(ddp: DistributedDataParallel, model: SequenceParallel) -> bool:
    """Whether ``prepare_ddp`` set up ``ddp`` around ``model``."""
    return ddp.module is model and any(hook is sum_sp_mean_dp_hook for hook, _ in ddp._comm_hooks)
