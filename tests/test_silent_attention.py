"""Attention and random ops that once gave wrong numbers without a warning, at 2 ranks (and a
hybrid case at 4): now exact, or exact in distribution for random ops."""

from __future__ import annotations

import pytest

from tests.multirank import run_ranks
from tests.silent_workers import attention_dropout_check, dropout_check, silent_parity

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
LOGITS_TOL = 1e-5


def _assert_parity(per_rank: list[list[dict]], gathered: list[str] | None = None) -> None:
    for rank, results in enumerate(per_rank):
        for result in results:
            case = result["case"]
            assert result["loss_rel_err"] <= LOSS_TOL, (rank, case, result)
            worst = max(result["grad_rel_err"].items(), key=lambda kv: kv[1])
            assert worst[1] <= GRAD_TOL, (rank, case, worst)
            assert result["logits_max_err"] <= LOGITS_TOL, (rank, case, result)
            if gathered is not None:
                assert result["gathered_ops"] == gathered, result["gathered_ops"]


@pytest.mark.parametrize("attention", ["ulysses", "ring"])
@pytest.mark.parametrize("extra", [None, "memory"])
def test_cross_attention_keys_not_sequence_long(attention: str, extra: str | None) -> None:
    """Keys/values of learned latents or of encoder states (7 rows) stay whole: each rank's
    queries attend to all of them."""
    kwargs = {"latents": 0 if extra else 5}
    per_rank = run_ranks(
        2, silent_parity, "CrossAttentionLM", kwargs, {"attention": attention}, [(2, 13)], extra
    )
    _assert_parity(per_rank, [])


@pytest.mark.parametrize(
    ("world", "attention", "dims"),
    [(2, "ulysses", 4), (2, "ring", 4), (2, "ring", 3), (4, "hybrid", 4)],
)
def test_learned_bias_gradient(world: int, attention: str, dims: int) -> None:
    """A float mask computed from trained slopes gets its gradient under every strategy (and
    a 3-D mask, which SDPA broadcasts, runs under ring)."""
    per_rank = run_ranks(
        world, silent_parity, "BiasLM", {"dims": dims}, {"attention": attention}, [(2, 13)]
    )
    _assert_parity(per_rank, [])


def test_dropout_masks_independent_across_ranks() -> None:
    """Each rank draws its own dropout mask for its rows; the backward uses the same mask
    (parity with one process run with the drawn mask); the global generators stay in step."""
    per_rank = run_ranks(2, dropout_check, 2, 13, {})
    for rank, result in enumerate(per_rank):
        assert not result["blocks_equal"], (rank, "rank blocks drew the same mask")
        assert 0.35 < result["kept"] < 0.65, result
        assert result["loss_rel_err"] <= LOSS_TOL, (rank, result)
        assert max(result["grad_rel_err"].values()) <= GRAD_TOL, (rank, result)
        assert result["rng_in_step"], "ranks' generators diverged"
        assert result["gathered_ops"] == [], result


def test_attention_dropout_independent_across_head_shards() -> None:
    """Under Ulysses each rank computes other heads: their dropout masks must differ."""
    per_rank = run_ranks(2, attention_dropout_check, 1, 13, 2, {"attention": "ulysses"})
    for result in per_rank:
        assert result["heads_equal"] == [False], result
        assert 0.35 < result["kept"] < 0.65, result
        assert result["rng_in_step"], "ranks' generators diverged"
        assert result["gathered_ops"] == [], result
        assert all("ulysses" in line for line in result["attention"]), result


@pytest.mark.parametrize(
    ("factory", "extra"), [("PrefixLM", "prefix"), ("KeepOnesLM", "documents")]
)
def test_mask_inputs_guarded(factory: str, extra: str) -> None:
    """A mask read from a non-sequence input (a prefix length) or from an integer input with
    values other than 0 / 1 is not taken from the first call's values: the second call (other
    values, same graph) is exact too."""
    per_rank = run_ranks(2, silent_parity, factory, {}, {}, [(2, 13), (2, 11)], extra)
    _assert_parity(per_rank)
