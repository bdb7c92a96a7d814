"""Ranks of one group that get different batches, exit or stop responding fail within seconds
with an autosp error on every surviving rank, instead of hanging or mixing data."""

from __future__ import annotations

import torch

from tests.fault_workers import check_agreement, stall_check, train
from tests.multirank import rank_outcomes

FIX = "Every rank of the group must get the same full-length batch"


def _errors(outcomes: list) -> list[dict]:
    assert all(o.status == "ok" and "error" in o.value for o in outcomes), outcomes
    return [o.value for o in outcomes]


def test_different_lengths_after_the_first_step() -> None:
    # Today: rank 0 is aborted by gloo ("Received data size doesn't match expected size") and
    # rank 1 reads "Connection reset by peer"; on NCCL the ranks hang or mix data.
    batches = [[(12, 0), (12, 0)], [(12, 1), (14, 1)], [(12, 2), (12, 2)]]
    for result in _errors(rank_outcomes(2, train, batches, timeout=180)):
        assert result["step"] == 1 and result["error"] == "InputMismatchError", result
        message = result["message"]
        assert (
            "rank 1 of the sequence-parallel group received a different batch than rank 0 "
            "(inputs input_ids, labels) at call 2" in message
        )
        assert "input_ids: int64 (1, 12) on rank 0, int64 (1, 14) on rank 1" in message
        assert FIX in message
        assert result["seconds"] < 10


def test_different_tokens_after_the_first_step_fail_one_step_late() -> None:
    # Today: both ranks report the same, wrong loss and train on.
    batches = [[(12, 0), (12, 0)], [(12, 1), (12, 5)], [(12, 2), (12, 2)]]
    for result in _errors(rank_outcomes(2, train, batches, timeout=180)):
        assert result["step"] == 2 and result["error"] == "InputMismatchError", result
        assert (
            "rank 1 of the sequence-parallel group received a different batch than rank 0 "
            "(inputs input_ids, labels) at call 2, found one call late (same shapes, "
            "different values)" in result["message"]
        )


def test_same_batches_train() -> None:
    batches = [[(12, s), (12, s)] for s in range(3)] + [[(9, 7), (9, 7)]]
    outcomes = rank_outcomes(2, train, batches, timeout=180)
    assert [o.status for o in outcomes] == ["ok", "ok"], outcomes
    assert outcomes[0].value == outcomes[1].value and "losses" in outcomes[0].value


def test_a_rank_that_exits_mid_step() -> None:
    # Rank 1 exits between its forward and backward; rank 0 meets it in the backward. Today:
    # a bare gloo RuntimeError ("Connection reset by peer") that names no group or cause.
    batches = [[(12, s), (12, s)] for s in range(3)]
    outcome = rank_outcomes(2, train, batches, (1, 1, "exit"), timeout=180, wait_for=[0])[0]
    (result,) = _errors([outcome])
    assert result["step"] == 1 and result["error"] == "CollectiveError", result
    message = result["message"]
    assert "over the sequence-parallel group (global ranks [0, 1]; this is rank 0) failed" in (
        message
    )
    assert "Another rank of the group has most likely exited or stopped responding" in message
    assert result["seconds"] < 30


def test_a_rank_that_stops_responding_times_out() -> None:
    outcome = rank_outcomes(2, stall_check, timeout=60, pg_timeout=3, wait_for=[0])[0]
    assert outcome.status == "ok", outcome
    error, message, seconds = outcome.value
    assert error == "CollectiveError", message
    assert "the input check over the sequence-parallel group" in message
    assert "init_process_group(timeout=...)" in message
    assert 2 < seconds < 15


def _ids(seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (1, seq), generator=torch.Generator().manual_seed(seed))


def test_input_check_names_what_differs() -> None:
    same = {"input_ids": _ids(8)}
    masked = {"input_ids": _ids(8), "attention_mask": torch.ones(1, 8, dtype=torch.bool)}
    halves = {"inputs_embeds": torch.full((1, 8, 4), 0.5, dtype=torch.bfloat16)}
    other = {"inputs_embeds": torch.full((1, 8, 4), 0.25, dtype=torch.bfloat16)}
    cases = [
        ([[same, same]] * 3, None),
        (
            [[same, same], [masked, same]],
            "(inputs attention_mask) at call 2 (attention_mask: bool (1, 8) on rank 0, absent on "
            "rank 1)",
        ),
        (
            [[halves, other]],
            "(inputs inputs_embeds) at call 1 (same shapes, different values)",
        ),
    ]
    results = rank_outcomes(2, check_agreement, [c for c, _ in cases], timeout=60)
    for outcome in results:
        assert outcome.status == "ok", outcome
        for message, (_, expected) in zip(outcome.value, cases, strict=True):
            assert (message is None) if expected is None else expected in message, message
