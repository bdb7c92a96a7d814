"""Token mixers beyond plain attention: attention with sinks keeps its sharded strategies
(Ulysses at SP=2, ring at SP=3); short convolutions and linear-attention scans run exactly,
gathered with a warning naming the op."""

from __future__ import annotations

import pytest

from tests.multirank import run_ranks
from tests.workers import table_parity

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
LOGITS_TOL = 1e-5


def check_parity(result: dict) -> None:
    assert result["loss_rel_err"] <= LOSS_TOL, result
    worst = max(result["grad_rel_err"].items(), key=lambda kv: kv[1])
    assert worst[1] <= GRAD_TOL, worst
    assert result["logits_max_err"] <= LOGITS_TOL, result


@pytest.mark.parametrize(
    ("world", "attention", "families", "strategy"),
    [
        (2, "auto", ["sink_gpt", "gpt_oss"], " ulysses ("),
        (3, "auto", ["sink_gpt", "gpt_oss"], " ring ("),
        (4, "hybrid", ["sink_gpt"], " hybrid ("),
    ],
)
def test_attention_sinks(world: int, attention: str, families: list[str], strategy: str) -> None:
    """Sinks under each strategy: Ulysses takes its heads' sinks, ring joins them to the
    log-sum-exp after the last block, hybrid does both."""
    options = {"attention": attention}
    per_rank = run_ranks(world, table_parity, "MIXER_FAMILIES", families, [(2, 13)], options)
    for results in per_rank:
        for name, (result,) in results.items():
            check_parity(result)
            assert result["gathered_ops"] == [], (name, result["gathered_ops"])
            assert result["attention"], name
            for line in result["attention"]:
                assert strategy in line and "sinks" in line, (name, line)


@pytest.mark.parametrize("name", ["lfm2", "scan_gpt"])
def test_hybrid_mixers_run_exactly(name: str) -> None:
    per_rank = run_ranks(2, table_parity, "MIXER_FAMILIES", [name], [(2, 13)], {})
    for results in per_rank:
        for name, (result,) in results.items():
            check_parity(result)
            for op in result["gathered_ops"]:
                assert any(f"'{op}'" in w for w in result["warnings"]), (name, op)
