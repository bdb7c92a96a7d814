"""Training in bf16: autosp is as accurate as one process in bf16 (TransformerEngine's test).

Both runs start from the same bf16 weights and are compared with the same model in fp64 on
one process. autosp's error (loss and every parameter gradient) must be at most twice the
error of the single-process bf16 run: splitting the sequence may reorder sums, but every
partial result that crosses a rank (attention blocks, the loss's sum and count) is kept in
fp32, so it must not add rounding of its own beyond that.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist

import autosp
from tests.models import EXTRA, FAMILIES
from tests.multirank import run_ranks
from tests.workers import BACKEND, make_batch

RATIO = 2.0
"""autosp's error may be at most this multiple of the single-process bf16 error."""

FLOOR = 2.0**-12
"""Absolute slack on relative errors, far below bf16's epsilon (2**-8): a quantity that the
single-process bf16 run happens to get exactly right (error 0) must not demand bit-equality."""

NORM_FLOOR = 1e-6
"""Gradient norms below this (zero in exact arithmetic, e.g. a key bias under softmax) are
measured absolutely."""


def _rel(value: torch.Tensor, ref: torch.Tensor) -> float:
    return ((value.double() - ref).norm() / ref.norm().clamp(min=NORM_FLOOR)).item()


def bf16_errors(cases: list[tuple[str, dict[str, Any]]], batch: int, seq: int) -> dict[str, Any]:
    """Per model: (autosp error, single-process bf16 error) against fp64, for the loss and for
    every parameter gradient."""
    results = {}
    for name, options in cases:
        factory = EXTRA[name][0] if name in EXTRA else FAMILIES[name]
        torch.manual_seed(0)
        model = factory().to(torch.bfloat16)
        reference, single = copy.deepcopy(model).double(), copy.deepcopy(model)
        parallel = autosp.parallelize(model, **{"backend": BACKEND, **options})
        ids, labels = make_batch(batch, seq, seed=seq)
        losses = {}
        for key, module in (("ref", reference), ("single", single), ("autosp", parallel)):
            losses[key] = module(input_ids=ids, labels=labels)["loss"]
            losses[key].backward()
        errors = {
            "loss": (
                _rel(losses["autosp"].detach(), losses["ref"].detach()),
                _rel(losses["single"].detach(), losses["ref"].detach()),
            )
        }
        params = zip(
            model.named_parameters(), single.parameters(), reference.parameters(), strict=True
        )
        for (param, p), s, r in params:
            errors[param] = (_rel(p.grad, r.grad), _rel(s.grad, r.grad))
        results[f"{name} {options}"] = {
            "errors": errors,
            "dtype": str(next(model.parameters()).grad.dtype),
            "gathered": sorted({op for plan in parallel.plans for op in plan.gathered_ops}),
            "attention": [line for plan in parallel.plans for line in plan.attention],
            "rank": dist.get_rank(),
        }
    return results


def _check(results: dict[str, Any], strategy: str) -> None:
    for name, result in results.items():
        assert result["dtype"] == "torch.bfloat16", result["dtype"]
        assert result["gathered"] == [], result["gathered"]
        assert all(strategy in line for line in result["attention"]), result["attention"]
        for what, (ours, single) in result["errors"].items():
            assert ours <= RATIO * single + FLOOR, (name, result["rank"], what, ours, single)


@pytest.mark.parametrize(
    ("world", "cases", "strategy"),
    [
        # Ulysses (4 heads over 2 ranks), and a sliding window (blockwise attention); the
        # memory options off and on: the model's own head and loss, whole layers recomputed
        # (attention and collectives kept, then included).
        (
            2,
            [
                ("llama", {}),
                ("mistral_sliding_window", {}),
                ("llama", {"chunk_loss": False}),
                ("llama", {"backend": "aot_eager", "recompute": "layers"}),
                ("llama", {"backend": "aot_eager", "recompute": "full"}),
            ],
            "ulysses",
        ),
        # Ring attention over 3 ranks, causal (zigzag) and with a sliding window.
        (
            3,
            [
                ("llama", {"attention": "ring"}),
                ("mistral_sliding_window", {"attention": "ring"}),
            ],
            "ring",
        ),
    ],
    ids=["ulysses_sp2", "ring_sp3"],
)
def test_bf16_error_at_most_twice_single_process(
    world: int, cases: list[tuple[str, dict]], strategy: str
) -> None:
    for results in run_ranks(world, bf16_errors, cases, 2, 30):
        _check(results, strategy)
