"""Configurations autosp cannot run exactly fail with errors that name cause and fix."""

from __future__ import annotations

import pytest
import torch

import autosp
from tests.models import PlainGPT
from tests.multirank import RankError, run_ranks
from tests.workers import call_model, call_with_rank_batch, fallback_parity


def test_requires_initialised_process_group() -> None:
    with pytest.raises(autosp.AutoSPError, match="torch.distributed is not initialised"):
        autosp.parallelize(PlainGPT())


def test_unknown_options() -> None:
    with pytest.raises(ValueError, match="backend 'tvm' is not one of inductor, aot_eager"):
        autosp.Config(backend="tvm")
    with pytest.raises(ValueError, match="attention 'flash' is not one of auto, ulysses, ring"):
        autosp.Config(attention="flash")


def test_different_batches_on_ranks() -> None:
    with pytest.raises(RankError) as info:
        run_ranks(2, call_with_rank_batch, True)
    assert info.value.type_name == "InputMismatchError"
    assert "received a different batch than rank 0 (inputs input_ids, labels)" in (
        info.value.message
    )


def test_same_batches_pass_the_check() -> None:
    run_ranks(2, call_with_rank_batch, False)


@pytest.mark.parametrize(
    ("factory", "kwargs", "options", "message"),
    [
        ("NoAttentionLM", {}, {}, "no attention found in the captured graph"),
        (
            "PlainGPT",
            {"heads": 2},
            {"attention": "ulysses"},
            "attention='ulysses' needs the query heads (2) divisible by the sequence-parallel "
            "degree 4. Use attention='ring' or 'auto', or a degree that divides 2.",
        ),
        ("NoLossGPT", {}, {}, "labels were given but the model returned no loss"),
    ],
)
def test_unsupported_models(factory: str, kwargs: dict, options: dict, message: str) -> None:
    with pytest.raises(RankError) as info:
        run_ranks(4 if "heads" in kwargs else 2, call_model, factory, kwargs, options)
    assert info.value.type_name == "AutoSPError"
    assert message in info.value.message


def test_gather_sequence_rejects_other_tensors() -> None:
    with pytest.raises(autosp.AutoSPError, match="not a sequence-sharded output"):
        autosp.gather_sequence(torch.zeros(2, 3))


def test_unsupported_op_is_gathered_with_a_warning() -> None:
    """A max over the sequence has no sharded rule: gathered, named in a warning, still exact."""
    for result in run_ranks(2, fallback_parity):
        assert result["loss_rel_err"] <= 1e-5
        assert max(result["grad_rel_err"].values()) <= 1e-4
        assert result["gathered_ops"] == ["amax"]
        (warning,) = result["warnings"]
        assert warning.startswith("autosp: op 'amax' (")
        assert "reduction along the sequence dimension" in warning
        assert "its inputs are gathered to full length on every rank" in warning
