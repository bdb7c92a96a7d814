"""FSDP2 (``torch.distributed.fsdp.fully_shard``) around a sequence-parallel model.

Note [FSDP2 around autosp]
    Parameters are sharded over the flattened ``dp x sp`` mesh (torchtitan's ``dp_shard_cp``):
    the sequence-parallel ranks hold shards too. Each rank's gradient is the part from its own
    tokens (``sync_grads=False``), so the reduce-scatter must *sum* over ``sp`` and *average*
    over ``dp``: FSDP sums over all ``dp * sp`` ranks and divides by ``dp``
    (``set_gradient_divide_factor(dp)`` with sum-only collectives).

        world 4, dp 2 x sp 2          one FSDP unit: the whole SequenceParallel module
        shard of every parameter:     forward:  all-gather every parameter (outside the graph)
          rank r holds 1/4                      -> the one compiled graph runs
                                      backward: -> reduce-scatter (SUM / dp) every gradient

    autosp compiles the whole forward as one graph (``fullgraph=True``). FSDP2's per-module
    hooks would sit inside that graph, and Dynamo does not trace them (torch 2.13, per-layer
    ``fully_shard`` under autosp: "Attempted to call function marked as skipped", a graph
    break). So the only FSDP unit is the ``SequenceParallel`` wrapper, whose hooks run outside
    the compiled call. Memory: parameters, gradients and
    optimizer state are sharded between steps (1/world each), but during one step every
    parameter and its full gradient exist unsharded on each rank, as under DDP. To gather
    one parameter at a time, ``autosp.integrations.sharded`` moves the gathering into the
    graph (Note [Parameters gathered in the graph]).
"""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from autosp.api import SequenceParallel, parallelize
from autosp.integrations import require_plain_model

logger = logging.getLogger(__name__)

SHARD_DIM_NAME = "dp_sp"
"""Name of the flattened ``("dp", "sp")`` mesh dim that FSDP shards over."""


def shard(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
    **options: Any,
) -> SequenceParallel:
    """Make ``model`` sequence-parallel over ``mesh["sp"]`` and shard it with FSDP2 over the
    whole ``("dp", "sp")`` mesh (Note [FSDP2 around autosp]).

    Every rank of one SP group passes the same batch (``autosp.data_parallel_sampler``); after
    ``backward()`` each rank holds its shard of the exact gradient of the mean over the
    data-parallel groups' losses. Build the optimizer on the returned module's parameters
    (DTensor shards), after this call.

    Args:
        model: the plain model (not yet parallelized, not yet sharded).
        mesh: the ``("dp", "sp")`` mesh of ``autosp.sequence_parallel_mesh``.
        mp_policy: FSDP2 mixed precision (e.g. ``param_dtype=bf16, reduce_dtype=fp32``).
        reshard_after_forward: free the gathered parameters between forward and backward
            (gathered again for the backward) as FSDP2's option of that name.
        **options: ``autosp.Config`` fields (``backend=``, ``attention=``...).

    Raises:
        AutoSPError: the mesh is not ``("dp", "sp")``, ``model`` is already parallelized or
            sharded, or ``sync_grads=True`` was asked for.
    """
    require_plain_model(
        "fsdp.shard",
        "FSDP2",
        model,
        mesh,
        options,
        "FSDP's reduce-scatter sums the gradients over the sequence-parallel ranks itself",
    )
    options["sync_grads"] = False
    sp_model = parallelize(model, group=mesh, **options)
    flat = mesh["dp", "sp"]._flatten(SHARD_DIM_NAME)
    fully_shard(
        sp_model,
        mesh=flat,
        mp_policy=mp_policy or MixedPrecisionPolicy(),
        reshard_after_forward=reshard_after_forward,
    )
    assert isinstance(sp_model, FSDPModule)
    # Sum over all dp*sp ranks, divide by dp: sum over sp, mean over dp (exact, any backend:
    # gloo has neither AVG nor PREMUL_SUM).
    sp_model.set_force_sum_reduction_for_comms(True)
    sp_model.set_gradient_divide_factor(float(mesh["dp"].size()))
    sp_model._autosp_fsdp = True
    logger.info(
        "autosp: FSDP2 over %d ranks (dp %d x sp %d), one unit, gradients summed over sp and "
        "averaged over dp",
        dist.get_world_size(flat.get_group()),
        mesh["dp"].size(),
        mesh["sp"].size(),
    )
    return sp_model
