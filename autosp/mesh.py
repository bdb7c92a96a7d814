"""Data parallel beside sequence parallel: the ``("dp", "sp")`` mesh and the sampler that feeds it.

Note [Layout of the mesh]
    The world is a 2-D ``DeviceMesh`` with dims ``("dp", "sp")``, the sequence-parallel dim
    innermost, so that one SP group is ``sp`` consecutive ranks (on one host when it can be):

        world 4, dp 2 x sp 2:      sp ->
                              dp  [[0, 1],     SP group 0: ranks 0, 1 (batch A)
                              |    [2, 3]]     SP group 1: ranks 2, 3 (batch B)

    Ranks of one SP group get the *same* batch (autosp shards its tokens); ranks at the same
    ``sp`` coordinate in different rows get different batches. The true gradient is the *mean*
    over ``dp`` of the *sum* over ``sp`` of the per-rank partial gradients: autosp computes it
    with one all-reduce (SUM) over all ``dp * sp`` ranks of the mesh, then a division by
    ``dp``, rather than a sum over ``sp`` followed by a mean over ``dp`` (two collectives for
    the same value; dividing by a power of two is exact in floating point).

    The step's gradient is the mean of the DP groups' gradients. A token-mean loss is taken
    over all the groups' labelled tokens (``Config.dp_mean="tokens"``, Note [Token mean over
    data-parallel groups]): the gradient of one process on the concatenated batch, whatever
    the groups' numbers of labelled tokens. ``dp_mean="groups"`` takes each group's own mean,
    as DistributedDataParallel does, which weights the groups equally.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.utils.data import Dataset, DistributedSampler

from autosp.errors import AutoSPError

MESH_DIMS = ("dp", "sp")


@dataclass(frozen=True, slots=True)
class Layout:
    """The groups of a parallelized model (Note [Layout of the mesh])."""

    sp: dist.ProcessGroup
    """The sequence-parallel group: its ranks share one batch and split its tokens."""
    grads: dist.ProcessGroup
    """The ranks whose gradients are reduced together: every rank of the ``dp x sp`` mesh."""
    dp: int
    """Data-parallel groups in ``grads``: the gradient is the sum over ``grads`` over ``dp``."""


def require_distributed() -> None:
    """Raise unless torch.distributed is initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise AutoSPError(
            "autosp: torch.distributed is not initialised. Call "
            "torch.distributed.init_process_group() first (launch with torchrun, or use "
            "`autosp train`, which launches the ranks for you)."
        )


def resolve_layout(
    group: dist.ProcessGroup | DeviceMesh | None,
    mesh: DeviceMesh | None,
    sp_size: int | None,
) -> Layout:
    """The layout from ``parallelize``'s ``group=``, ``mesh=`` or ``sp_size=`` (at most one).

    A ProcessGroup, a 1-D mesh or None (the default group) is one sequence-parallel group with
    no data parallelism; a 2-D mesh with dims ``("dp", "sp")`` (``group=`` or ``mesh=``) or
    ``sp_size`` (the mesh over the default group, ``dp = world / sp_size``) adds data parallelism
    across SP groups.

    Raises:
        AutoSPError: torch.distributed is not initialised, more than one is given, the mesh has
            other dims, or ``sp_size`` does not divide the world.
    """
    require_distributed()
    chosen = (("group", group), ("mesh", mesh), ("sp_size", sp_size))
    given = [name for name, value in chosen if value is not None]
    if len(given) > 1:
        raise AutoSPError(
            f"autosp: parallelize() got {' and '.join(given)}; pass one of them: a ProcessGroup "
            "or 1-D mesh for sequence parallelism alone, a ('dp', 'sp') mesh, or sp_size= to "
            "build that mesh over the default group."
        )
    if sp_size is not None:
        mesh = sequence_parallel_mesh(sp_size)
    elif isinstance(group, DeviceMesh):
        mesh = group
    elif mesh is None:
        sp = group or dist.group.WORLD
        return Layout(sp=sp, grads=sp, dp=1)
    if mesh.ndim == 1:
        return Layout(sp=mesh.get_group(), grads=mesh.get_group(), dp=1)
    if mesh.ndim != 2 or set(mesh.mesh_dim_names or ()) != set(MESH_DIMS):
        raise AutoSPError(
            f"autosp: the DeviceMesh has dims {mesh.mesh_dim_names} (shape "
            f"{tuple(mesh.mesh.shape)}); autosp takes a 1-D sequence-parallel mesh or a 2-D mesh "
            "with dims ('dp', 'sp'): autosp.mesh.sequence_parallel_mesh(sp) builds one. For "
            "other dims, pass the sub-mesh, e.g. mesh['dp', 'sp'] or mesh['sp']."
        )
    sp = mesh["sp"].get_group()
    dp = mesh["dp"].size()
    if dp == 1:
        return Layout(sp=sp, grads=sp, dp=1)
    # A mesh's ranks are distinct: as many as the world means all of them (read without a
    # tensor op, which an active FakeTensorMode, as in `autosp plan`, would make fake).
    if mesh.mesh.numel() == dist.get_world_size():
        grads = dist.group.WORLD
    else:
        ranks = sorted(mesh.mesh.flatten().tolist())
        grads = dist.new_group(ranks, use_local_synchronization=True)
    return Layout(sp=sp, grads=grads, dp=dp)


def sequence_parallel_mesh(
    sp: int, *, dp: int | None = None, device_type: str | None = None
) -> DeviceMesh:
    """The ``("dp", "sp")`` mesh over the default process group (Note [Layout of the mesh]).

    Args:
        sp: ranks per sequence-parallel group.
        dp: data-parallel groups; None: the world size divided by ``sp``.
        device_type: ``"cuda"``, ``"cpu"``...; None: ``"cuda"`` when the default group's
            backend is NCCL, else ``"cpu"``.

    Raises:
        AutoSPError: torch.distributed is not initialised, or ``dp * sp`` is not the world.
    """
    require_distributed()
    world = dist.get_world_size()
    if sp < 1 or world % sp:
        raise AutoSPError(
            f"autosp: sp={sp} does not divide the world size {world}: each sequence-parallel "
            f"group needs sp ranks and every rank belongs to one. Choose sp among "
            f"{[d for d in range(1, world + 1) if world % d == 0]}."
        )
    if dp is None:
        dp = world // sp
    if dp * sp != world:
        raise AutoSPError(
            f"autosp: dp={dp} x sp={sp} = {dp * sp} ranks, but the world has {world}. "
            f"Pass dp={world // sp} (or leave dp=None)."
        )
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dp, sp), mesh_dim_names=MESH_DIMS)


def data_parallel_sampler(
    dataset: Dataset,
    mesh: DeviceMesh,
    *,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
) -> DistributedSampler:
    """A ``DistributedSampler`` that gives every rank of one SP group the same samples and
    each data-parallel group its own share (pass it as ``DataLoader(sampler=...)`` and call
    ``set_epoch`` each epoch, as with any ``DistributedSampler``)."""
    rank, replicas = data_parallel_rank(mesh)
    return DistributedSampler(
        dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )


def data_parallel_rank(mesh: DeviceMesh) -> tuple[int, int]:
    """``(rank, size)`` of this process along the mesh's ``dp`` dim; ``(0, 1)`` without one."""
    if not mesh.mesh_dim_names or "dp" not in mesh.mesh_dim_names:
        return 0, 1
    return mesh["dp"].get_local_rank(), mesh["dp"].size()


def split_batch(batch: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """This data-parallel group's rows of a global ``batch`` (dim 0 divided over ``dp``)."""
    rank, size = data_parallel_rank(mesh)
    if batch.shape[0] % size:
        raise AutoSPError(
            f"autosp: a global batch of {batch.shape[0]} sequences does not divide over "
            f"dp={size} data-parallel groups; use a multiple of {size}."
        )
    rows = batch.shape[0] // size
    return batch[rank * rows : (rank + 1) * rows]
