"""autosp beside the libraries users already run: DDP, FSDP2, DeepSpeed, Hugging Face."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh


def require_plain_model(
    caller: str,
    engine: str,
    model: nn.Module,
    mesh: DeviceMesh,
    options: dict[str, Any],
    reducer: str,
) -> None:
    """The checks of an engine's one call (``fsdp.shard``, ``sharded.shard``): a ``("dp",
    "sp")`` mesh, a model not yet parallelized, and no ``sync_grads=True`` (``reducer``
    says what reduces the gradients instead).

    Raises:
        AutoSPError: naming the cause and the fix.
    """
    from autosp.api import SequenceParallel
    from autosp.errors import AutoSPError

    if mesh.mesh_dim_names != ("dp", "sp"):
        raise AutoSPError(
            f"autosp: {caller}() needs the ('dp', 'sp') mesh of "
            f"autosp.sequence_parallel_mesh(); got a mesh with dims {mesh.mesh_dim_names}."
        )
    if isinstance(model, SequenceParallel):
        raise AutoSPError(
            f"autosp: {caller}() was given a model that parallelize() already wrapped. Pass the "
            f"plain model: {caller}() parallelizes it with sync_grads=False ({reducer})."
        )
    if options.get("sync_grads", False):
        raise AutoSPError(
            f"autosp: sync_grads=True cannot be used with {engine}: {reducer}. Leave "
            "sync_grads out."
        )
