"""Run a function on P gloo ranks in spawned processes and collect what each returns."""

from __future__ import annotations

import os
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
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


def run_ranks(world: int, fn: Callable[..., Any], *args: Any, timeout: float = 600) -> list[Any]:
    """``fn(*args)`` on ``world`` gloo ranks; returns the results by rank or raises RankError."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world, port, fn, args, queue), daemon=True)
        for rank in range(world)
    ]
    for p in procs:
        p.start()
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
        for p in procs:
            p.join(5 if len(results) == world else 0)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
