"""More architectures, masks and layouts reach parity with no code change (batch 1): at SP=2
(Ulysses), at SP=3, which none of the 4-head models divides (ring attention), and 6 heads at
SP=4 (hybrid)."""

from __future__ import annotations

import pytest

from tests.multirank import run_ranks
from tests.workers import family_parity

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
LOGITS_TOL = 1e-5

# group -> (degree, families, what every attention plan line says)
GROUPS = {
    # SP=2: Ulysses
    "unseen_architectures": (
        2,
        ["olmo2", "qwen3", "granite", "phi3", "gpt_neox_partial_rotary"],
        " ulysses (",
    ),
    "masks_and_layouts": (
        2,
        [
            "mistral_sliding_window",
            "mistral_window_10",
            "llama_packed",
            "bert_padding",
            "sequence_first",
        ],
        " ulysses (",
    ),
    # ALiBi (Falcon): a per-head float bias, kept as the model's dense mask.
    "alibi": (2, ["falcon_alibi"], " ulysses ("),
    "attention_forms": (2, ["llama_eager", "gemma2_softcap"], " ulysses ("),
    # The matrix at a degree that divides no model's heads: ring, masks and soft-caps.
    "sp3_decoders": (
        3,
        ["llama", "gpt2", "phi3", "gpt_neox_partial_rotary", "llama_eager"],
        " ring (4 heads not divisible by 3",
    ),
    "sp3_masks": (
        3,
        [
            "mistral_sliding_window",
            "gemma2_softcap",
            "llama_packed",
            "bert_padding",
            "sequence_first",
            "falcon_alibi",
        ],
        " ring (4 heads not divisible by 3",
    ),
    # 6 heads at SP=4 with a sliding-window mask: Ulysses over 2 ranks, ring (with the mask) over 2.
    "sp4_hybrid_window": (4, ["mistral_window_6_heads"], " hybrid (6 heads: Ulysses over 2"),
}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_family_parity(group: str) -> None:
    world, names, strategy = GROUPS[group]
    per_rank = run_ranks(world, family_parity, names, 13)
    for rank, results in enumerate(per_rank):
        for name, result in results.items():
            assert result["loss_rel_err"] <= LOSS_TOL, (rank, name, result)
            worst = max(result["grad_rel_err"].items(), key=lambda kv: kv[1])
            assert worst[1] <= GRAD_TOL, (rank, name, worst)
            assert result["logits_max_err"] <= LOGITS_TOL, (rank, name, result)
            assert result["gathered_ops"] == [], (name, result["gathered_ops"])
            assert all(strategy in line for line in result["attention"]), result["attention"]
            # Every mask but ALiBi's is causal or structured: none is built S x S.
            dense = any("dense mask" in line for line in result["attention"])
            assert dense == (name == "falcon_alibi"), result["attention"]
