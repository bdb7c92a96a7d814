"""autosp's recomputation policy (Note [Sequence-aware recomputation])."""

from __future__ import annotations

import re

import pytest

import autosp
from autosp.compiler.recompute import AutoRecompute
from tests.multirank import run_ranks
from tests.workers import auto_recompute_steps, inductor_recompute_step, recompute_step

LAYERS = 2  # tests.models builds two-layer models


@pytest.fixture(scope="module")
def steps() -> dict[str, list[dict]]:
    """Per policy, each rank's ``recompute_step``; "cheap" as recompute="auto" chooses it
    within a budget of 1 GiB (32 tokens per rank)."""
    return {
        "off": run_ranks(2, recompute_step, "llama", "off"),
        "cheap": run_ranks(2, recompute_step, "llama", "auto", 1.0),
        "layers": run_ranks(2, recompute_step, "llama", "layers"),
        "full": run_ranks(2, recompute_step, "llama", "full"),
    }


@pytest.mark.parametrize("policy", ["off", "cheap", "layers"])
def test_exact_and_no_collective_or_attention_recomputed(
    steps: dict[str, list[dict]], policy: str
) -> None:
    for result in steps[policy]:
        assert result["loss_rel_err"] <= 1e-5, result
        assert max(result["grad_rel_err"].values()) <= 1e-4, result["grad_rel_err"]
        assert result["backward"] == {"all_to_all": 4 * LAYERS, "grad_all_reduce": 1}
        assert result["attention"] == (LAYERS, 0)  # (forward, backward): never recomputed


def test_full_recomputes_attention_and_collectives_once(steps: dict[str, list[dict]]) -> None:
    """Under "full" each layer's attention and its four all-to-alls (q, k, v and the output)
    run once more in the backward, and the step stays exact."""
    for result in steps["full"]:
        assert result["loss_rel_err"] <= 1e-5, result
        assert max(result["grad_rel_err"].values()) <= 1e-4, result["grad_rel_err"]
        assert result["backward"] == {"all_to_all": 8 * LAYERS, "grad_all_reduce": 1}
        assert result["attention"] == (LAYERS, LAYERS)
    (line,) = steps["full"][0]["plan"]
    assert line.startswith(
        f"full: {LAYERS} layers recomputed in the backward from their "
        "inputs, attention and collectives included"
    ), line


def test_less_is_saved(steps: dict[str, list[dict]]) -> None:
    """Recomputing saves less for the backward: "full" less than "layers", less than "cheap",
    less than "off"."""
    policies = ("off", "cheap", "layers", "full")
    for rank in range(2):
        off, cheap, layers, full = (steps[p][rank]["saved_bytes"] for p in policies)
        assert full < layers < cheap < off, (off, cheap, layers, full)
    (line,) = steps["layers"][0]["plan"]
    assert line.startswith(f"layers: {LAYERS} layers recomputed"), line
    assert steps["off"][0]["plan"] == []


def _limits(line: str) -> tuple[int, int]:
    """The tokens per rank up to which a plan line of recompute="auto" runs "cheap", and
    "layers"."""
    found = re.search(r"'cheap' up to ~([\d,]+) tokens per rank, 'layers' up to ~([\d,]+)", line)
    return int(found[1].replace(",", "")), int(found[2].replace(",", ""))


def test_auto_switches_with_length(steps: dict[str, list[dict]]) -> None:
    """recompute="auto" runs "cheap" while its saved activations fit the budget, "layers"
    while its own do and "full" above, per call (Note [Recomputation by length]); all exact,
    each saving less per token than the one before."""
    assert autosp.Config().recompute == "auto"
    probe = steps["cheap"][0]["plan"]
    assert probe[1].startswith("auto chose 'cheap' for 32 tokens per rank"), probe
    cheap_limit, layers_limit = _limits(probe[1])  # within 1 GiB
    budget = 48 / cheap_limit  # GiB; batch 2: 32 tokens per rank at 32, 64 at 64
    longest = 48 * layers_limit // cheap_limit  # the most tokens per rank "layers" runs
    lengths = (32, 64, 32, (longest // 8 + 1) * 8)
    assert lengths[3] > 64, (cheap_limit, layers_limit)
    for rank in run_ranks(2, auto_recompute_steps, budget, lengths):
        short, long, again, longer = rank
        for step in rank:
            assert step["loss_rel_err"] <= 1e-5, step
            assert max(step["grad_rel_err"].values()) <= 1e-4, step["grad_rel_err"]
        assert short["plan"][0].startswith(f"cheap: {LAYERS} "), short["plan"]
        assert short["plan"][1].startswith("auto chose 'cheap' for 32 tokens per rank")
        assert long["plan"][0].startswith(f"layers: {LAYERS} "), long["plan"]
        assert long["plan"][1].startswith("auto chose 'layers' for 64 tokens per rank")
        assert again["plan"] == []  # the traced graph again: nothing compiled
        assert long["saved_bytes"] < 2 * short["saved_bytes"]  # "cheap" would save 2x
        assert longer["plan"][0].startswith(f"full: {LAYERS} "), longer["plan"]
        assert longer["plan"][1].startswith(f"auto chose 'full' for {lengths[3]} tokens")
        # "full" saves less per token than "layers"
        assert longer["saved_bytes"] / lengths[3] < long["saved_bytes"] / 64, rank


def test_auto_counts_tiled_mlps_out() -> None:
    """A tiled MLP's gate and up outputs are not saved: "cheap" runs longer calls where the
    MLPs are tiled, and switches to "layers" once, at the first length over the budget;
    "full" runs where "layers"' own saved activations pass the budget."""
    untiled = AutoRecompute(100.0, 50.0, 10_000)
    assert (untiled.limit, untiled.policy(100), untiled.policy(101)) == (100, "cheap", "layers")
    assert (untiled.layers_limit, untiled.policy(200), untiled.policy(201)) == (
        200,
        "layers",
        "full",
    )
    tiled_from_51 = AutoRecompute(100.0, 50.0, 10_000, ((50, 40.0),))
    assert tiled_from_51.bytes_per_token(50) == 100 and tiled_from_51.bytes_per_token(51) == 60
    assert (tiled_from_51.limit, tiled_from_51.policy(166), tiled_from_51.policy(167)) == (
        166,
        "cheap",
        "layers",
    )
    # Over the budget (30 tokens) before tiling starts: one switch, no way back to "cheap".
    late = AutoRecompute(100.0, 50.0, 3_000, ((50, 90.0),))
    assert (late.limit, late.policy(30), late.policy(31), late.policy(60), late.policy(61)) == (
        30,
        "cheap",
        "layers",
        "layers",
        "full",
    )


def test_inductor_keeps_no_buffer_for_later_under_layer_recomputation() -> None:
    """Under "full" Inductor compiles with its buffer reuse off (Note [Buffer reuse under
    recomputation]): exact, said in the plan, and few of its code's buffers reuse another (in
    place). Here 10 of 229; with the reuse on, 54 of the same 229."""
    for result in run_ranks(2, inductor_recompute_step, "full"):
        assert result["loss_rel_err"] <= 1e-5, result
        assert max(result["grad_rel_err"].values()) <= 1e-4, result["grad_rel_err"]
        assert any(line.startswith("inductor: buffer reuse off") for line in result["plan"])
        assert result["reused"] * 8 < result["buffers"], (result["reused"], result["buffers"])


def test_unknown_policy() -> None:
    with pytest.raises(
        ValueError, match="recompute 'all' is not one of auto, off, cheap, layers, full"
    ):
        autosp.Config(recompute="all")
    with pytest.raises(ValueError, match="activation_memory_gib must be positive, got 0"):
        autosp.Config(activation_memory_gib=0)
