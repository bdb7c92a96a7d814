"""Ring attention alone: forward and backward equal full attention; the zigzag layout
balances causal work."""

from __future__ import annotations

import pytest

from autosp.compiler.attention.load_balance import contiguous_chunks, zigzag_chunks
from autosp.compiler.attention.ring import ALL, _zigzag_block
from tests.multirank import run_ranks
from tests.workers import ring_vs_full

TOL = 1e-5  # fp32 blockwise softmax merged through log-sum-exp

# (seq, heads, kv_heads, causal, mask, soft-cap): divisible and odd lengths, grouped-query
# heads, a length shorter than the ring so a whole rank is padding; a sliding-window mask
# (hides whole blocks), a two-document additive mask, Gemma-2's soft-cap.
CASES = [
    (12, 4, 4, True, None, 0.0),
    (13, 4, 2, True, None, 0.0),
    (13, 2, 1, False, None, 0.0),
    (16, 3, 3, False, None, 0.0),
    (2, 2, 2, True, None, 0.0),
    (17, 4, 2, False, "window", 0.0),
    (15, 2, 2, False, "documents", 0.0),
    (14, 4, 2, True, None, 2.0),
    (13, 2, 2, False, "window", 1.5),
]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_attention_matches_full_attention(world: int) -> None:
    """Every case on the CPU flash kernel and in fp32 math, zigzag-balanced and contiguous."""
    for rank, results in enumerate(run_ranks(world, ring_vs_full, CASES)):
        assert len(results) == 4 * len(CASES)
        for key, errors in results.items():
            assert max(errors.values()) <= TOL, (rank, key, errors)


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
