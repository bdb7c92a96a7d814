"""Start the ``autosp train`` ranks: spawn them locally, or run one under torchrun."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket

import torch
import torch.multiprocessing as mp

from autosp.train.presets import model_config
from autosp.train.worker import TrainConfig, run_worker

logger = logging.getLogger(__name__)

DEFAULT_SP = 2


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_device(device: str) -> str:
    """``cpu`` or ``cuda`` for ``--device auto|cpu|cuda``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available")
    return device


def resolve_layout(dp: int | None, sp: int | None, world: int | None) -> tuple[int, int]:
    """``(dp, sp)`` from ``--dp``/``--sp`` and torchrun's world size (None when spawning)."""
    for flag, value in (("--dp", dp), ("--sp", sp)):
        if value is not None and value < 1:
            raise SystemExit(f"{flag} {value}: must be at least 1")
    if world is None:
        return dp or 1, sp or DEFAULT_SP
    if sp is None:
        sp = world // (dp or 1)
    if dp is None:
        dp = world // sp
    if dp * sp != world:
        raise SystemExit(
            f"--dp {dp} x --sp {sp} = {dp * sp} ranks, but torchrun's WORLD_SIZE is {world}: "
            "choose sizes whose product is the world size (or give one of them)."
        )
    return dp, sp


def launch(cfg: TrainConfig) -> None:
    """Run ``cfg`` on ``dp x sp`` ranks: this process is one rank under torchrun, else spawn
    them."""
    device = resolve_device(cfg.device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dp, sp = resolve_layout(cfg.dp, cfg.sp, int(os.environ["WORLD_SIZE"]))
        run_worker(dataclasses.replace(cfg, dp=dp, sp=sp, device=device))
        return

    model_config(cfg.model)  # a bad --model fails here, not once per rank
    dp, sp = resolve_layout(cfg.dp, cfg.sp, None)
    world = dp * sp
    if device == "cuda" and world > torch.cuda.device_count():
        raise SystemExit(
            f"--dp {dp} x --sp {sp} needs {world} GPUs, found {torch.cuda.device_count()}"
        )
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cpus or 1) // world)
    port = free_port()
    logger.info("spawning %d ranks on %s (%d threads each), port %d", world, device, threads, port)
    mp.start_processes(
        _spawned,
        args=(world, port, threads, dataclasses.replace(cfg, dp=dp, sp=sp, device=device)),
        nprocs=world,
        start_method="spawn",
    )


def _spawned(rank: int, world: int, port: int, threads: int, cfg: TrainConfig) -> None:
    """Entry point of a spawned rank: set the torchrun-style environment, then train."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(threads)
    run_worker(cfg)
