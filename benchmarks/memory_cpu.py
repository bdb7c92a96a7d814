"""Peak memory and step time per rank of autosp's memory options, on CPU with 2 gloo ranks.

The model and tokens of ``../shared/reference/cpu_side_by_side.py`` (a Llama shape: 4 layers,
hidden 256, 8 heads, 4 KV heads, vocab 32,000, fp32, random weights; batch 1; ``labels`` =
``input_ids``), parallelized with Inductor. Each configuration runs in fresh processes; per
rank it records the step's peak RSS growth (sampled every 2 ms, the reference's measure) and
the median step time after one warm-up step (the slowest rank's). Then, per configuration,
the slope of the peak per 1k tokens per rank (a line through the two longest lengths) and the
longest context that fits a memory size by that line.

    python benchmarks/memory_cpu.py --out benchmarks/results/memory_cpu.json
    python benchmarks/memory_cpu.py --seqs 2048 4096 --steps 2   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
CONFIGS: dict[str, dict[str, Any]] = {
    "whole logits (chunk_loss=False, recompute='off')": {"chunk_loss": False, "recompute": "off"},
    "chunked loss (recompute='off')": {"recompute": "off"},
    "chunked loss + HF gradient checkpointing (recompute='off')": {
        "hf_checkpointing": True,
        "recompute": "off",
    },
    "defaults (chunked loss, recompute='cheap')": {},
    "chunked loss + recompute='layers'": {"recompute": "layers"},
    "chunked loss + recompute='full'": {"recompute": "full"},
    "defaults + tiled MLP (tile_mlp=True)": {"tile_mlp": True},
    "MLP 4x wider: defaults": {"intermediate_size": 4096},
    "MLP 4x wider: defaults + tiled MLP (tile_mlp=True)": {
        "intermediate_size": 4096,
        "tile_mlp": True,
    },
    "MLP 4x wider: defaults + tiled MLP, 1024-token chunks": {
        "intermediate_size": 4096,
        "tile_mlp": True,
        "mlp_chunk_tokens": 1024,
    },
}
"""autosp options per configuration; ``hf_checkpointing`` calls the model's
``gradient_checkpointing_enable()`` first; ``intermediate_size`` replaces the reference's MLP
width (1,024), for a model whose MLP activations outweigh the rest."""


class PeakRSS:
    """Peak growth of this process's resident memory (MiB) while the block runs."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _poll(self) -> None:
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *_: Any) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self._rss())
        self.growth = self.peak - self.base


def _model(intermediate_size: int = 1024) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=intermediate_size,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1 << 20,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).train()


def _run(rank: int, port: int, options: dict, seq: int, steps: int, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    import autosp

    torch.manual_seed(0)
    options = dict(options)
    model = _model(options.pop("intermediate_size", 1024))
    if options.pop("hf_checkpointing", False):
        model.gradient_checkpointing_enable()
    parallel = autosp.parallelize(model, backend="inductor", **options)
    ids = torch.randint(0, 32000, (1, seq), generator=torch.Generator().manual_seed(1))
    times, growth, losses = [], [], []
    for _ in range(steps + 1):
        dist.barrier()
        start = time.perf_counter()
        with PeakRSS() as peak:
            out = parallel(input_ids=ids, labels=ids)
            out.loss.backward()
            losses.append(out.loss.item())
        times.append(time.perf_counter() - start)
        growth.append(peak.growth)
        model.zero_grad(set_to_none=True)
    queue.put(
        {
            "rank": rank,
            "step_s": statistics.median(times[1:]),
            "first_s": times[0],
            "rss_growth_mib": max(growth[1:]),
            "loss": losses[0],
            "plan": [line for p in parallel.plans for line in p.loss + p.mlp],
        }
    )
    dist.destroy_process_group()


def measure(options: dict, seq: int, steps: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        ctx.Process(target=_run, args=(r, port, options, seq, steps, queue)) for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    ranks = sorted((queue.get() for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    return {
        "seq": seq,
        "step_s": round(max(r["step_s"] for r in ranks), 3),
        "first_s": round(max(r["first_s"] for r in ranks), 1),
        "rss_growth_mib": [round(r["rss_growth_mib"]) for r in ranks],
        "loss": ranks[0]["loss"],
        "plan": ranks[0]["plan"],
    }


def fit(rows: list[dict[str, Any]], memory_mib: float) -> dict[str, float]:
    """Slope (MiB per 1k tokens per rank) through the two longest lengths, and the longest
    total context whose predicted peak growth fits ``memory_mib`` per rank (None when the
    peak did not grow)."""
    (a, b) = sorted(rows, key=lambda r: r["seq"])[-2:]
    per_rank = [r["seq"] / WORLD / 1000 for r in (a, b)]
    peaks = [max(r["rss_growth_mib"]) for r in (a, b)]
    slope = (peaks[1] - peaks[0]) / (per_rank[1] - per_rank[0])
    fixed = peaks[1] - slope * per_rank[1]
    longest = int((memory_mib - fixed) / slope * 1000 * WORLD) if slope > 0 else None
    return {"slope_mib_per_1k": round(slope, 1), "fixed_mib": round(fixed), "longest": longest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument(
        "--memory-gib", type=float, default=10.0, help="memory per rank for the longest context"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    record = run_header("memory_cpu.py")
    for name in args.configs:
        rows = []
        for seq in args.seqs:
            row = measure(CONFIGS[name], seq, args.steps)
            rows.append(row)
            print(json.dumps({"config": name, **row}), flush=True)
        fitted = fit(rows, args.memory_gib * 1024) if len(rows) > 1 else {}
        record["results"][name] = {"rows": rows, **fitted}
        print(json.dumps({"config": name, **fitted}), flush=True)
        if args.out:  # after each configuration, so a run cut short keeps what it measured
            args.out.write_text(json.dumps(record, indent=1) + "\n")


def run_header(script: str) -> dict[str, Any]:
    """What a results file records about its run: command, machine, versions, date."""
    import transformers

    return {
        "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.node()}",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
        "results": {},
    }


if __name__ == "__main__":
    main()
