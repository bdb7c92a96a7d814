"""``autosp plan``'s traced peak against the peak measured on 2 CPU gloo ranks.

The model, tokens and options of ``memory_cpu.py`` (Llama shape: 4 layers, hidden 256,
vocab 32,000, fp32, batch 1, ``labels=input_ids``, no optimizer step, gradients set to None
between steps). Per configuration and length:

* measured, 2 gloo ranks in fresh processes, ``--backend`` (Inductor by default, what
  ``memory_cpu.py`` runs): after a warm-up step (compilation), one step's peak of *live
  tensor bytes* allocated in it, rebuilt from torch's CPU allocator events
  (``torch.profiler`` with ``profile_memory=True``; ``_allocated_peak`` says how frees made
  on gloo's threads, which the profiler does not see, are restored), and another step's
  peak RSS growth (sampled every 2 ms, ``memory_cpu.py``'s measure, which also holds the
  allocator's and glibc's caching and the runtime's own memory). Both: the larger of the
  two ranks.
* planned: ``autosp.plan`` traces rank 0's step on fake tensors (``aot_eager``, op by op);
  the planned growth is the traced peak less the weights live before the step.

The error ``planned / measured - 1`` is given against both measures; issue 8 asks for 15%.

    python benchmarks/plan_vs_measured.py --out benchmarks/results/plan_vs_measured_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_cpu import CONFIGS, WORLD, PeakRSS, _model, run_header  # noqa: E402 - the benchmark's model

MIB = 2**20
PLANNED_OPTIONS = {"chunk_loss", "recompute"}
"""The options ``planned`` passes on to the planner: configurations with others (tiling, a
wider MLP, HF checkpointing) are not compared."""
DEFAULT_CONFIGS = [
    "defaults (chunked loss, recompute='cheap')",
    "chunked loss (recompute='off')",
    "whole logits (chunk_loss=False, recompute='off')",
    "chunked loss + recompute='layers'",
    "chunked loss + recompute='full'",
]


def _allocated_peak(trace: Path) -> tuple[int, int]:
    """The peak of live CPU tensor bytes in a profiler trace, and how many frees it restored.

    The profiler records an allocator event only on threads it follows: a buffer that gloo's
    worker thread releases last (the send and receive buffers of a synchronous collective,
    which the finished work object still holds) is never seen freed, and the trace's running
    "Total Allocated" drifts up by it for the rest of the step. So the live bytes are rebuilt
    from the events: an allocation with no free before its address is allocated again (or the
    trace ends) that was made inside one of autosp's ops is taken as freed when that op
    returns (the op's own temporaries); any other is left live, an overestimate."""
    events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
        key=lambda e: e["ts"],
    )
    autosp_ops = [e for e in events if e.get("ph") == "X" and e["name"].startswith("autosp::")]
    changes: list[tuple[float, int]] = []
    open_allocs: dict[int, dict] = {}
    restored = 0

    def unseen_free(alloc: dict) -> None:
        nonlocal restored
        ends = [
            op["ts"] + op["dur"]
            for op in autosp_ops
            if op.get("tid") == alloc.get("tid") and op["ts"] <= alloc["ts"] <= op["ts"] + op["dur"]
        ]
        if ends:  # freed when the innermost of autosp's ops that made it returned
            changes.append((min(ends), -alloc["args"]["Bytes"]))
            restored += 1

    for e in memory:
        nbytes, addr = e["args"]["Bytes"], e["args"]["Addr"]
        if nbytes > 0:
            if addr in open_allocs:
                unseen_free(open_allocs[addr])
            open_allocs[addr] = e
            changes.append((e["ts"], nbytes))
        elif open_allocs.pop(addr, None) is not None:
            changes.append((e["ts"], nbytes))
    for alloc in open_allocs.values():
        unseen_free(alloc)
    live = peak = 0
    for _, nbytes in sorted(changes, key=lambda c: c[0]):  # stable: the trace's order
        live += nbytes
        peak = max(peak, live)
    return peak, restored


def _run(rank: int, port: int, options: dict, seqs: list[int], backend: str, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    import autosp

    torch.manual_seed(0)
    model = _model()
    parallel = autosp.parallelize(model, backend=backend, **options)
    found = {}
    for seq in seqs:  # the sequence is dynamic: one compilation for all lengths
        ids = torch.randint(0, 32000, (1, seq), generator=torch.Generator().manual_seed(1))

        def step(ids: torch.Tensor = ids) -> None:
            out = parallel(input_ids=ids, labels=ids)
            out.loss.backward()
            del out
            model.zero_grad(set_to_none=True)

        step()  # compiles (first length), warms the allocator at this length
        dist.barrier()
        with PeakRSS() as peak:
            step()
        dist.barrier()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
            ) as prof:
                step()
            prof.export_chrome_trace(str(path))
            allocated, restored = _allocated_peak(path)
        found[seq] = {
            "rss_growth_mib": peak.growth,
            "allocated_mib": allocated / MIB,
            "unseen_frees": restored,
        }
    queue.put({"rank": rank, "found": found})
    dist.destroy_process_group()


def measure(options: dict, seqs: list[int], backend: str) -> dict[int, dict[str, Any]]:
    """Per length: the step's peak growth per rank (MiB), allocator and RSS."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        ctx.Process(target=_run, args=(r, port, options, seqs, backend, queue))
        for r in range(WORLD)
    ]
    for p in procs:
        p.start()
    ranks = sorted((queue.get() for _ in procs), key=lambda r: r["rank"])
    for p in procs:
        p.join()
    return {
        seq: {
            key: [round(r["found"][seq][key]) for r in ranks]
            for key in ("allocated_mib", "rss_growth_mib", "unseen_frees")
        }
        for seq in seqs
    }


def planned(options: dict, seqs: list[int]) -> dict[int, dict[str, Any]]:
    """The planner's growth (traced peak less the weights) per length, in MiB."""
    from autosp.plan.planner import PlanSettings, emulate

    settings = PlanSettings(
        memory_gib=1.0,
        sp=WORLD,
        dtype="fp32",
        optimizer="none",
        chunk_loss=options.get("chunk_loss", True),
        recompute=options.get("recompute", "cheap"),
    )
    rows = {}
    start = time.perf_counter()
    with emulate(_model().config, settings) as emulator:
        compile_s = time.perf_counter() - start
        for seq in seqs:
            begin = time.perf_counter()
            memory = emulator.trace(seq)
            parts = memory.breakdown
            rows[seq] = {
                "growth_mib": round((memory.peak - parts["weights"]) / MIB),
                "breakdown_mib": {k: round(v / MIB) for k, v in parts.items()},
                "peak_phase": memory.peak_phase,
                "trace_s": round(time.perf_counter() - begin, 1),
                "compile_s": round(compile_s, 1),
            }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384])
    traceable = [name for name, options in CONFIGS.items() if set(options) <= PLANNED_OPTIONS]
    parser.add_argument("--configs", nargs="*", default=DEFAULT_CONFIGS, choices=traceable)
    parser.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    record: dict[str, Any] = {
        **run_header("plan_vs_measured.py"),
        "measured_backend": args.backend,
        "compared": "planned = traced peak on rank 0 less the weights; measured = the step's "
        "peak growth per rank (max of 2): allocator live bytes (profiler) and RSS",
    }
    for name in args.configs:
        options = CONFIGS[name]
        plan_rows = planned(options, args.seqs)
        measured = measure(options, args.seqs, args.backend)
        rows = []
        for seq in args.seqs:
            found = measured[seq]
            plan_mib = plan_rows[seq]["growth_mib"]
            row = {
                "seq": seq,
                "planned_mib": plan_mib,
                "measured": found,
                "error_vs_allocated": round(plan_mib / max(found["allocated_mib"]) - 1, 3),
                "error_vs_rss": round(plan_mib / max(found["rss_growth_mib"]) - 1, 3),
                "plan": plan_rows[seq],
            }
            rows.append(row)
            print(json.dumps({"config": name, **row}), flush=True)
        record["results"][name] = rows
        if args.out:
            args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
