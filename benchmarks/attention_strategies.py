"""Step time and peak memory per rank of the attention strategies, on CPU with gloo.

Each configuration runs in fresh processes (so the peak resident memory is its own): the
built-in ``tiny`` Llama preset, batch 1, one warm-up step (compilation), then ``--steps``
timed forward+backward+AdamW steps. Writes a JSON file and prints a Markdown table.

    python benchmarks/attention_strategies.py --out benchmarks/results/attention_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CONFIGS = [
    # (ranks, strategy, seq_len, recognise_masks, load_balance, packed documents)
    (2, "ulysses", 8192, True, True, 1),
    (2, "ring", 8192, True, True, 1),
    (2, "ring", 8192, True, False, 1),
    (2, "ulysses", 32768, True, True, 1),
    (2, "ring", 32768, True, True, 1),
    (2, "ring", 32768, True, False, 1),
    (2, "ulysses", 32768, False, True, 1),
    (2, "ring", 32768, False, True, 1),
    # Four documents packed in each sequence (positions restart): a structured mask.
    (2, "ulysses", 32768, True, True, 4),
    (2, "ring", 32768, True, True, 4),
    # Hybrid needs at least 4 ranks (Ulysses over 2 x ring over 2): on 2 cores, 8k tokens.
    (4, "ulysses", 8192, True, True, 1),
    (4, "hybrid", 8192, True, True, 1),
    (4, "ring", 8192, True, True, 1),
]


def _run(rank: int, world: int, port: int, cfg: dict[str, Any], queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from transformers import AutoModelForCausalLM

    import autosp
    from autosp.train import presets

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(presets.model_config(cfg["model"]))
    parallel = autosp.parallelize(
        model,
        backend=cfg["backend"],
        attention=cfg["strategy"],
        recognise_masks=cfg["recognise_masks"],
        load_balance=cfg["load_balance"],
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seq_len, documents = cfg["seq_len"], cfg["documents"]
    ids = torch.randint(0, 256, (1, seq_len), generator=torch.Generator().manual_seed(0))
    extra = {}
    if documents > 1:
        extra["position_ids"] = torch.arange(seq_len).remainder(seq_len // documents)[None]
    times = []
    for _ in range(cfg["steps"] + 1):
        start = time.perf_counter()
        parallel(input_ids=ids, labels=ids, **extra).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.barrier()
        times.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(
        {
            "rank": rank,
            "first_step_s": times[0],
            "step_s": statistics.median(times[1:]),
            "peak_rss_mib": peak_mib,
            "attention": [line for plan in parallel.plans for line in plan.attention][-1],
        }
    )
    dist.destroy_process_group()


def run_config(cfg: dict[str, Any], world: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_run, args=(r, world, port, cfg, queue)) for r in range(world)]
    for p in procs:
        p.start()
    ranks = sorted((queue.get() for _ in range(world)), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    return {
        **cfg,
        "step_s": max(r["step_s"] for r in ranks),
        "first_step_s": max(r["first_step_s"] for r in ranks),
        "peak_rss_mib_per_rank": [round(r["peak_rss_mib"]) for r in ranks],
        "attention": ranks[0]["attention"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--backend", default="aot_eager")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--rows",
        default="",
        help="comma-separated indices into CONFIGS to run again; the other rows are kept "
        "from --out",
    )
    args = parser.parse_args()
    rows = [int(i) for i in args.rows.split(",")] if args.rows else range(len(CONFIGS))
    previous = json.loads(args.out.read_text()) if args.rows else {}
    results = previous.get("results", [])
    for row in rows:
        world, strategy, seq_len, recognise, balance, documents = CONFIGS[row]
        cfg = {
            "world": world,
            "strategy": strategy,
            "seq_len": seq_len,
            "recognise_masks": recognise,
            "load_balance": balance,
            "documents": documents,
            "model": args.model,
            "backend": args.backend,
            "steps": args.steps,
        }
        result = run_config(cfg, world)
        print(json.dumps(result), flush=True)
        same = [i for i, r in enumerate(results) if all(r.get(k) == v for k, v in cfg.items())]
        if same:
            results[same[0]] = result
        else:
            results.append(result)
    import transformers

    command = "python benchmarks/attention_strategies.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if v != ""
    )
    report = {
        "command": previous.get("command", command),
        **({"rerun": command} if args.rows else {}),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| ranks | strategy | tokens | mask | step (s) | peak RSS per rank (MiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        mask = "recognised (is_causal)" if r["recognise_masks"] else "dense S x S"
        if r["documents"] > 1:
            mask = f"{r['documents']} documents, " + (
                "structured" if r["recognise_masks"] else "dense S x S"
            )
        strategy = r["strategy"]
        if strategy != "ulysses":
            strategy += " (zigzag)" if "zigzag" in r["attention"] else " (contiguous)"
        peak = " / ".join(str(m) for m in r["peak_rss_mib_per_rank"])
        print(
            f"| {r['world']} | {strategy} | {r['seq_len']} | {mask} | {r['step_s']:.2f} | {peak} |"
        )


if __name__ == "__main__":
    main()
