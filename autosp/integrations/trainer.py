"""Hugging Face ``Trainer`` with sequence parallelism: ``SequenceParallelTrainer``.

Note [Trainer integration]
    A drop-in ``transformers.Trainer`` subclass; the training loop, optimizer, scheduler,
    logging and checkpoints are the Trainer's own. Three things differ, each through a method
    the Trainer lets a subclass replace:

    - *The model* (``_wrap_model``, the Trainer's hook for wrappers accelerate does not make).
      When training starts, the model is parallelized over the mesh's ``sp`` dim and handed to
      accelerate's ``prepare_model(evaluation_mode=True)`` (mixed-precision autocast only), so
      accelerate never wraps it in ``DistributedDataParallel``: DDP would average the partial
      gradients that autosp sums over the SP group. ``trainer.model`` stays the plain model,
      which is what checkpoints save and evaluation runs.
    - *The batches* (``get_train_dataloader``). accelerate deals the batches out over all
      processes; here they are dealt out over the ``dp`` dim only (the Trainer's sampler and
      seeds unchanged), so every rank of an SP group gets the same batch and each DP group its
      own. With ``dp=1`` every rank sees the batches a single-process Trainer sees, in order.
    - *The batch size and tokens it reports* (``get_total_train_batch_size``,
      ``_track_num_input_tokens``): counted over ``dp``, not every process.

    The loss needs nothing: with ``average_tokens_across_devices`` (the default) the Trainer
    counts the valid labels over all ``W = dp * sp`` processes, ``sp`` times the true count
    ``N``, and multiplies each rank's loss by ``W``. Each rank's loss is then
    ``dp * S_g / N`` (``S_g``: its group's summed token losses); autosp sums its gradient over
    ``sp``, averaging over ``dp`` gives ``sum_g grad S_g / N``, and the logged mean over all
    processes is ``sum_g S_g / N``: the single-process loss and gradient of the whole batch.
    Without it, each group's loss is its own mean, as with the plain Trainer.

    Evaluation and prediction run the plain model on each rank's share of the data (not
    sequence-parallel).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from accelerate.data_loader import BatchSamplerShard
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

from autosp.api import SequenceParallel, parallelize
from autosp.config import Config
from autosp.errors import AutoSPError
from autosp.mesh import data_parallel_rank, sequence_parallel_mesh

logger = logging.getLogger(__name__)


class SequenceParallelTrainer(Trainer):
    """A ``transformers.Trainer`` that trains the model sequence-parallel (Note [Trainer
    integration]). Launch one process per device (``torchrun``) and pass the plain model::

        trainer = SequenceParallelTrainer(model=model, args=args, train_dataset=data, sp_size=2)
        trainer.train()

    Args:
        *args, **kwargs: those of ``transformers.Trainer``.
        sp_size: ranks per sequence-parallel group; the world divided by it is the number of
            data-parallel groups. None: all ranks form one SP group.
        mesh: a ``("dp", "sp")`` mesh from ``autosp.mesh.sequence_parallel_mesh`` instead of
            ``sp_size``.
        autosp_config: options of ``autosp.parallelize`` (``autosp.Config``).

    Raises:
        AutoSPError: the model is already wrapped (DDP, ``autosp.parallelize``), the mesh does
            not cover the world, accelerate does not see the whole world, or
            a Trainer option needs the whole logits on every rank.
    """

    def __init__(
        self,
        *args: Any,
        sp_size: int | None = None,
        mesh: DeviceMesh | None = None,
        autosp_config: Config | None = None,
        **kwargs: Any,
    ) -> None:
        if sp_size is not None and mesh is not None:
            raise TypeError("autosp: pass either sp_size= or mesh=, not both")
        refuse_wrapped(kwargs["model"] if "model" in kwargs else args[0] if args else None)
        super().__init__(*args, **kwargs)
        refuse_unsupported(self.args, self)
        self.sp_mesh = resolve_mesh(sp_size, mesh)
        refuse_other_world(self.accelerator.num_processes)
        self.autosp_config = autosp_config or Config()
        self._parallel: SequenceParallel | None = None
        logger.info(
            "autosp: the Trainer trains over the mesh %s",
            dict(zip(self.sp_mesh.mesh_dim_names, self.sp_mesh.shape, strict=True)),
        )

    def _wrap_model(
        self, model: nn.Module, training: bool = True, dataloader: DataLoader | None = None
    ) -> nn.Module:
        if not training:
            return super()._wrap_model(model, training, dataloader)
        if isinstance(model, SequenceParallel):  # a later train(): already parallelized
            return model
        if self._parallel is None or self._parallel.module is not model:
            parallel = parallelize(model, mesh=self.sp_mesh, config=self.autosp_config)
            self._parallel = self.accelerator.prepare_model(
                parallel, device_placement=False, evaluation_mode=True
            )
        return self._parallel

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        if model is not self._parallel:
            raise AutoSPError(
                "autosp: the Trainer is training a "
                f"{type(model).__name__}, not the sequence-parallel model this trainer made "
                "(this transformers version wraps models differently). Train with "
                "autosp.parallelize in your own loop, or report the transformers version."
            )
        return super().training_step(model, inputs, num_items_in_batch)

    def get_train_dataloader(self) -> DataLoader:
        loader = super().get_train_dataloader()
        rank, size = data_parallel_rank(self.sp_mesh)
        deal_over_data_parallel(loader, rank, size)
        return loader

    def _track_num_input_tokens(self, inputs: dict[str, torch.Tensor | Any]) -> None:
        # The Trainer sums the count over all processes: every rank of an SP group holds the
        # same batch, so the sum counts it sp times.
        before = self.state.num_input_tokens_seen
        super()._track_num_input_tokens(inputs)
        counted = self.state.num_input_tokens_seen - before
        self.state.num_input_tokens_seen = before + counted // self.sp_mesh["sp"].size()

    def get_total_train_batch_size(self, args: TrainingArguments) -> int:
        _, dp = data_parallel_rank(self.sp_mesh)
        return self._train_batch_size * args.gradient_accumulation_steps * dp


def resolve_mesh(sp_size: int | None, mesh: DeviceMesh | None) -> DeviceMesh:
    """The ``("dp", "sp")`` mesh of the trainer: ``mesh``, or one built from ``sp_size``
    (default: the world); it must cover every process the Trainer runs."""
    if not dist.is_available() or not dist.is_initialized():
        raise AutoSPError(
            "autosp: torch.distributed is not initialised. Launch the script with torchrun "
            "(torchrun --nproc-per-node N script.py): TrainingArguments then sets it up."
        )
    world = dist.get_world_size()
    if mesh is None:
        return sequence_parallel_mesh(sp_size or world)
    if mesh.mesh_dim_names is None or "sp" not in mesh.mesh_dim_names:
        raise AutoSPError(
            f"autosp: the mesh has dims {mesh.mesh_dim_names}, no 'sp' dim. Build it with "
            "autosp.mesh.sequence_parallel_mesh(sp, dp=...)."
        )
    if mesh.size() != world:
        raise AutoSPError(
            f"autosp: the mesh {dict(zip(mesh.mesh_dim_names, mesh.shape, strict=True))} holds "
            f"{mesh.size()} ranks, but the Trainer runs on all {world}: every rank must be in "
            f"one SP group and one DP group. Use sequence_parallel_mesh(sp) (dp = {world} / sp)."
        )
    return mesh


def refuse_other_world(processes: int) -> None:
    """Refuse an accelerate state that does not span the torch.distributed world."""
    world = dist.get_world_size()
    if processes != world:
        raise AutoSPError(
            f"autosp: accelerate runs {processes} process(es) but torch.distributed has {world} "
            "ranks, so the Trainer would not coordinate them (on a machine without GPUs, "
            "accelerate sees a distributed run only with TrainingArguments(use_cpu=True))."
        )


def refuse_wrapped(model: nn.Module | None) -> None:
    """Refuse a model the user wrapped: the trainer parallelizes the plain model itself."""
    if isinstance(model, SequenceParallel):
        raise AutoSPError(
            "autosp: SequenceParallelTrainer was given a model already passed through "
            "autosp.parallelize. Pass the plain model (parallel.module) and give the options as "
            "autosp_config=autosp.Config(...): the trainer parallelizes it when training starts, "
            "keeps accelerate from wrapping it in DDP and saves the plain model."
        )
    if isinstance(model, DistributedDataParallel):
        raise AutoSPError(
            "autosp: SequenceParallelTrainer was given a DistributedDataParallel model. DDP "
            "averages gradients, but the sequence-parallel ranks' gradients must be summed. "
            "Pass the plain model (ddp.module); the trainer handles data parallelism over the "
            "mesh's dp dim."
        )


def refuse_unsupported(args: TrainingArguments, trainer: Trainer) -> None:
    """Refuse Trainer options that cannot work on a sequence-parallel model."""
    reasons = []
    if args.label_smoothing_factor:
        reasons.append(
            "label_smoothing_factor: the Trainer smooths the loss from the whole logits, which "
            "each rank does not hold (the model's own loss, without smoothing, is exact)"
        )
    if trainer.compute_loss_func is not None:
        reasons.append(
            "compute_loss_func: it reads the whole logits, which each rank does not hold; put "
            "the loss in the model's forward (a labels= call), where autosp shards it exactly"
        )
    if args.include_num_input_tokens_seen not in (False, "no") and not hasattr(
        Trainer, "_track_num_input_tokens"
    ):
        reasons.append(
            "include_num_input_tokens_seen on this transformers version: it would count each "
            "batch once per sequence-parallel rank"
        )
    if args.torch_compile:
        reasons.append(
            "torch_compile=True: autosp compiles the model itself (autosp.Config(backend=...))"
        )
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        reasons.append(
            "DeepSpeed or FSDP: not supported by this trainer yet; drop the deepspeed/fsdp "
            "arguments (each rank then holds the whole model, as with DDP)"
        )
    if getattr(args, "train_sampling_strategy", None) == "batch_rebalance":
        reasons.append(
            "train_sampling_strategy='batch_rebalance': its sampler deals batches over every "
            "process itself; use 'random', 'sequential' or 'group_by_length'"
        )
    if getattr(args, "parallelism_config", None) is not None:
        reasons.append(
            "parallelism_config: accelerate's own context/sequence parallelism; autosp's mesh "
            "replaces it (sp_size= or mesh=)"
        )
    if args.n_gpu > 1:
        reasons.append("torch.nn.DataParallel (several GPUs per process): use one per process")
    if reasons:
        raise AutoSPError(
            "autosp: SequenceParallelTrainer cannot run with " + "; ".join(reasons) + "."
        )


def deal_over_data_parallel(loader: DataLoader, rank: int, size: int) -> None:
    """Make accelerate's prepared ``loader`` deal its batches over ``size`` data-parallel
    groups instead of every process, this rank being in group ``rank``: the ``BatchSamplerShard``
    accelerate put around the Trainer's sampler is given those coordinates (as the Trainer does
    for its own rank-aware batch sampler). With one group, the last partial batch stays
    partial, as in a single process.

    Raises:
        AutoSPError: the loader is not a map-style one sharded by a ``BatchSamplerShard``
            (an ``IterableDataset``, or a custom ``get_train_dataloader``).
    """
    if dist.get_world_size() == size:  # one process per group: accelerate's dealing is ours
        return
    shard = getattr(loader, "batch_sampler", None)
    if not isinstance(shard, BatchSamplerShard):
        raise AutoSPError(
            f"autosp: the Trainer's train dataloader ({type(loader).__name__}, batch sampler "
            f"{type(shard).__name__}) is not a map-style one that accelerate shards with a "
            "BatchSamplerShard, so the trainer cannot give every rank of a sequence-parallel "
            "group the same batches. Use a map-style dataset (one with __getitem__ and "
            "__len__; iterable datasets are not supported yet)."
        )
    shard.num_processes = size
    shard.process_index = rank
    if size == 1:
        shard.even_batches = False
