"""Training loops whose ranks disagree or fail on purpose (module level, so they pickle)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist

import autosp
from autosp.comm.faults import InputCheck, host_channel
from tests.models import build
from tests.workers import BACKEND, make_batch


def train(batches: list[list[tuple[int, int]]], fault: tuple[int, int, str] | None = None) -> dict:
    """Forward and backward of a tiny GPT per step; at step ``i`` rank ``r`` gets the batch
    ``make_batch(1, seq, seed)`` for ``(seq, seed) = batches[i][r]``. ``fault = (step, rank,
    what)`` makes that rank ``"exit"`` or ``"hang"`` after that step's forward.

    Returns the losses, or the step, type, message and seconds since that step began of the
    first error."""
    rank = dist.get_rank()
    model = autosp.parallelize(build("plain_gpt"), backend=BACKEND)
    losses: list[float] = []
    for step, per_rank in enumerate(batches):
        ids, labels = make_batch(1, *per_rank[rank])
        start = time.monotonic()
        try:
            loss = model(input_ids=ids, labels=labels)["loss"]
            if fault is not None and fault[:2] == (step, rank):
                if fault[2] == "exit":
                    os._exit(1)
                time.sleep(3600)
            loss.backward()
        except Exception as err:  # noqa: BLE001 - reported to the test
            return {
                "step": step,
                "error": type(err).__name__,
                "message": str(err),
                "seconds": time.monotonic() - start,
            }
        losses.append(loss.item())
    return {"losses": losses}


def check_agreement(cases: list[list[list[dict[str, Any]]]]) -> list[str | None]:
    """The input check without a model, one check per case: at call ``i`` of a case rank ``r``
    passes ``case[i][r]`` (names to tensors). Returns each case's mismatch message, if any."""
    rank = dist.get_rank()
    messages: list[str | None] = []
    for case in cases:
        check = InputCheck(dist.group.WORLD, host_channel(dist.group.WORLD))
        try:
            for per_rank in case:
                check(per_rank[rank])
        except autosp.InputMismatchError as err:
            messages.append(str(err))
        else:
            messages.append(None)
    return messages


def stall_check() -> tuple[str, str, float] | None:
    """Two input checks; rank 1 stops responding before the second. Returns rank 0's error
    type, message and seconds until it came."""
    check = InputCheck(dist.group.WORLD, host_channel(dist.group.WORLD))
    ids = torch.zeros(1, 8, dtype=torch.int64)
    check({"input_ids": ids})
    if dist.get_rank() == 1:
        time.sleep(3600)
    start = time.monotonic()
    try:
        check({"input_ids": ids})
    except autosp.AutoSPError as err:
        return type(err).__name__, str(err), time.monotonic() - start
    return None
