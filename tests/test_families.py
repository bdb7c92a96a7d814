"""More architectures, masks and layouts reach parity with no code change (batch 1): at SP=2
(Ulysses), and at SP=3, which none of the 4-head models divides (ring attention)."""

from __future__ import annotations

import pytest

from tests.multirank import run_ranks
from tests.workers import family_parity

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
LOGITS_TOL = 1e-5

GROUPS = {
    # SP=2
    "unseen_architectures": ["olmo2", "qwen3", "granite", "phi3", "gpt_neox_partial_rotary"],
    "masks_and_layouts": [
        "mistral_sliding_window",
        "llama_packed",
        "bert_padding",
        "sequence_first",
    ],
    "attention_forms": ["llama_eager", "gemma2_softcap"],
}
SP3 = {
    # The matrix at a degree that divides no model's heads: ring, masks and soft-caps.
    "sp3_decoders": ["llama", "gpt2", "phi3", "gpt_neox_partial_rotary", "llama_eager"],
    "sp3_masks": [
        "mistral_sliding_window",
        "gemma2_softcap",
        "llama_packed",
        "bert_padding",
        "sequence_first",
    ],
}


@pytest.mark.parametrize("group", sorted(GROUPS) + sorted(SP3))
def test_family_parity(group: str) -> None:
    world = 3 if group in SP3 else 2
    per_rank = run_ranks(world, family_parity, {**GROUPS, **SP3}[group], 13)
    for rank, results in enumerate(per_rank):
        for name, result in results.items():
            assert result["loss_rel_err"] <= LOSS_TOL, (rank, name, result)
            worst = max(result["grad_rel_err"].items(), key=lambda kv: kv[1])
            assert worst[1] <= GRAD_TOL, (rank, name, worst)
            assert result["logits_max_err"] <= LOGITS_TOL, (rank, name, result)
            assert result["gathered_ops"] == [], (name, result["gathered_ops"])
            if world == 3:
                assert all(" ring (4 heads" in line for line in result["attention"]), result
