"""Ring attention alone: forward and backward equal full attention; the zigzag layout
balances causal work."""

from __future__ import annotations

import pytest

from autosp.compiler.attention.load_balance import contiguous_chunks, zigzag_chunks
from autosp.compiler.attention.ring import ALL, _zigzag_block
from tests.multirank import run_ranks
from tests.workers import ring_vs_full

TOL = 1e-5  # fp32 blockwise softmax merged through log-sum-exp

# (seq, heads, kv_heads, causal): divisible and odd lengths, grouped-query heads, a length
# shorter than the ring so a whole rank is padding.
CASES = [(12, 4, 4, True), (13, 4, 2, True), (13, 2, 1, False), (16, 3, 3, False), (2, 2, 2, True)]


@pytest.mark.parametrize("use_kernel", [True, False], ids=["cpu_flash_kernel", "fp32_math"])
@pytest.mark.parametrize("balance", [True, False], ids=["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_attention_matches_full_attention(world: int, balance: bool, use_kernel: bool) -> None:
    for rank, results in enumerate(run_ranks(world, ring_vs_full, CASES, use_kernel, balance)):
        for case, errors in zip(CASES, results, strict=True):
            assert max(errors.values()) <= TOL, (rank, case, errors)


def _chunks(rows: slice, held: tuple[int, int]) -> list[int]:
    """The global chunks a row slice of a two-chunk block covers."""
    return list(held) if rows == ALL else [held[0] if rows.start == 0 else held[1]]


@pytest.mark.parametrize("world", [2, 3, 4, 5, 8])
def test_zigzag_covers_causal_chunk_pairs_once_with_equal_work(world: int) -> None:
    rows = 2
    seen: list[tuple[int, int]] = []
    work = []
    for rank in range(world):
        cost = 0.0
        for step in range(world):
            src = (rank - step) % world
            block = _zigzag_block(rank, src, rows)
            q = _chunks(block.q, zigzag_chunks(rank, world))
            kv = _chunks(block.kv, zigzag_chunks(src, world))
            pairs = [(a, b) for a in q for b in kv if not (block.diagonal and b > a)]
            seen += pairs
            cost += sum(0.5 if a == b else 1.0 for a, b in pairs)
        work.append(cost)
    causal = [(a, b) for a in range(2 * world) for b in range(a + 1)]
    assert sorted(seen) == causal  # every causal chunk pair exactly once, nothing else
    assert len(set(work)) == 1, work  # every rank does the same work
    assert sorted(g for r in range(world) for g in zigzag_chunks(r, world)) == list(
        range(2 * world)
    )
    assert sorted(g for r in range(world) for g in contiguous_chunks(r, world)) == list(
        range(2 * world)
    )
