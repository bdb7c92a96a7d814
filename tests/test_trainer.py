"""``SequenceParallelTrainer``: Hugging Face Trainer steps at SP=2 equal the plain Trainer's."""

from __future__ import annotations

import pytest

from tests.multirank import RankError, run_ranks
from tests.trainer_workers import SEQ, misconfigured, train

LOSS_TOL = 1e-5
PARAM_TOL = 1e-4  # AdamW divides by sqrt(v): tiny gradient differences grow a little per step


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_trainer_matches_single_process() -> None:
    """3 optimizer steps of 2 micro-batches each (labels partly -100, gradients clipped):
    every rank logs the single-process Trainer's losses and gradient norms and ends with its
    parameters; evaluation (the plain model, each rank its share) gives the loss the plain
    Trainer gives over the same processes (which weights batches its own way: not the
    single process's)."""
    want, _ = run_ranks(2, train, False, {})
    per_rank = run_ranks(2, train, True, {})
    assert len(want["loss"]) == 3
    assert max(want["grad_norm"]) > 1.0, "clipping (max_grad_norm=1) is not exercised"
    for got in per_rank:
        assert got["wrapped"] == "SequenceParallel"
        assert got["tokens"] == want["tokens"] == 3 * 2 * 2 * SEQ
        assert len(got["loss"]) == len(want["loss"])
        for step, (a, b) in enumerate(zip(got["loss"], want["loss"], strict=True)):
            assert rel(a, b) <= LOSS_TOL, (step, got["loss"], want["loss"])
        for step, (a, b) in enumerate(zip(got["grad_norm"], want["grad_norm"], strict=True)):
            assert rel(a, b) <= PARAM_TOL, (step, got["grad_norm"], want["grad_norm"])
        errors = {
            n: ((p - want["params"][n]).norm() / want["params"][n].norm()).item()
            for n, p in got["params"].items()
        }
        assert max(errors.values()) <= PARAM_TOL, errors
        assert got["eval_loss"] == got["plain_eval_loss"]


def test_trainer_without_token_averaging() -> None:
    """``average_tokens_across_devices=False``: each rank normalises by its own count, which
    under SP is the whole batch's: still the single-process losses."""
    overrides = {"average_tokens_across_devices": False, "max_steps": 1}
    want, _ = run_ranks(2, train, False, overrides)
    for got in run_ranks(2, train, True, overrides):
        assert rel(got["loss"][0], want["loss"][0]) <= LOSS_TOL, (got["loss"], want["loss"])


def test_trainer_data_parallel() -> None:
    """dp 2 x sp 2: each DP group its own batches, gradients summed over sp and averaged over
    dp: the single-process Trainer with the two groups' batches as one (twice as large)."""
    want, _ = run_ranks(2, train, False, {"per_device_train_batch_size": 4})
    for got in run_ranks(4, train, True, {}, 2):
        assert got["tokens"] == want["tokens"]
        for a, b in zip(got["loss"], want["loss"], strict=True):
            assert rel(a, b) <= LOSS_TOL, (got["loss"], want["loss"])
        errors = [
            ((p - want["params"][n]).norm() / want["params"][n].norm()).item()
            for n, p in got["params"].items()
        ]
        assert max(errors) <= PARAM_TOL


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("parallelized", "Pass the plain model"),
        ("label_smoothing", "label_smoothing_factor"),
        ("use_cpu", "accelerate runs 1 process(es) but torch.distributed has 2 ranks"),
        ("sp_size", "sp=3 does not divide the world size 2"),
        ("mesh_dims", "no 'sp' dim"),
    ],
)
def test_misconfiguration_is_refused(case: str, message: str) -> None:
    with pytest.raises(RankError) as info:
        run_ranks(2, misconfigured, case)
    assert info.value.type_name == "AutoSPError", info.value
    assert message in info.value.message
