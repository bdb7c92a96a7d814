"""One rank of the ``autosp train`` job: the training loop.

Terminal output: rank 0 draws one progress bar whose postfix carries the step's loss, tokens/s
and peak memory; every step's numbers go to the report, not to the log, so no line lands
between the bar's redraws (in a terminal each would push the bar down a line, and where stderr
is a file or a pipe every redraw would become a line of its own between them). The few log
lines of rank 0 (compilation plans, warnings) are written above the bar through
``logging_redirect_tqdm``; the other ranks, which cannot clear rank 0's bar, log errors only.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import AutoModelForCausalLM

import autosp
from autosp.integrations import sharded
from autosp.mesh import sequence_parallel_mesh
from autosp.train import data, presets, report

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of one training run (the ``autosp train`` flags)."""

    sp: int | None
    dp: int | None
    seq_len: int
    steps: int
    batch_size: int
    lr: float
    model: str
    device: str  # "cpu" or "cuda" once the launcher has resolved "auto"
    backend: str
    seed: int
    out: str
    shard_params: bool = False
    """Parameters sharded over ``dp x sp`` and gathered in the graph (``autosp.integrations.
    sharded``) instead of a whole copy per rank."""


def peak_memory_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def gather_floats(value: float, device: torch.device) -> list[float]:
    """``value`` from every rank, in rank order."""
    local = torch.tensor([value], dtype=torch.float64, device=device)
    values = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(values, local)
    return [v.item() for v in values]


def run_worker(cfg: TrainConfig) -> None:
    """Join the process group from the torchrun-style environment and train."""
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.ERROR,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.captureWarnings(True)  # warnings.warn through the handlers, above the bar
    if cfg.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        train(cfg, device)
    finally:
        dist.destroy_process_group()


def train(cfg: TrainConfig, device: torch.device) -> None:
    """Train ``cfg.model`` on the ``dp x sp`` mesh over the default process group: each
    sequence-parallel group on its own share of every step's batches."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = sequence_parallel_mesh(cfg.sp, dp=cfg.dp, device_type=device.type)
    config = presets.model_config(cfg.model)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "model %s: %.2fM parameters; %d ranks (dp %d x sp %d) on %s; seq_len %d; backend %s",
        cfg.model,
        n_params / 1e6,
        world,
        cfg.dp,
        cfg.sp,
        device.type,
        cfg.seq_len,
        cfg.backend,
    )
    if cfg.shard_params:
        model = sharded.shard(model, mesh, backend=cfg.backend)
    else:
        model = autosp.parallelize(model, mesh=mesh, backend=cfg.backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    batches = data.batches(cfg.seq_len, cfg.batch_size, seed=cfg.seed, mesh=mesh)
    tokens = cfg.dp * cfg.batch_size * cfg.seq_len  # every data-parallel group's

    logger.info("step 1 includes compilation")
    history: list[report.StepStats] = []
    with logging_redirect_tqdm():
        bar = tqdm(range(1, cfg.steps + 1), desc="train", unit="step", disable=rank != 0)
        for step in bar:
            ids = next(batches).to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # The loss over all data-parallel groups' tokens, the same on every rank
            # (Config.dp_mean); reading it waits for the device.
            loss_value = loss.item()
            elapsed = time.perf_counter() - start
            stats = report.StepStats(
                step=step,
                loss=loss_value,
                time_s=elapsed,
                tokens_per_s=tokens / elapsed,
                peak_mem_mib=gather_floats(peak_memory_mib(device), device),
            )
            history.append(stats)
            bar.set_postfix(
                loss=f"{loss_value:.4f}",
                tok_s=f"{stats.tokens_per_s:.0f}",
                peak_mib=f"{max(stats.peak_mem_mib):.0f}",
                refresh=False,  # the bar redraws once, as the step ends
            )

    if rank == 0:
        info = {
            "config": asdict(cfg),
            "world_size": world,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "model": {"num_parameters": n_params, "config": config.to_dict()},
        }
        report.write_report(Path(cfg.out), info, history)
