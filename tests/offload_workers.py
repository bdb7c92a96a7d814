"""Rank functions of tests/test_offload.py (module level, so they pickle)."""

from __future__ import annotations

import copy
from typing import Any

import autosp
from tests.models import build
from tests.workers import make_batch, step_errors


def offload_steps(family: str, options: dict[str, Any], seqs: list[int]) -> dict[str, Any]:
    """One training step per sequence length with ``offload=True`` against one process: the
    loss and gradient errors of each step and the offload plans."""
    model = build(family)
    ref = copy.deepcopy(model)
    parallel = autosp.parallelize(model, offload=True, **options)
    steps = []
    for seq in seqs:
        ids, labels = make_batch(2, seq, seed=seq)
        loss = parallel(input_ids=ids, labels=labels)["loss"]
        loss.backward()
        expected = ref(input_ids=ids, labels=labels)["loss"]
        expected.backward()
        steps.append(step_errors(loss, expected, model, ref))
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    return {"steps": steps, "plan": [line for p in parallel.plans for line in p.offload]}
