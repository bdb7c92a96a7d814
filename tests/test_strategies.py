"""Head counts the degree does not divide: key/value head replication and ring attention."""

from __future__ import annotations

import pytest

from tests.multirank import run_ranks
from tests.workers import spec_parity

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
LOGITS_TOL = 1e-5
CASES = [(2, 13)]  # batch 2, a length no degree here divides

SPECS = {
    # 6 heads at SP=4: hybrid (Ulysses over 2, ring over 2) chosen automatically; or ring.
    "6_heads_sp4_hybrid": (
        4,
        "PlainGPT",
        {"dim": 48, "heads": 6},
        {},
        "hybrid (6 heads: Ulysses over 2 ranks, ring over 2",
    ),
    "6_heads_sp4_ring": (
        4,
        "PlainGPT",
        {"dim": 48, "heads": 6},
        {"attention": "ring"},
        "ring (6 heads not divisible",
    ),
    # GQA with 2 kv heads and 6 query heads under hybrid at SP=4.
    "gqa_6_heads_sp4_hybrid": (
        4,
        "PlainGPT",
        {"dim": 48, "heads": 6, "kv_heads": 2},
        {"attention": "hybrid"},
        "hybrid (6 heads: Ulysses over 2 ranks",
    ),
    # 6 heads at SP=3: Ulysses.
    "6_heads_sp3_ulysses": (3, "PlainGPT", {"dim": 48, "heads": 6}, {}, "ulysses (6 heads, 6 kv"),
    # Multi-query attention (1 key/value head) at SP=4: each kv head sent to 4 ranks.
    "mqa_sp4": (4, "PlainGPT", {"heads": 4, "kv_heads": 1}, {}, "each kv head sent to 4 ranks"),
    # 2 key/value heads at SP=4.
    "gqa_sp4": (4, "PlainGPT", {"heads": 8, "kv_heads": 2}, {}, "each kv head sent to 2 ranks"),
    # Ring requested for a model Ulysses could run; 4 heads at SP=3 pick ring by themselves.
    "ring_requested_sp2": (2, "PlainGPT", {}, {"attention": "ring"}, "ring (requested"),
    "4_heads_sp3_ring": (3, "PlainGPT", {}, {}, "ring (4 heads not divisible by 3"),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_strategy_parity(name: str) -> None:
    world, factory, kwargs, options, expected = SPECS[name]
    per_rank = run_ranks(world, spec_parity, factory, kwargs, options, CASES)
    for rank, results in enumerate(per_rank):
        for result in results:
            case = result["case"]
            assert result["loss_rel_err"] <= LOSS_TOL, (rank, case, result)
            assert max(result["grad_rel_err"].values()) <= GRAD_TOL, (rank, case, result)
            assert result["logits_max_err"] <= LOGITS_TOL, (rank, case, result)
            assert result["gathered_ops"] == []
            assert all(expected in line for line in result["attention"]), result["attention"]
