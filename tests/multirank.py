"""Run a function on P gloo ranks in spawned processes and collect what each returns.

``run_ranks`` keeps one pool of rank processes per world size alive between calls (a process
takes seconds to start and import torch, and its first compilation more): each call runs in
the pool's process group, then resets Dynamo's caches. A pool whose call failed in a way that
may leave a rank inside a collective (one rank raised, a rank died, a timeout) is killed and
the next call starts a new one. ``rank_outcomes`` (tests of failures) always starts fresh
processes.

A pool is also retired after a call that left its ranks with many threads: every process group
a test makes (a mesh, a flattened or hybrid group) keeps a gloo transport loop thread that
wakes every few milliseconds for the life of the process. A rank of a 4-rank pool had 120 of
them after a few test files and burnt 14% of a core while idle; a few such idle pools took
most of the two cores CI runs on.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
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


def _serve(rank: int, world: int, port: int, inbox: Any, outbox: Any) -> None:
    """A pooled rank: runs ``(fn, args)`` tasks from ``inbox`` until it gets ``None``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    while (task := inbox.get()) is not None:
        fn, args = task
        try:
            outbox.put((rank, "ok", fn(*args)))
        except BaseException as err:  # noqa: BLE001 - reported to the parent test
            outbox.put((rank, "error", (type(err).__name__, str(err), traceback.format_exc())))
        finally:
            torch._dynamo.reset()
            gc.collect()
    dist.destroy_process_group()


class _Pool:
    """``world`` rank processes in one gloo process group, kept between calls."""

    def __init__(self, world: int) -> None:
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.world = world
        self.broken = False
        """Set when a call left a rank dead or possibly inside a collective: killed."""
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(world)]
        self.procs = [
            ctx.Process(target=_serve, args=(r, world, port, q, self.outbox), daemon=True)
            for r, q in enumerate(self.inboxes)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable[..., Any], args: tuple, timeout: float) -> list[Any]:
        """Results by rank; raises RankError (and leaves the pool unusable) unless every rank
        returned."""
        for inbox in self.inboxes:
            inbox.put((fn, args))
        results: dict[int, Any] = {}
        errors: dict[int, tuple] = {}
        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < self.world:
            try:
                rank, status, value = self.outbox.get(timeout=1.0)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(self.procs) if p.exitcode is not None]
                if dead or time.monotonic() > deadline:
                    # A rank still waiting in a collective: kill the pool with it.
                    self.broken = True
                    _stop(self.procs, 0)
                    if dead:
                        raise RankError(dead[0], "RankDied", f"rank {dead[0]} died", "") from None
                    if errors:
                        raise RankError(min(errors), *errors[min(errors)]) from None
                    raise RankError(-1, "RankDied", f"timed out after {timeout} s", "") from None
                continue
            if status != "ok" and not errors:  # the others get a short grace to end too
                deadline = min(deadline, time.monotonic() + 10)
            (results if status == "ok" else errors)[rank] = value
        if errors:  # every rank ended the call: the pool stays usable
            raise RankError(min(errors), *errors[min(errors)])
        return [results[r] for r in range(self.world)]

    def threads(self) -> int:
        """The most threads a rank of the pool has (0 where /proc is not there)."""
        counts = [0]
        for p in self.procs:
            with contextlib.suppress(OSError):
                counts.append(len(os.listdir(f"/proc/{p.pid}/task")))
        return max(counts)

    def close(self) -> None:
        for inbox in self.inboxes:
            with contextlib.suppress(Exception):
                inbox.put(None)
        _stop(self.procs, 5)


RETIRE_THREADS = 96
"""A pool whose rank has more threads than this after a call is closed (module docstring);
a fresh rank has about 20 after its first compilation."""

_POOLS: dict[int, _Pool] = {}


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


def run_ranks(world: int, fn: Callable[..., Any], *args: Any, timeout: float = 600) -> list[Any]:
    """``fn(*args)`` on ``world`` gloo ranks of a kept pool; returns the results by rank or
    raises RankError when a rank raises or dies."""
    pool = _POOLS.get(world)
    if pool is None or pool.broken:
        pool = _POOLS[world] = _Pool(world)
    try:
        return pool.run(fn, args, timeout)
    finally:
        if not pool.broken and pool.threads() > RETIRE_THREADS:
            pool.close()
            del _POOLS[world]


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
