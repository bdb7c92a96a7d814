"""Rank functions of tests/test_tiled_mlp.py (module level, so they pickle)."""

from __future__ import annotations

import copy
from typing import Any

import torch

import autosp
from tests.models import FAMILIES
from tests.workers import CountOps, make_batch, saved_tensor_bytes, step_errors

TILED_OPS = {"tiled_mlp": "forward", "tiled_mlp_backward": "backward"}
"""The tiled MLP's ops, for ``CountOps``."""


def tiled_parity(
    name: str, options: dict[str, Any], seqs: list[int], checkpointed: bool = False
) -> dict[str, Any]:
    """One training step per sequence length of FAMILIES[name] under ``options`` against one
    process: errors, the MLP plans, gathered ops, the tiled ops the backward calls, the
    backward's collectives and the bytes saved for the backward."""
    torch.manual_seed(0)
    model = FAMILIES[name]()
    if checkpointed:
        model.gradient_checkpointing_enable()
    ref = copy.deepcopy(model)
    parallel = autosp.parallelize(model, **{"backend": "aot_eager", **options})
    steps = []
    for seq in seqs:
        ids, labels = make_batch(2, seq, seed=seq)
        with saved_tensor_bytes() as saved:
            loss = parallel(input_ids=ids, labels=labels)["loss"]
        with CountOps(TILED_OPS) as backward, autosp.count_collectives() as collectives:
            loss.backward()
        expected = ref(input_ids=ids, labels=labels)["loss"]
        expected.backward()
        steps.append(
            {
                **step_errors(loss, expected, model, ref),
                "backward_calls": dict(backward.calls),
                "collectives": dict(collectives),
                "saved_bytes": sum(saved),
            }
        )
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    return {
        "steps": steps,
        "compiles": len(parallel.plans),
        "mlp_plan": [line for p in parallel.plans for line in p.mlp],
        "gathered_ops": sorted({op for p in parallel.plans for op in p.gathered_ops}),
    }


def tiled_cases(cases: list[tuple[str, dict[str, Any], list[int], bool]]) -> list[dict]:
    """``tiled_parity`` for each ``(name, options, seqs, checkpointed)`` in one group."""
    return [tiled_parity(*case) for case in cases]


def auto_tiling_steps(tiled_from: int, seqs: list[int]) -> list[dict[str, Any]]:
    """Training steps of FAMILIES["llama"] (batch 2) at ``seqs`` under ``tile_mlp="auto"``,
    with ``AUTO_BYTES`` set so that calls above ``tiled_from`` tokens per rank tile: per step,
    parity with one process, the MLP plans of the graphs it compiled and the tiled backward
    calls."""
    from autosp.compiler import tiled_mlp

    torch.manual_seed(0)
    model = FAMILIES["llama"]()
    tiled_mlp.AUTO_BYTES = tiled_from * model.config.intermediate_size * 4  # fp32 rows
    ref = copy.deepcopy(model)
    parallel = autosp.parallelize(model, backend="aot_eager", mlp_chunk_tokens=5)
    steps = []
    for seq in seqs:
        ids, labels = make_batch(2, seq, seed=seq)
        compiled = len(parallel.plans)
        loss = parallel(input_ids=ids, labels=labels)["loss"]
        with CountOps(TILED_OPS) as backward:
            loss.backward()
        expected = ref(input_ids=ids, labels=labels)["loss"]
        expected.backward()
        steps.append(
            {
                **step_errors(loss, expected, model, ref),
                "backward_calls": dict(backward.calls),
                "mlp_plan": [line for p in parallel.plans[compiled:] for line in p.mlp],
                "compiled": len(parallel.plans) - compiled,
            }
        )
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    return steps
