"""A runtime ready for the GPU, checked on the CPU: the fused attention kernels' argument
plumbing (on the meta device), fp32 math in row chunks, mask probing on the graph's device,
and no host synchronisation per training step."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.fx import Graph

from autosp.compiler.attention import blocks
from autosp.compiler.attention.blocks import (
    ALL,
    BIAS_ALIGN,
    Block,
    _kernel_bias,
    block_backward,
    block_forward,
    choose_kernel,
)
from autosp.compiler.masks import _Evaluator
from tests.multirank import run_ranks

CPU, CUDA, META = torch.device("cpu"), torch.device("cuda"), torch.device("meta")
BF16 = torch.bfloat16


def test_kernel_choice_by_device() -> None:
    assert choose_kernel(CPU, BF16, 64, True, 0.0, True) == "cpu_flash"
    assert choose_kernel(CUDA, BF16, 128, False, 0.0, True) == "flash"
    assert choose_kernel(CUDA, BF16, 128, True, 0.0, True) == "efficient"  # flash: no bias
    assert choose_kernel(CUDA, torch.float32, 64, False, 0.0, True) == "efficient"
    assert choose_kernel(CUDA, BF16, 20, False, 0.0, True) == "efficient"  # head dim % 8
    assert choose_kernel(CUDA, BF16, 64, False, 50.0, True) == "math"  # soft-cap
    assert choose_kernel(CUDA, BF16, 64, False, 0.0, False) == "math"
    assert choose_kernel(META, BF16, 64, False, 0.0, True) == "math"


@pytest.mark.parametrize(
    ("kernel", "bias_shape", "diagonal"),
    [
        ("flash", None, True),
        ("efficient", None, False),
        ("efficient", (2, 1, 40, 24), True),  # a structured block's bias, causal too
        ("efficient", (1, 24), False),  # ring's padding bias, one row for every query
    ],
)
def test_fused_kernel_plumbing_on_meta(
    kernel: str, bias_shape: tuple[int, ...] | None, diagonal: bool
) -> None:
    """The CUDA kernels' forward and backward accept the arguments a block gives them (their
    meta functions check the schema) and return fp32 results per query row: 40 rows, not a
    multiple of the efficient kernel's 32-row log-sum-exp padding."""
    q = torch.empty(2, 4, 40, 64, device=META, dtype=BF16)
    kv = torch.empty(2, 4, 24, 64, device=META, dtype=BF16)
    bias = None if bias_shape is None else torch.empty(bias_shape, device=META)
    block = Block(ALL, ALL, diagonal, bias)
    out, lse = block_forward(q, kv, kv, block, 0.125, 0.0, kernel)
    assert (out.shape, out.dtype) == (q.shape, torch.float32)
    assert (lse.shape, lse.dtype) == (q.shape[:-1], torch.float32)
    global_lse = torch.empty(2, 4, 64, device=META)[..., :40]  # a slice, as blocks pass it
    grads = block_backward(q, q, kv, kv, q, global_lse, block, 0.125, 0.0, kernel)
    assert [(g.shape, g.dtype) for g in grads] == [
        (q.shape, torch.float32),
        (kv.shape, torch.float32),
        (kv.shape, torch.float32),
    ]


def test_efficient_kernel_bias_layout() -> None:
    """Query dtype, ``[B, H, Lq, Lk]`` without copies, rows aligned, values unchanged."""
    q, k = torch.zeros(2, 4, 5, 8, dtype=BF16), torch.zeros(2, 4, 7, 8, dtype=BF16)
    bias = torch.zeros(2, 1, 5, 7).masked_fill(torch.rand(2, 1, 5, 7) > 0.5, float("-inf"))
    got = _kernel_bias(bias, q, k)
    assert got.shape == (2, 4, 5, 7) and got.dtype == BF16
    assert got.stride(-1) == 1 and got.stride(-2) % BIAS_ALIGN == 0 and got.stride(1) == 0
    assert torch.equal(got.float(), bias.expand(2, 4, 5, 7))


def test_math_path_takes_rows_in_chunks() -> None:
    """The fp32 math path (``MATH_ROWS`` rows at a time) equals the CPU flash kernel on a
    causal block longer than one chunk, with a bias, forward and backward."""
    rows = blocks.MATH_ROWS + 37
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, 2, rows, 8, generator=gen) for _ in range(4))
    bias = torch.zeros(1, 1, rows, rows).masked_fill(
        torch.rand(1, 1, rows, rows, generator=gen) > 0.8, float("-inf")
    )
    block = Block(ALL, ALL, True, bias)
    fused = block_forward(q, k, v, block, 0.3, 0.0, "cpu_flash")
    math = block_forward(q, k, v, block, 0.3, 0.0, "math")
    for a, b in zip(fused, math, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    out, lse = fused
    fused_grads = block_backward(dout, q, k, v, out, lse, block, 0.3, 0.0, "cpu_flash")
    math_grads = block_backward(dout, q, k, v, out, lse, block, 0.3, 0.0, "math")
    for a, b in zip(fused_grads, math_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_mask_probe_feeds_candidates_on_the_graph_device() -> None:
    """Candidate positions go to the device of the graph's inputs, not the CPU."""
    graph = Graph()
    node = graph.placeholder("position_ids")
    node.meta["example_value"] = torch.zeros(1, 8, dtype=torch.long)
    seen: list[torch.device] = []

    def sub(positions: torch.Tensor) -> torch.Tensor:
        seen.append(positions.device)
        return torch.ones(8, 8, dtype=torch.bool, device=positions.device).tril()

    example = [torch.zeros(1, 8, dtype=torch.long, device=META)]
    evaluate = _Evaluator(sub, [node], example, {node: 0}, frozenset())
    evaluate(8, {node: torch.arange(8).view(1, 8)})
    assert seen == [META]


SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::equal", "aten::masked_select"}
"""Ops that make the host wait for the device: ``.item()``, ``bool(t)``, boolean indexing..."""

HOST_SIDE = "autosp/comm/faults.py"
"""The per-call input check reads host tensors by design (Note [Input agreement])."""


def host_syncs(cases: list[tuple[str, str, dict[str, Any]]]) -> dict[str, list[list[str]]]:
    """Per case (label, model, options): the sync ops of the second training step (forward
    and backward), each with the chain of profiler events it ran under."""
    from torch.profiler import ProfilerActivity, profile

    import autosp
    from tests.models import EXTRA, FAMILIES
    from tests.workers import make_batch

    found = {}
    for label, name, options in cases:
        factory, extra = EXTRA[name] if name in EXTRA else (FAMILIES[name], None)
        torch.manual_seed(0)
        model = autosp.parallelize(factory(), backend="aot_eager", **options)
        ids, labels = make_batch(1, 16, seed=0)
        inputs = {"input_ids": ids, "labels": labels, **(extra(1, 16) if extra else {})}
        model(**inputs)["loss"].backward()  # compiles
        with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
            model(**inputs)["loss"].backward()
        chains = []
        for event in prof.events():
            if event.name not in SYNC_OPS:
                continue
            chain = []
            while event is not None:
                chain.append(event.name)
                event = event.cpu_parent
            if not any(HOST_SIDE in name for name in chain):
                chains.append(chain)
        found[label] = chains
    return found


def test_no_host_sync_per_step() -> None:
    """With only ``input_ids`` and ``labels`` a step never waits for the device: ring
    attention (zigzag), blockwise attention under a sliding window. Position inputs cost one
    check of the mask guard."""
    cases = [
        ("ring", "llama", {"attention": "ring"}),
        ("blockwise_window", "mistral_sliding_window", {}),
        ("packed_positions", "llama_packed", {}),
    ]
    for found in run_ranks(2, host_syncs, cases):
        assert found["ring"] == [], found["ring"]
        assert found["blockwise_window"] == [], found["blockwise_window"]
        assert len(found["packed_positions"]) <= 1, found["packed_positions"]
