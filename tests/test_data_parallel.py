"""Data parallel beside sequence parallel on dp 2 x sp 2 gloo ranks: autosp's own reduction and
DDP, against one process on the concatenated batch (Note [Layout of the mesh])."""

from __future__ import annotations

import pytest

from tests import dp_workers
from tests.multirank import run_ranks

WORLD = 4  # dp 2 x sp 2
LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
PARAM_TOL = 1e-4  # AdamW divides by sqrt(v): tiny gradient differences grow a little per step
LAYERS = 2  # tests.models builds two-layer models


@pytest.mark.parametrize("mode", ["native", "ddp"])
def test_adamw_steps_match_single_process(mode: str) -> None:
    """Five AdamW steps match one process on both sequences, step by step (the gradients are
    compared at the first step, where the parameters are still the same); one reduction per
    backward: autosp's bucket (native) or DDP's hook (ddp), never both. Llama has no biases:
    a key bias's gradient is rounding noise that AdamW would turn into whole steps."""
    per_rank = run_ranks(WORLD, dp_workers.train_steps, mode, "llama", 5)
    for history in per_rank:
        assert history[0]["grad_rel_err"] <= GRAD_TOL, history[0]
        for step, record in enumerate(history):
            assert abs(record["loss"] - record["ref"]) <= LOSS_TOL * abs(record["ref"]), record
            assert record["param_rel_err"] <= PARAM_TOL, (step, record)
            if mode == "native":
                assert record["backward"] == {"all_to_all": 4 * LAYERS, "grad_all_reduce": 1}
            else:
                assert "grad_all_reduce" not in record["backward"], record
                assert record["backward"]["ddp_all_reduce"] >= 1, record
        assert history[-1]["loss"] < history[0]["loss"], "training did not reduce the loss"
    assert len({tuple(r["loss"] for r in history) for history in per_rank}) == 1


def test_mesh_from_sizes() -> None:
    """``sp_size=2`` builds the same layout as ``mesh=``."""
    for history in run_ranks(WORLD, dp_workers.train_steps, "sizes", "plain_gpt", 1):
        (record,) = history
        assert abs(record["loss"] - record["ref"]) <= LOSS_TOL * abs(record["ref"]), record
        assert record["grad_rel_err"] <= GRAD_TOL, record


@pytest.mark.parametrize(("mode", "deferred"), [("native", False), ("native", True), ("ddp", True)])
def test_accumulation_and_clipping(mode: str, deferred: bool) -> None:
    """Two micro-batches per DP group, then clip_grad_norm_: the norm and the clipped
    gradients of one process on all four sequences. Under no_sync() the first backward
    reduces nothing and the second reduces once."""
    for result in run_ranks(WORLD, dp_workers.accumulate, mode, deferred):
        assert abs(result["norm"] - result["ref_norm"]) <= GRAD_TOL * result["ref_norm"], result
        assert result["norm"] > 0.5, "the clip must act for the test to check it"
        assert result["grad_rel_err"] <= GRAD_TOL, result
        first, second = result["backward"]
        key = "ddp_all_reduce" if mode == "ddp" else "grad_all_reduce"
        assert (key in first) != deferred, result
        assert second.get(key, 0) >= 1, result
        if mode == "ddp":
            assert "grad_all_reduce" not in first | second, result
        else:
            assert second[key] == 1, result


def test_gradients_discarded_under_no_sync() -> None:
    for found in run_ranks(WORLD, dp_workers.discard_under_no_sync):
        assert found["grad_rel_err"] <= GRAD_TOL, found
        assert "changed in place before it was reduced" in found["in_place"], found


def test_checkpoints_across_layouts() -> None:
    """State dicts keep the plain model's keys (``module.`` + them under DDP, as DDP around the
    plain model) and load across layouts: SP <-> plain, DDP(SP) -> DDP(SP), DDP(plain), SP."""
    for found in run_ranks(WORLD, dp_workers.checkpoints):
        assert found == {key: True for key in found} and len(found) == 9, found


def test_errors_say_what_to_do() -> None:
    for messages in run_ranks(WORLD, dp_workers.errors):
        assert "sp=3 does not divide the world size 4" in messages["sp_size"], messages
        assert "dp=3 x sp=2 = 6 ranks, but the world has 4" in messages["mesh_sizes"]
        assert "pass one of them" in messages["two_layouts"]
        assert "dims ('dp', 'sp')" in messages["mesh_dims"]
        assert "parallelize the inner model" in messages["ddp_inside"]
        assert "wrap_ddp" in messages["ddp_inside"]
        assert "DDP averages" in messages["plain_ddp_outside"]
        assert "wrap_ddp(parallel_model)" in messages["plain_ddp_outside"]
        assert "runs over ranks [0, 1]" in messages["ddp_over_sp"] or (
            "runs over ranks [2, 3]" in messages["ddp_over_sp"]
        )
        assert "process_group=model.layout.grads" in messages["ddp_over_sp"]
        assert "takes the result of autosp.parallelize()" in messages["wrap_plain"]


@pytest.mark.parametrize(
    ("mode", "dp_mean"),
    [("native", "tokens"), ("native", "groups"), ("ddp", "tokens"), ("fsdp", "tokens"),
     ("sharded", "tokens")],
)  # fmt: skip
def test_token_mean_over_data_parallel_groups(mode: str, dp_mean: str) -> None:
    """DP groups with 11 and 1 labelled tokens: under dp_mean="tokens" every rank returns the
    mean over all 12 and the engines' gradient is one process's on the batch; "groups"
    keeps each group's mean (DDP's weighting). The two differ by ~10% here."""
    per_rank = run_ranks(WORLD, dp_workers.unequal_tokens, mode, dp_mean)
    for rank, result in enumerate(per_rank):
        assert result["grad_rel_err"] <= GRAD_TOL, (rank, result)
        if dp_mean == "tokens":
            assert abs(result["loss"] - result["ref"]) <= LOSS_TOL * result["ref"], result
    if dp_mean == "groups":  # each group's own loss; their mean is the reference
        losses = [r["loss"] for r in per_rank]
        assert abs(sum(losses) / WORLD - per_rank[0]["ref"]) <= LOSS_TOL * per_rank[0]["ref"]
        assert abs(losses[0] - losses[2]) > 0.01 * losses[0], losses
