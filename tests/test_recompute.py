"""autosp's recomputation policy (Note [Sequence-aware recomputation])."""

from __future__ import annotations

import pytest

import autosp
from tests.multirank import run_ranks
from tests.workers import recompute_step

LAYERS = 2  # tests.models builds two-layer models


@pytest.fixture(scope="module")
def steps() -> dict[str, list[dict]]:
    return {
        policy: run_ranks(2, recompute_step, "llama", policy)
        for policy in ("off", "cheap", "layers")
    }


@pytest.mark.parametrize("policy", ["off", "cheap", "layers"])
def test_exact_and_no_collective_recomputed(steps: dict[str, list[dict]], policy: str) -> None:
    for result in steps[policy]:
        assert result["loss_rel_err"] <= 1e-5, result
        assert max(result["grad_rel_err"].values()) <= 1e-4, result["grad_rel_err"]
        assert result["backward"] == {"all_to_all": 4 * LAYERS, "grad_all_reduce": 1}


def test_less_is_saved(steps: dict[str, list[dict]]) -> None:
    """Recomputing saves less for the backward: "layers" less than "cheap", less than "off"."""
    for rank in range(2):
        off, cheap, layers = (steps[p][rank]["saved_bytes"] for p in ("off", "cheap", "layers"))
        assert layers < cheap < off, (off, cheap, layers)
    (line,) = steps["layers"][0]["plan"]
    assert line.startswith(f"layers: {LAYERS} layers recomputed"), line
    assert steps["off"][0]["plan"] == []


def test_unknown_policy() -> None:
    with pytest.raises(ValueError, match="recompute 'all' is not one of off, cheap, layers"):
        autosp.Config(recompute="all")
