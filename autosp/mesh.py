"""Data parallel beside sequence parallel: the ``("dp", "sp")`` mesh and the sampler that feeds it.

Note [Layout of the mesh]
    The world is a 2-D ``DeviceMesh`` with dims ``("dp", "sp")``, the sequence-parallel dim
    innermost, so that one SP group is ``sp`` consecutive ranks (on one host when it can be):

        world 4, dp 2 x sp 2:      sp ->
                              dp  [[0, 1],     SP group 0: ranks 0, 1 (batch A)
                              |    [2, 3]]     SP group 1: ranks 2, 3 (batch B)

    Ranks of one SP group get the *same* batch (autosp shards its tokens); ranks at the same
    ``sp`` coordinate in different rows get different batches. The true gradient is the *mean*
    over ``dp`` of the *sum* over ``sp`` of the per-rank partial gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.utils.data import Dataset, DistributedSampler

from autosp.errors import AutoSPError

MESH_DIMS = ("dp", "sp")


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
    if not dist.is_available() or not dist.is_initialized():
        raise AutoSPError(
            "autosp: torch.distributed is not initialised. Call "
            "torch.distributed.init_process_group() before building the mesh."
        )
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
