"""Repeated key/value heads reach the attention unrepeated (Note [Repeated key/value heads])."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from autosp.compiler.gqa import fold_repeated_kv_pass
from tests.fuzz import parse_spec, run_specs
from tests.multirank import run_ranks
from tests.workers import gqa_parity

B, H, KV, S, D = 2, 4, 2, 6, 8


def repeat_kv(t: torch.Tensor) -> torch.Tensor:
    """Hugging Face's repeat_kv."""
    b, kv, s, d = t.shape
    return t[:, :, None, :, :].expand(b, kv, H // kv, s, d).reshape(b, H, s, d)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), is_causal=True)


def attend_interleaved(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    k, v = (t.repeat_interleave(H // KV, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, None, 0.0, True)


def attend_and_return_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
    keys = repeat_kv(k)
    return F.scaled_dot_product_attention(q, keys, repeat_kv(v)), keys


def _folded(fn: Callable[..., Any]) -> tuple[GraphModule, Callable[..., Any]]:
    """The pass's graph of ``fn`` as Dynamo captures it, and ``fn`` compiled through it."""
    graphs: list[GraphModule] = []

    def backend(gm: GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        graphs.append(fold_repeated_kv_pass(gm, None))  # type: ignore[arg-type]
        return gm.forward

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    return graphs, compiled  # type: ignore[return-value]


@pytest.mark.parametrize("fn", [attend, attend_interleaved], ids=["repeat_kv", "interleave"])
def test_folded_and_equal(fn: Callable[..., Any]) -> None:
    torch.manual_seed(0)
    q = torch.randn(B, H, S, D, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, KV, S, D, dtype=torch.float64, requires_grad=True) for _ in "kv")
    graphs, compiled = _folded(fn)
    out = compiled(q, k, v)
    (attention,) = [n for n in graphs[0].graph.nodes if "scaled_dot_product" in str(n.target)]
    targets = " ".join(str(n.target) for n in graphs[0].graph.nodes)
    assert "expand" not in targets and "repeat_interleave" not in targets, targets
    assert attention.kwargs.get("enable_gqa") or attention.args[7] is True
    assert [a.meta["example_value"].shape[1] for a in attention.args[1:3]] == [KV, KV]
    expected = fn(q, k, v)
    grad = torch.randn_like(expected)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_repeat_used_elsewhere_is_kept() -> None:
    """A repeated key the graph returns exists anyway: nothing is folded."""
    q = torch.randn(B, H, S, D)
    k, v = (torch.randn(B, KV, S, D) for _ in "kv")
    graphs, compiled = _folded(attend_and_return_keys)
    compiled(q, k, v)
    (attention,) = [n for n in graphs[0].graph.nodes if "scaled_dot_product" in str(n.target)]
    assert "enable_gqa" not in attention.kwargs
    assert attention.args[1].meta["example_value"].shape[1] == H


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
def test_hf_llama_sends_kv_heads_once(strategy: str) -> None:
    """HF Llama (4 heads, 2 KV heads) repeats its KV heads under compile; at SP=2 they are
    sent unrepeated and the step stays exact."""
    for rank in run_ranks(2, gqa_parity, strategy):
        (case,) = rank
        assert case["loss_rel_err"] <= 1e-5, case
        assert max(case["grad_rel_err"].values()) <= 1e-4, case["grad_rel_err"]
        assert case["gathered_ops"] == []
        if strategy == "ulysses":
            assert all("4 heads, 2 kv heads" in line for line in case["attention"]), case


def test_written_out_models_stay_exact() -> None:
    """Fuzz models with repeated KV heads (expand or repeat_interleave; SDPA or written-out
    attention; Ulysses and ring at SP=2) are exact."""
    specs = [
        parse_spec(
            f"Spec(heads=4, kv_heads=2, gqa={gqa!r}, attn_impl={impl!r}, attention={strategy!r})"
        )
        for gqa in ("expand", "repeat_interleave")
        for impl, strategy in (("sdpa", "ulysses"), ("eager", "ring"))
    ]
    results = run_specs(specs)
    assert [r["kind"] for r in results] == ["exact"] * len(specs), results
