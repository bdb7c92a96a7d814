"""Exactly the Ulysses minimum: 4 all-to-alls per attention layer each way, one loss
all-reduce, one gradient bucket; nothing else."""

from __future__ import annotations

import pytest

from tests.multirank import run_ranks
from tests.workers import count_step

LAYERS = 2  # tests.models builds two-layer models


@pytest.mark.parametrize("checkpointed", [False, True])
def test_collective_counts_llama(checkpointed: bool) -> None:
    """With the model's own checkpointing too: a recomputed region never runs its
    collectives again (autosp's collectives carry no recompute tag)."""
    for counts in run_ranks(2, count_step, "llama", checkpointed):
        for step in counts:
            assert step["forward"] == {"all_to_all": 4 * LAYERS, "all_reduce_loss": 1}
            assert step["backward"] == {"all_to_all": 4 * LAYERS, "grad_all_reduce": 1}
