"""Contract 5: several optimizer steps match the single-process run step by step."""

from __future__ import annotations

import pytest
import torch

from tests.multirank import run_ranks
from tests.workers import mesh_parity, replica_params, train_steps

LOSS_TOL = 1e-5
PARAM_TOL = 1e-4  # AdamW divides by sqrt(v): tiny gradient differences grow a little per step


def test_adamw_steps_match_single_process() -> None:
    per_rank = run_ranks(2, train_steps, "llama", 5, 2, 14)
    for history in per_rank:
        assert len(history) == 5
        for step, record in enumerate(history):
            rel = abs(record["loss"] - record["ref"]) / abs(record["ref"])
            assert rel <= LOSS_TOL, (step, record)
            assert record["param_rel_err"] <= PARAM_TOL, (step, record)
        assert history[-1]["loss"] < history[0]["loss"], "training did not reduce the loss"
    assert [r["loss"] for r in per_rank[0]] == [r["loss"] for r in per_rank[1]]


def test_device_mesh_group() -> None:
    """``group=`` accepts a 1-D DeviceMesh."""
    for results in run_ranks(2, mesh_parity):
        (result,) = results
        assert result["loss_rel_err"] <= LOSS_TOL
        assert max(result["grad_rel_err"].values()) <= PARAM_TOL


@pytest.mark.parametrize(
    ("micro_batches", "deferred"),
    [(1, False), (2, False), (2, True)],
    ids=["step", "acc", "no_sync"],
)
def test_replicas_stay_identical(micro_batches: int, deferred: bool) -> None:
    """Note [Identical replicas]: the ranks' parameters are the same bits after AdamW steps
    (a gradient written as local + (sum - local) rounds differently per rank)."""
    first, second = run_ranks(2, replica_params, micro_batches, deferred)
    differing = [name for name in first if not torch.equal(first[name], second[name])]
    assert not differing, differing
