"""DeepSpeed ZeRO around a sequence-parallel model: ``autosp.integrations.deepspeed.initialize``.

Note [DeepSpeed around autosp]
    The DeepSpeed config gets an ``"autosp"`` section::

        {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
         "autosp": {"sp_size": 2, "backend": "inductor"}}

    ``sp_size`` is the sequence-parallel degree; the other keys are ``autosp.Config`` fields.
    ``initialize`` takes the section out of the config, builds the ``("dp", "sp")`` mesh,
    parallelizes the model over ``mesh["sp"]`` with ``sync_grads=False`` and calls
    ``deepspeed.initialize`` with a model-parallel unit (``mpu``) that names the mesh's groups
    the DeepSpeed way (Ulysses' ``parallel_state_sp``): the sequence-parallel group is
    ``mesh["sp"]``, the "sequence data parallel" group (ZeRO's partition and reduction group)
    is the whole ``dp x sp`` mesh. Every ZeRO stage then sums the partial gradients over that
    group and divides by ``seq_dp / sp = dp``: the sum over ``sp`` of the mean over ``dp``,
    which is exact. The batch size DeepSpeed checks counts ``dp`` data-parallel ranks.

    ZeRO-3 is refused (``_refuse_stage``), for two reasons checked in DeepSpeed 0.19.8's
    sources and on torch 2.13:

    - Without leaf modules, ZeRO-3 gathers each submodule's parameters in hooks on that
      submodule (``parameter_offload.py``, ``_register_deepspeed_module``; the pre-forward hook
      is ``torch.compiler.disable``d). They run inside autosp's one compiled graph: the first
      forward fails with "Skip calling `torch.compiler.disable()`d function" (a graph break).
    - Marking the whole model one ZeRO-3 leaf (``deepspeed.utils.set_z3_leaf_modules``; the
      ``SequenceParallel`` wrapper, as the one FSDP2 unit of ``autosp.integrations.fsdp``)
      moves the gather outside the graph, but ZeRO-3 then reduces a leaf's gradients in a
      ``register_full_backward_hook`` on the leaf (``stage3.py``,
      ``create_reduce_and_remove_grad_hooks``) instead of per-parameter gradient hooks. torch
      fires a full backward hook when the gradients of the module's positional inputs are
      computed; a model called with token ids has none that requires grad, so the hook fires
      when the output's gradient arrives, before any parameter gradient exists (DeepSpeed then
      reduces zeros), and a model returning a dict (a ``ModelOutput``) exposes no output tensor
      to the hook, which then never fires (nothing is reduced). Either way the gradients would
      not be reduced (torch's side: ``test_whole_model_leaf_reduction_misses_gradients``).
      Run on 2 gloo ranks (HF Llama, ``memory_efficient_linear: false``, since ZeRO-3's
      default replaces ``F.linear`` by an autograd.Function): forward and backward run, and
      ``engine.step()`` finds the full, unreduced gradients still in ``.grad``.
      ``autosp.integrations.sharded`` shards the parameters instead, gathering them inside
      the graph (Note [Parameters gathered in the graph]).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from autosp.api import SequenceParallel, parallelize
from autosp.config import Config
from autosp.errors import AutoSPError
from autosp.mesh import sequence_parallel_mesh

logger = logging.getLogger(__name__)

SECTION = "autosp"
"""The DeepSpeed config section autosp reads."""
CONFLICTING_KEYS = ("sequence_parallel_size", "data_parallel_size")
"""DeepSpeed's own mesh options: the ``"autosp"`` section sets the layout instead."""


class SequenceParallelUnit:
    """The ``mpu`` DeepSpeed reads its groups from, for a ``("dp", "sp")`` mesh.

    It has DeepSpeed's sequence-parallel interface (``deepspeed.runtime.sequence_parallel.
    parallel_state_sp``): DeepSpeed recognises it by ``initialize_sequence_parallel`` and then
    treats the model as not model-parallel (gradient norms are not summed over ``sp``)."""

    def __init__(self, mesh: DeviceMesh) -> None:
        self.mesh = mesh
        self._sp = mesh["sp"].get_group()
        self._seq_dp = mesh["dp", "sp"]._flatten("dp_sp").get_group()

    def initialize_sequence_parallel(self, sequence_parallel_size: int) -> None:
        raise AutoSPError(
            "autosp: the sequence-parallel groups come from the autosp mesh; they are built "
            "by autosp.integrations.deepspeed.initialize, not by DeepSpeed."
        )

    def get_sequence_parallel_group(self) -> dist.ProcessGroup:
        return self._sp

    def get_sequence_parallel_world_size(self) -> int:
        return dist.get_world_size(self._sp)

    def get_sequence_parallel_rank(self) -> int:
        return dist.get_rank(self._sp)

    def get_sequence_data_parallel_group(self) -> dist.ProcessGroup:
        return self._seq_dp

    def get_sequence_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self._seq_dp)

    def get_sequence_data_parallel_rank(self) -> int:
        return dist.get_rank(self._seq_dp)

    def get_data_parallel_world_size(self) -> int:
        """Ranks that get different batches (DeepSpeed's batch-size check and data loader)."""
        return self.mesh["dp"].size()

    def get_data_parallel_rank(self) -> int:
        return self.mesh["dp"].get_local_rank()


def initialize(
    *, model: nn.Module, config: dict[str, Any] | str | Path, **kwargs: Any
) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` for a model made sequence-parallel by the config's ``"autosp"``
    section (Note [DeepSpeed around autosp]); returns what ``deepspeed.initialize`` returns.

    Every rank of one SP group must get the same batch: pass ``training_data=`` (DeepSpeed's
    loader then shards over the ``dp`` groups only) or use ``autosp.data_parallel_sampler``.

    Args:
        model: the plain model (not yet parallelized).
        config: the DeepSpeed config (a dict or a JSON file) with an ``"autosp"`` section:
            ``sp_size`` and optional ``autosp.Config`` fields (not ``sync_grads``).
        **kwargs: the other arguments of ``deepspeed.initialize`` (``optimizer``,
            ``model_parameters``, ``training_data``, ``lr_scheduler``...), except ``mpu``
            and ``mesh_param``, which autosp sets.

    Raises:
        AutoSPError: the section is missing or invalid, ``sp_size`` does not divide the world,
            the config or arguments set DeepSpeed's own sequence parallelism, the model is
            already parallelized, or ZeRO stage 3 is asked for.
    """
    import deepspeed

    ds_config, section = split_config(config)
    for name in ("mpu", "mesh_param"):
        if kwargs.get(name) is not None:
            raise AutoSPError(
                f"autosp: initialize() got {name}=, but the 'autosp' section sets the "
                f"data- and sequence-parallel groups. Remove {name}= (for tensor or pipeline "
                "parallelism beside autosp, there is no support yet)."
            )
    _refuse_stage(ds_config)
    if isinstance(model, SequenceParallel):
        raise AutoSPError(
            "autosp: initialize() was given a model that parallelize() already wrapped. Pass "
            "the plain model: initialize() parallelizes it with sync_grads=False (DeepSpeed's "
            "reduction sums the gradients over the sequence-parallel ranks) from the 'autosp' "
            "section of the config."
        )
    if not dist.is_initialized():
        deepspeed.init_distributed()
    sp = section.pop("sp_size")
    mesh = sequence_parallel_mesh(sp)
    sp_model = parallelize(model, group=mesh, config=Config(sync_grads=False, **section))
    logger.info(
        "autosp: DeepSpeed ZeRO stage %d over dp %d x sp %d",
        ds_config.get("zero_optimization", {}).get("stage", 0),
        mesh["dp"].size(),
        sp,
    )
    return deepspeed.initialize(
        model=sp_model, config=ds_config, mpu=SequenceParallelUnit(mesh), **kwargs
    )


def split_config(config: dict[str, Any] | str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The DeepSpeed config without its ``"autosp"`` section, and the section (checked)."""
    if isinstance(config, str | Path):
        with open(config) as f:
            config = json.load(f)
    ds_config = copy.deepcopy(config)
    section = ds_config.pop(SECTION, None)
    if not isinstance(section, dict) or "sp_size" not in section:
        raise AutoSPError(
            "autosp: the DeepSpeed config has no 'autosp' section with 'sp_size'. Add "
            '"autosp": {"sp_size": 2} (the sequence-parallel degree; other keys are '
            "autosp.Config fields), or call deepspeed.initialize directly for a run without "
            "sequence parallelism."
        )
    sp = section["sp_size"]
    if not isinstance(sp, int) or isinstance(sp, bool) or sp < 1:
        raise AutoSPError(f"autosp: 'autosp.sp_size' must be a positive integer, got {sp!r}.")
    fields = {f.name for f in dataclasses.fields(Config)} - {"sync_grads"}
    unknown = sorted(set(section) - fields - {"sp_size"})
    if unknown:
        raise AutoSPError(
            f"autosp: unknown key(s) {unknown} in the 'autosp' section. It takes 'sp_size' and "
            f"the autosp.Config fields {sorted(fields)}"
            + (
                "; 'sync_grads' is set by autosp (DeepSpeed reduces the gradients)."
                if "sync_grads" in unknown
                else "."
            )
        )
    for key in CONFLICTING_KEYS:
        if ds_config.get(key, 1) != 1:
            raise AutoSPError(
                f"autosp: the DeepSpeed config sets {key}={ds_config[key]} and an 'autosp' "
                f"section: two sequence-parallel layouts. Remove {key!r}; 'autosp.sp_size' sets "
                "the degree and the data-parallel size is the world size divided by it."
            )
    passes = ds_config.get("compile", {}).get("passes") or []
    if "autosp" in passes:
        raise AutoSPError(
            "autosp: the DeepSpeed config enables DeepSpeed's own AutoSP compile pass "
            "('compile': {'passes': ['autosp']}) and an 'autosp' section. Remove the pass: "
            "autosp parallelizes the model itself."
        )
    return ds_config, dict(section)


def _refuse_stage(ds_config: dict[str, Any]) -> None:
    """ZeRO-3 is refused: its per-module parameter hooks would run inside autosp's compiled
    graph, and with the whole model as one ZeRO-3 leaf module its gradient reduction would not
    see the gradients (Note [DeepSpeed around autosp])."""
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        raise AutoSPError(
            "autosp: ZeRO stage 3 is not supported with autosp. ZeRO-3 gathers each "
            "module's parameters in hooks around that module, and autosp runs the whole "
            "forward as one compiled graph, which such hooks break. Making the whole model one "
            "ZeRO-3 leaf module (deepspeed.utils.set_z3_leaf_modules) keeps the hooks out of the "
            "graph, but DeepSpeed then reduces the leaf's gradients in a full backward hook "
            "that fires before the parameter gradients exist when no positional input "
            "requires grad (token ids), and never when the model returns a dict: the "
            "gradients would not be reduced. For ZeRO-3's memory use "
            "autosp.integrations.sharded.shard() (parameters, gradients and optimizer state "
            "sharded over dp x sp, each parameter gathered at its use inside the graph), or "
            "ZeRO stage 1 or 2 (optimizer state and gradients sharded)."
        )
