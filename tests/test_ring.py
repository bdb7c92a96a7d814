"""Ring attention alone: forward and backward equal full attention."""

from __future__ import annotations

import pytest

from tests.multirank import run_ranks
from tests.workers import ring_vs_full

TOL = 1e-5  # fp32 blockwise softmax merged through log-sum-exp

# (seq, heads, kv_heads, causal): divisible and odd lengths, grouped-query heads, a length
# shorter than the ring so a whole rank is padding.
CASES = [(12, 4, 4, True), (13, 4, 2, True), (13, 2, 1, False), (16, 3, 3, False), (2, 2, 2, True)]


@pytest.mark.parametrize("use_kernel", [True, False], ids=["cpu_flash_kernel", "fp32_math"])
@pytest.mark.parametrize("world", [2, 3])
def test_ring_attention_matches_full_attention(world: int, use_kernel: bool) -> None:
    for rank, results in enumerate(run_ranks(world, ring_vs_full, CASES, use_kernel)):
        for case, errors in zip(CASES, results, strict=True):
            assert max(errors.values()) <= TOL, (rank, case, errors)
