"""The gated MLP over chunks of tokens (Note [Tiled MLP])."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import autosp
from autosp.compiler.tiled_mlp import tiled_mlp
from tests.multirank import run_ranks
from tests.test_low_precision import _check, bf16_errors
from tests.tiled_mlp_workers import auto_tiling_steps, tiled_cases

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
LAYERS = 2  # tests.models builds two-layer models

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_op_matches_model_mlp(activation: str, chunk: int) -> None:
    """Output and gradients equal the model's ``down(act(gate(x)) * up(x))`` for chunks of
    one row, chunks that do not divide the rows, and one chunk of all rows."""
    torch.manual_seed(0)
    x = torch.randn(2, 11, 8, dtype=torch.float64, requires_grad=True)
    weights = [
        torch.randn(shape, dtype=torch.float64, requires_grad=True)
        for shape in ((24, 8), (24, 8), (8, 24))
    ]
    gate, up, down = weights
    expected = F.linear(ACTIVATIONS[activation](F.linear(x, gate)) * F.linear(x, up), down)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, *weights), grad)
    out = tiled_mlp(x, *weights, activation, chunk)
    grads = torch.autograd.grad(out, (x, *weights), grad)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_op_registration() -> None:
    """Fake, autograd and schema agree with the kernel (``torch.library.opcheck``), and a
    frozen input gets no gradient."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4)
    weights = [torch.randn(s, requires_grad=True) for s in ((6, 4), (6, 4), (4, 6))]
    torch.library.opcheck(torch.ops.autosp.tiled_mlp.default, (x, *weights, "silu", 2))
    tiled_mlp(x, *weights, "silu", 2).sum().backward()
    assert x.grad is None and all(w.grad is not None for w in weights)


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="tile_mlp must be True, False or 'auto', got 'yes'"):
        autosp.Config(tile_mlp="yes")
    with pytest.raises(ValueError, match="mlp_chunk_tokens must be positive, got 0"):
        autosp.Config(mlp_chunk_tokens=0)


MLP_PATH = r"model\.layers\.\d\.mlp"
PER_CHUNK = r"tokens per chunk\) over sharded tokens"

TILED = {"tile_mlp": True, "mlp_chunk_tokens": 5}
"""Forced on, with chunks that do not divide a rank's rows."""

CASES: dict[str, tuple[str, dict[str, Any], list[int], bool]] = {
    "llama": ("llama", TILED, [13, 20], False),
    "llama_auto": ("llama", {}, [13], False),
    "gemma_layers_whole_loss": (
        "gemma",
        {**TILED, "recompute": "layers", "chunk_loss": False},
        [13],
        False,
    ),
    "llama_full": ("llama", {**TILED, "recompute": "full"}, [13], False),
    "llama_hf_checkpointing": ("llama", {**TILED, "recompute": "off"}, [13], True),
    "mistral_inductor": ("mistral", {**TILED, "backend": "inductor"}, [13], False),
}


@pytest.fixture(scope="module")
def results() -> list[dict[str, dict[str, Any]]]:
    """Per rank, each case's ``tiled_parity``."""
    # Inductor compiles apart: each call stays well inside run_ranks's timeout on 2 cores.
    inductor = [name for name, case in CASES.items() if case[1].get("backend") == "inductor"]
    others = [name for name in CASES if name not in inductor]
    merged: list[dict[str, dict[str, Any]]] = [{}, {}]
    for names in (others, inductor):
        per_rank = run_ranks(2, tiled_cases, [CASES[name] for name in names])
        for rank, cases in zip(merged, per_rank, strict=True):
            rank.update(zip(names, cases, strict=True))
    return merged


@pytest.mark.parametrize("case", list(CASES))
def test_parity(results: list[dict[str, dict[str, Any]]], case: str) -> None:
    """Loss and every gradient equal one process's at SP=2, tiling on and off, with the
    chunked loss and without, each recompute policy (HF checkpointing under "off"), aot_eager
    and Inductor; nothing is gathered and one graph serves two lengths."""
    for rank in results:
        result = rank[case]
        assert result["gathered_ops"] == [], result["gathered_ops"]
        assert result["compiles"] == 1, result["compiles"]
        for step in result["steps"]:
            assert step["loss_rel_err"] <= LOSS_TOL, step["loss_rel_err"]
            assert max(step["grad_rel_err"].values()) <= GRAD_TOL, step["grad_rel_err"]


@pytest.mark.parametrize(
    ("case", "activation", "rerun"),
    [
        ("llama", "silu", {}),
        ("gemma_layers_whole_loss", "gelu_tanh", {}),
        # the forward's four all-to-alls per layer run again, and the last layer's MLP (the
        # final norm's backward reads that layer's output, which nothing saves)
        ("llama_full", "silu", {"all_to_all": 4 * LAYERS, "forward": 1}),
        ("llama_hf_checkpointing", "silu", {}),
        ("mistral_inductor", "silu", {}),
    ],
)
def test_plan_and_backward(
    results: list[dict[str, dict[str, Any]]], case: str, activation: str, rerun: dict[str, int]
) -> None:
    """``model.plans`` lists each layer's MLP with its chunk; the backward runs each tiled
    MLP's backward once and its forward only where ``rerun`` says (the op is saved; under
    ``recompute="full"`` a layer's output is recomputed only where nothing saves it), with the
    collectives of the untiled model."""
    for rank in results:
        result = rank[case]
        assert len(result["mlp_plan"]) == LAYERS, result["mlp_plan"]
        for line in result["mlp_plan"]:
            assert re.fullmatch(rf"{MLP_PATH}: tiled MLP \({activation}, 5 {PER_CHUNK}", line), line
        for step in result["steps"]:
            forward = {"forward": rerun["forward"]} if "forward" in rerun else {}
            assert step["backward_calls"] == {"backward": LAYERS, **forward}, step
            all_to_alls = 4 * LAYERS + rerun.get("all_to_all", 0)
            assert step["collectives"] == {"all_to_all": all_to_alls, "grad_all_reduce": 1}


def test_auto_keeps_short_sequences_untiled(results: list[dict[str, dict[str, Any]]]) -> None:
    """The default ("auto") leaves short sequences on the model's own MLP; tiling saves less
    for the backward."""
    for rank in results:
        assert rank["llama_auto"]["mlp_plan"] == [], rank["llama_auto"]["mlp_plan"]
        assert rank["llama_auto"]["steps"][0]["backward_calls"] == {}
        tiled, untiled = (rank[c]["steps"][0]["saved_bytes"] for c in ("llama", "llama_auto"))
        assert tiled < untiled, (tiled, untiled)


def test_auto_tiles_long_calls_of_a_short_first_call() -> None:
    """tile_mlp="auto" decides per call (Note [Tiled MLP]): a first call of 32 tokens per
    rank runs the model's MLP, a call of 64 gets a graph with both MLPs tiled, and 32 again
    runs the traced graph; every step exact."""
    for rank in run_ranks(2, auto_tiling_steps, 48, [32, 64, 32]):
        short, long, again = rank
        for step in rank:
            assert step["loss_rel_err"] <= LOSS_TOL, step["loss_rel_err"]
            assert max(step["grad_rel_err"].values()) <= GRAD_TOL, step["grad_rel_err"]
        assert (short["compiled"], short["mlp_plan"], short["backward_calls"]) == (1, [], {})
        assert long["compiled"] == 1 and len(long["mlp_plan"]) == LAYERS, long
        assert long["backward_calls"] == {"backward": LAYERS}
        assert (again["compiled"], again["backward_calls"]) == (0, {})


def test_bf16_error_at_most_twice_single_process() -> None:
    """bf16 tiled (weight gradients summed over chunks in fp32): error vs fp64 at most twice
    one process's, as tests/test_low_precision.py requires of every other option."""
    cases = [("llama", {"tile_mlp": True, "mlp_chunk_tokens": 7}), ("gemma", {"tile_mlp": True})]
    for results in run_ranks(2, bf16_errors, cases, 2, 30):
        _check(results, "ulysses")
