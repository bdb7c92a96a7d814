"""The language-model head and its loss over chunks of tokens (Note [Chunked loss])."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

from autosp.compiler.chunked_loss import _row_slice, linear_cross_entropy
from tests.multirank import run_ranks
from tests.workers import chunked_parity

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    ("smoothing", "softcap", "chunk"), [(0.0, 0.0, 3), (0.1, 0.0, 4), (0.0, 5.0, 1), (0.2, 3.0, 64)]
)
def test_matches_cross_entropy(
    reduction: str, smoothing: float, softcap: float, chunk: int
) -> None:
    """Loss and gradients equal ``F.cross_entropy`` of the fp32 logits (soft-capped), with
    ignored labels, for chunks that do not divide the rows, of one row, and of all rows."""
    torch.manual_seed(0)
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(13, 8, requires_grad=True)
    target = torch.randint(0, 13, (10,))
    target[[2, 7]] = -100
    logits = F.linear(hidden, weight).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    expected = F.cross_entropy(
        logits, target, ignore_index=-100, label_smoothing=smoothing, reduction=reduction
    )
    grads = torch.autograd.grad(expected * 3.0, (hidden, weight))
    loss = linear_cross_entropy(
        hidden, weight, target, -100, smoothing, softcap, reduction, chunk, True
    )
    got = torch.autograd.grad(loss * 3.0, (hidden, weight))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for g, e in zip(got, grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_without_gradients() -> None:
    """Traced under ``no_grad`` the op computes no gradient; a backward through it raises."""
    hidden = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(7, 4, requires_grad=True)
    target = torch.randint(0, 7, (6,))
    loss = linear_cross_entropy(hidden, weight, target, -100, 0.0, 0.0, "mean", 4, False)
    expected = F.cross_entropy(F.linear(hidden, weight), target)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="compiled without gradients"):
        loss.backward()


@pytest.mark.parametrize(
    ("world", "names"),
    [(2, ["llama", "gemma2_softcap", "gpt2", "plain_gpt"]), (3, ["llama", "plain_gpt"])],
)
def test_parity_with_logits_dropped(world: int, names: list[str]) -> None:
    """HF heads (labels shifted by the loss), Gemma-2's soft-capped logits, a tied head
    (GPT-2) and a plain model that slices its logits (``logits[:, :-1]``): the loss is
    chunked, exact, and the logits are not returned; at SP=3 (rows no chunk divides) for
    the two ways of shifting (every parity test runs the chunked loss as well)."""
    per_rank = run_ranks(world, chunked_parity, names, 13, {"loss_chunk_tokens": 4})
    for results in per_rank:
        for name, result in results.items():
            assert result["loss_rel_err"] <= LOSS_TOL, (name, result)
            worst = max(result["grad_rel_err"].values())
            assert worst <= GRAD_TOL, (name, result["grad_rel_err"])
            assert result["logits"] == "NoneType", (name, result)
            (line,) = result["loss_plan"]
            assert "chunked linear + cross_entropy" in line and "4 tokens per chunk" in line


def test_unchunked_on_request() -> None:
    """``chunk_loss=False`` keeps the model's own head and loss, and its logits."""
    (results, _) = run_ranks(2, chunked_parity, ["llama"], 13, {"chunk_loss": False})
    result = results["llama"]
    assert result["loss_rel_err"] <= LOSS_TOL, result
    assert result["logits"] == "Tensor"
    assert result["loss_plan"] and "chunked" not in result["loss_plan"][0]


def test_row_slice_of_a_tuple_is_not_rows() -> None:
    """``outputs[0]`` of an op returning a tuple (DeepSpeed ZeRO-3's ``F.linear`` replacement,
    an autograd.Function) is no row slice; it used to crash (``'tuple' has no .dim()``)."""
    graph = torch.fx.Graph()
    pair = graph.placeholder("pair")
    pair.meta["example_value"] = (torch.zeros(2, 3), torch.zeros(2, 3))
    first = graph.call_function(operator.getitem, (pair, 0))
    rows = graph.placeholder("rows")
    rows.meta["example_value"] = torch.zeros(1, 4, 3)
    sliced = graph.call_function(operator.getitem, (rows, (slice(None), slice(None, -1))))
    assert _row_slice(first) is None
    assert _row_slice(sliced) == (slice(None), slice(None, -1))
