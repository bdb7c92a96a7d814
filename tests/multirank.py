"""Run a function on P gloo ranks in spawned processes and collect what each returns."""

from __future__ import annotations

import contextlib
import datetime
import os
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    world: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    queue: Any,
    pg_timeout: float | None,
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    timeout = None if pg_timeout is None else datetime.timedelta(seconds=pg_timeout)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    try:
        queue.put((rank, "ok", fn(*args)))
    except BaseException as err:  # noqa: BLE001 - reported to the parent test
        queue.put((rank, "error", (type(err).__name__, str(err), traceback.format_exc())))
    finally:
        dist.destroy_process_group()


class RankError(AssertionError):
    """A rank raised: type name, message and traceback of the first failing rank."""

    def __init__(self, rank: int, type_name: str, message: str, tb: str) -> None:
        super().__init__(f"rank {rank} raised {type_name}: {message}\n{tb}")
        self.type_name = type_name
        self.message = message


def _start(world: int, fn: Callable[..., Any], args: tuple, pg_timeout: float | None) -> tuple:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_worker, args=(rank, world, port, fn, args, queue, pg_timeout), daemon=True
        )
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    return procs, queue


def _stop(procs: list, grace: float) -> None:
    for p in procs:
        p.join(grace)
        if p.is_alive():
            p.kill()


def run_ranks(world: int, fn: Callable[..., Any], *args: Any, timeout: float = 600) -> list[Any]:
    """``fn(*args)`` on ``world`` gloo ranks; returns the results by rank or raises RankError
    as soon as one rank raises or dies."""
    procs, queue = _start(world, fn, args, None)
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                rank, status, value = queue.get(timeout=1.0)
            except queue_module.Empty:
                dead = [
                    r for r, p in enumerate(procs) if p.exitcode is not None and r not in results
                ]
                if dead or time.monotonic() > deadline:
                    what = f"rank {dead[0]} died" if dead else f"timed out after {timeout} s"
                    raise RankError(dead[0] if dead else -1, "RankDied", what, "") from None
                continue
            if status == "error":
                raise RankError(rank, *value)
            results[rank] = value
    finally:
        _stop(procs, 5 if len(results) == world else 0)
    return [results[r] for r in range(world)]


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one rank ended: ``"ok"`` (value: the result), ``"error"`` (value: type name,
    message, traceback), ``"exited"`` without a result (value: exit code) or ``"running"`` at
    the deadline or when the awaited ranks were done (value: None)."""

    status: str
    value: Any


def rank_outcomes(
    world: int,
    fn: Callable[..., Any],
    *args: Any,
    timeout: float,
    pg_timeout: float | None = None,
    wait_for: Collection[int] | None = None,
) -> list[Outcome]:
    """``fn(*args)`` on ``world`` gloo ranks (process-group timeout ``pg_timeout`` seconds),
    for tests of failures: waits until every rank of ``wait_for`` (default all) has returned,
    raised or exited, or ``timeout`` seconds have passed, then kills the rest."""
    procs, queue = _start(world, fn, args, pg_timeout)
    awaited = set(range(world) if wait_for is None else wait_for)
    outcomes: dict[int, Outcome] = {}
    deadline = time.monotonic() + timeout

    def drain(block: float) -> None:
        with contextlib.suppress(queue_module.Empty):
            rank, status, value = queue.get(timeout=block) if block else queue.get_nowait()
            outcomes[rank] = Outcome(status, value)

    try:
        while not awaited <= outcomes.keys() and time.monotonic() < deadline:
            drain(1.0)
            for rank, p in enumerate(procs):
                if p.exitcode is not None and rank not in outcomes:
                    drain(0)  # a result written just before the exit
                    outcomes.setdefault(rank, Outcome("exited", p.exitcode))
    finally:
        _stop(procs, 0)
    return [outcomes.get(r, Outcome("running", None)) for r in range(world)]
