"""More architectures, masks and layouts reach parity with no code change (SP=2, batch 1)."""

from __future__ import annotations

import pytest

from tests.multirank import run_ranks
from tests.workers import family_parity

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
LOGITS_TOL = 1e-5

GROUPS = {
    "unseen_architectures": ["olmo2", "qwen3", "granite", "phi3", "gpt_neox_partial_rotary"],
    "masks_and_layouts": [
        "mistral_sliding_window",
        "llama_packed",
        "bert_padding",
        "sequence_first",
    ],
    "attention_forms": ["llama_eager", "gemma2_softcap"],
}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_family_parity(group: str) -> None:
    per_rank = run_ranks(2, family_parity, GROUPS[group], 13)
    for rank, results in enumerate(per_rank):
        for name, result in results.items():
            assert result["loss_rel_err"] <= LOSS_TOL, (rank, name, result)
            worst = max(result["grad_rel_err"].items(), key=lambda kv: kv[1])
            assert worst[1] <= GRAD_TOL, (rank, name, worst)
            assert result["logits_max_err"] <= LOGITS_TOL, (rank, name, result)
            assert result["gathered_ops"] == [], (name, result["gathered_ops"])
