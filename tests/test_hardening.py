"""Cases a new user meets first: several models in one process, outputs that are tuples or
a bare loss, arguments spelled any way the schema allows, Hugging Face defaults."""

from __future__ import annotations

from tests.hardening_workers import (
    hf_default_cache,
    output_forms,
    recompile_limit,
    several_models,
)
from tests.multirank import run_ranks

LOSS_TOL = 1e-5  # fp32 loss: sums reordered across ranks
GRAD_TOL = 1e-4  # fp32 gradients: reductions reordered


def _assert_exact(result: dict) -> None:
    assert result["loss_rel_err"] <= LOSS_TOL, result
    assert result["grad_rel_err"] <= GRAD_TOL, result
    assert result["gathered_ops"] == [], result
    assert result["warnings"] == [], result


def test_several_models_in_one_process() -> None:
    """A second model whose attention scale differs compiled against a graph node of the
    first compilation ("does not belong to this Graph")."""
    for results in run_ranks(2, several_models):
        assert len(results) == 4
        for result in results:
            _assert_exact(result)


def test_output_forms_and_binary_max() -> None:
    """``(loss, logits)`` and a bare loss were refused ("returned no loss"); binary
    ``torch.max`` was read as a reduction over ``dim=<tensor>`` (TypeError)."""
    for results in run_ranks(2, output_forms):
        assert sorted(results) == ["ClampedGPT", "LossOnlyGPT", "TupleGPT"]
        for result in results.values():
            _assert_exact(result)


def test_hugging_face_default_cache_stays_sharded() -> None:
    """``use_cache=True`` concatenates an empty cache with the keys along the sequence: the
    identity, so nothing is gathered."""
    for result in run_ranks(2, hf_default_cache):
        _assert_exact(result)


def test_recompile_limit_names_the_setting() -> None:
    """The third parallelized instance of one class under a limit of 2 recompiles: an
    AutoSPError naming the setting, not Dynamo's FailOnRecompileLimitHit."""
    for message in run_ranks(2, recompile_limit):
        assert "torch._dynamo.config.recompile_limit" in message, message
        assert "PlainGPT.forward" in message, message
