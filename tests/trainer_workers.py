"""Rank functions for tests/test_trainer.py: a few Trainer steps, plain or sequence-parallel."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from tests.models import VOCAB, build

SEQ = 24
SAMPLES = 12
"""12 samples of 24 tokens: with batch 2 and 2 micro-batches per step, 3 optimizer steps per
epoch."""


class TokenDataset(torch.utils.data.Dataset):
    """Fixed random token rows; each masks a different leading span of labels (-100), so the
    micro-batches of a step hold different numbers of valid labels."""

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(i))
        labels = ids.clone()
        labels[: 3 * (i % 4)] = -100
        return {"input_ids": ids, "labels": labels}


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
"""What torchrun sets and accelerate reads to see a distributed CPU run."""


@contextlib.contextmanager
def launcher_environment() -> Iterator[None]:
    """The launcher variables of the process group the test harness started."""
    rank, world = str(dist.get_rank()), str(dist.get_world_size())
    with accelerate_environment(
        dict(zip(LAUNCHER_VARIABLES, (rank, world, rank, world), strict=True))
    ):
        yield


@contextlib.contextmanager
def single_process_environment() -> Iterator[None]:
    """No launcher variables: accelerate runs one process, as `python script.py` would."""
    with accelerate_environment({}):
        yield


@contextlib.contextmanager
def accelerate_environment(variables: dict[str, str]) -> Iterator[None]:
    """The launcher ``variables`` set (the others unset) and accelerate's process-wide state
    fresh; both restored afterwards, so later calls in the pooled process start clean."""
    from accelerate.state import AcceleratorState

    saved = {n: os.environ.pop(n, None) for n in LAUNCHER_VARIABLES}
    os.environ.update(variables)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
        AcceleratorState._reset_state(reset_partial_state=True)


def training_arguments(out: str, **overrides: Any) -> Any:
    from transformers import TrainingArguments

    options = dict(
        output_dir=out,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,  # 6 batches: 3 per rank, none padded
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=3,
        include_num_input_tokens_seen="all",
    )
    return TrainingArguments(**{**options, **overrides})


def train(
    parallel: bool, overrides: dict[str, Any], sp_size: int | None = None
) -> dict[str, Any] | None:
    """Three optimizer steps of the Trainer, then an evaluation: ``SequenceParallelTrainer``
    (``sp_size`` ranks per SP group) when ``parallel``, else the plain Trainer in a single
    process (rank 0 alone, which accelerate sees as not distributed: no launcher variables).
    Returns the logged losses and gradient norms, the final parameters and the evaluation
    loss (under ``parallel``, also the plain Trainer's on the same ranks)."""
    from transformers import Trainer

    import autosp
    from autosp.integrations.trainer import SequenceParallelTrainer

    if not parallel and dist.get_rank() != 0:
        return None
    environment = launcher_environment() if parallel else single_process_environment()
    with environment, tempfile.TemporaryDirectory() as out:
        args = training_arguments(out, **overrides)
        model = build("llama", seed=1)
        if parallel:
            config = autosp.Config(backend="eager")
            trainer = SequenceParallelTrainer(
                model=model,
                args=args,
                train_dataset=TokenDataset(),
                sp_size=sp_size,
                autosp_config=config,
            )
        else:
            trainer = Trainer(model=model, args=args, train_dataset=TokenDataset())
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        evaluation = {"eval_loss": trainer.evaluate(TokenDataset())["eval_loss"]}
        if parallel:  # the plain Trainer's evaluation over the same processes
            plain = Trainer(model=trainer.model, args=args)
            evaluation["plain_eval_loss"] = plain.evaluate(TokenDataset())["eval_loss"]
        return {
            **evaluation,
            "loss": [h["loss"] for h in logs],
            "grad_norm": [h["grad_norm"] for h in logs],
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            "wrapped": type(trainer.model_wrapped).__name__,
            "tokens": trainer.state.num_input_tokens_seen,
        }


def misconfigured(case: str) -> None:
    """Build a ``SequenceParallelTrainer`` in a way that cannot work (expected to raise)."""
    from torch.distributed.device_mesh import init_device_mesh

    import autosp
    from autosp.integrations.trainer import SequenceParallelTrainer

    with launcher_environment(), tempfile.TemporaryDirectory() as out:
        model = build("llama", seed=1)
        options: dict[str, Any] = {}
        args = training_arguments(out)
        if case == "parallelized":
            model = autosp.parallelize(model, backend="eager")
        elif case == "label_smoothing":
            args = training_arguments(out, label_smoothing_factor=0.1)
        elif case == "use_cpu":
            args = training_arguments(out, use_cpu=False)
        elif case == "sp_size":
            options["sp_size"] = 3
        elif case == "mesh_dims":
            options["mesh"] = init_device_mesh(
                "cpu", (dist.get_world_size(),), mesh_dim_names=("tp",)
            )
        SequenceParallelTrainer(model=model, args=args, train_dataset=TokenDataset(), **options)
