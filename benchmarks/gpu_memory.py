"""Memory slope and longest context on one GPU: hand-written baselines against autosp.

Rank 0 of a sequence-parallel group of 8, emulated in one process with torch's fake process
group (per-rank memory and compute are real; collectives move no data and take no time), on a
Llama-3.2-1B-shaped model (vocab 128,256, hidden 2048, 16 layers, 32 heads, 8 KV heads, bf16,
random weights). Three modes, each in its own child process, at 16k, 32k and 64k tokens per
rank (a warm-up step, then a timed one):

(a) hand-written Ulysses (an HF attention function with all-to-alls) + HF full gradient
    checkpointing, the model called on rank 0's shard (``gpu_check.py``'s baseline);
(b) the same + a hand-written chunked loss (4096-token chunks of the head and the
    cross-entropy, each checkpointed: ALST's tiled loss);
(c) autosp's defaults called with the full batch; then, as the defaults
    (``recompute="auto"``) switch to ``recompute="full"`` past a length (Note [Recomputation by
    length]), the line of ``"full"`` at the two longest sizes (one step each): (c)'s longest
    context is predicted on it where ``"auto"`` runs ``"full"``;
(d) (c) with ``Config(offload=True)``: the layers' saved activations in pinned host memory
    between the forward and the backward (needs torch >= 2.12; not in the default modes, which
    fill the 10 minutes: ``--modes c d`` compares the two).

Per mode: peak ``torch.cuda.max_memory_allocated`` per size, the slope per 1k tokens per rank
through the two longest sizes that ran, the longest total context that slope predicts in 97%
of the device's memory, and the step time at 64k per rank (524,288 tokens in all). On a CPU
(``--device cpu``) sizes are small and memory is the RSS growth: a check that it runs.

    python benchmarks/gpu_memory.py --out $OUT                 # the GPU machine, < 10 minutes
    python benchmarks/gpu_memory.py --device cpu --out /tmp/gm  # small sizes on a CPU
    python benchmarks/gpu_memory.py --modes c d --out $OUT     # offload against (c)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import queue as queue_module
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check  # noqa: E402 - the baseline attention and the timed step are shared

SETUP = {
    "cuda": {"model": gpu_check.SIZES["cuda"]["p2"], "sizes": [16384, 32768, 65536], "sp": 8},
    "cpu": {"model": gpu_check.SIZES["cpu"]["p2"], "sizes": [128, 256, 512], "sp": 8},
}
BUDGET_S = {"a": 130.0, "b": 130.0, "c": 300.0, "d": 240.0}
"""Wall-clock per mode on the GPU (10 minutes in all with start-up); 4x on a CPU."""
LOSS_CHUNK = 4096
LABELS = {
    "a": "(a) hand-written Ulysses + HF full checkpointing",
    "b": "(b) (a) + hand-written chunked loss",
    "c": "(c) autosp defaults",
    "d": "(d) (c) + offload of saved activations to host memory",
}


def _chunked_loss(model: Any, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(b)'s loss: the decoder, then head + cross-entropy over checkpointed token chunks."""
    hidden = model.model(input_ids=ids, position_ids=positions).last_hidden_state
    labels = F.pad(ids, (0, 1), value=-100)[:, 1:]

    def piece(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = model.lm_head(h).float()
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[1], LOSS_CHUNK):
        chunk = slice(start, start + LOSS_CHUNK)
        total = total + checkpoint(piece, hidden[:, chunk], labels[:, chunk], use_reentrant=False)
    return total / (labels != -100).sum()


def _mode(mode: str, device_name: str, deadline: float, queue: Any) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import AttentionInterface, LlamaForCausalLM

    def send(kind: str, **payload: Any) -> None:
        queue.put({"mode": mode, "kind": kind, **payload})

    try:
        setup = SETUP[device_name]
        device, sp = torch.device(device_name), setup["sp"]
        dist.init_process_group("fake", rank=0, world_size=sp, store=FakeStore())
        gpu_check._GROUP = dist.group.WORLD
        attn = "sdpa"
        if mode in ("a", "b"):
            AttentionInterface.register("gpu_memory_ulysses", gpu_check._ulysses_attention)
            attn = "gpu_memory_ulysses"
        config = gpu_check._llama_config(
            setup["model"],
            max_position_embeddings=1 << 21,
            rope_theta=500000.0,
            attn_implementation=attn,
        )

        def build(recompute: str) -> tuple[Any, Any]:
            """The model, and what a step calls: the model itself or autosp's wrapper."""
            torch.manual_seed(0)
            with torch.device(device):
                model = LlamaForCausalLM(config).to(torch.bfloat16)
            model.train()
            if mode in ("a", "b"):
                model.gradient_checkpointing_enable()
                return model, model
            import autosp

            target = autosp.parallelize(
                model, group=dist.group.WORLD, offload=mode == "d", recompute=recompute
            )
            return model, target

        def measure(model: Any, target: Any, tokens: int, timed: bool) -> dict[str, Any]:
            gen = torch.Generator().manual_seed(1)
            full = torch.randint(0, setup["model"]["vocab"], (1, tokens * sp), generator=gen)
            ids = (full if mode in ("c", "d") else full[:, :tokens]).to(device)
            positions = torch.arange(tokens, device=device)[None]

            def run() -> float:
                if mode == "a":
                    loss = target(input_ids=ids, labels=ids, position_ids=positions)["loss"]
                elif mode == "b":
                    loss = _chunked_loss(model, ids, positions)
                else:
                    loss = target(input_ids=ids, labels=ids)["loss"]
                loss.backward()
                value = loss.item()
                del loss
                model.zero_grad(set_to_none=True)
                return value

            entry: dict[str, Any] = {"tokens_per_rank": tokens, "total_tokens": tokens * sp}
            entry["first"] = gpu_check._timed_step(run, device)
            if (
                timed
                and entry["first"]["status"] == "ok"
                and deadline - time.time() > entry["first"]["seconds"] * 1.2 + 10
            ):
                entry["timed"] = gpu_check._timed_step(run, device)
            return entry

        model, target = build("auto")
        for tokens in setup["sizes"]:
            entry = measure(model, target, tokens, timed=True)
            send("size", entry=entry)
            if entry["first"]["status"] != "ok" or time.time() > deadline:
                break
        if mode in ("c", "d"):
            plans = target.plans
            lines = {line for p in plans for line in p.loss + p.recompute + p.offload}
            send("plans", lines=sorted(lines))
            limits = [p.auto_limits for p in plans if p.auto_limits is not None]
            send("auto_limits", lines=list(limits[0]) if limits else None)
        if mode == "c":  # the line of the policy that auto runs at the longest lengths
            del model, target
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            model, target = build("full")
            for tokens in setup["sizes"][-2:]:
                if time.time() > deadline:
                    break
                send("full_size", entry=measure(model, target, tokens, timed=False))
    except Exception as err:  # noqa: BLE001 - reported by the parent
        send("error", error=str(err)[:300], trace=traceback.format_exc()[-3000:])
    send("done")


def _fit(entries: list[dict[str, Any]], memory_gib: float, key: str, sp: int) -> dict:
    ok = [e for e in entries if e["first"]["status"] == "ok"]
    if len(ok) < 2:
        return {}
    a, b = ok[-2:]
    peaks = [(e.get("timed") or e["first"])[key] for e in (a, b)]
    per_rank = [e["tokens_per_rank"] / 1000 for e in (a, b)]
    slope = (peaks[1] - peaks[0]) / (per_rank[1] - per_rank[0])
    fixed = peaks[1] - slope * per_rank[1]
    longest = int((0.97 * memory_gib - fixed) / slope * 1000 * sp) if slope > 0 else None
    return {"slope_gib_per_1k": round(slope, 4), "fixed_gib": round(fixed, 2), "longest": longest}


def _predicted(found: dict[str, Any], sp: int) -> int | None:
    """(c)'s longest context: on the line of ``recompute="full"`` where ``"auto"`` runs it
    (past its ``"layers"`` limit, in tokens per rank), else on the defaults' own line."""
    full, limits = found["full_line"].get("longest"), found.get("auto_limits")
    if full is not None and limits and full // sp > limits[-1]:
        return full
    return found.get("longest")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--modes", nargs="*", default=["a", "b", "c"], choices=sorted(LABELS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.device == "cuda":
        memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
        key = "peak_gib"
    else:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        key = "peak_rss_growth_gib"
    record: dict[str, Any] = {
        "command": "python benchmarks/gpu_memory.py " + " ".join(sys.argv[1:]),
        "device": gpu_check._device_name(args.device),
        "memory_gib": round(memory_gib, 1),
        "versions": gpu_check._versions(),
        "emulation": "rank 0 of SP=8 on torch's fake process group: communication not included",
        "modes": {},
    }
    print(json.dumps({k: v for k, v in record.items() if k != "modes"}), flush=True)
    ctx = mp.get_context("spawn")
    scale = 1.0 if args.device == "cuda" else 4.0
    for mode in args.modes:
        queue = ctx.Queue()
        deadline = time.time() + BUDGET_S[mode] * scale
        child = ctx.Process(target=_mode, args=(mode, args.device, deadline, queue))
        child.start()
        found: dict[str, Any] = {"label": LABELS[mode], "sizes": []}
        while True:
            try:
                msg = queue.get(timeout=max(1.0, deadline + 60 - time.time()))
            except queue_module.Empty:
                found["error"] = "no answer before the deadline"
                break
            if msg["kind"] == "done":
                break
            if msg["kind"] in ("size", "full_size"):
                found.setdefault(msg["kind"] + "s", []).append(msg["entry"])
                print(json.dumps({"mode": mode, msg["kind"]: msg["entry"]}), flush=True)
            else:
                found[msg["kind"]] = msg.get("lines") or msg.get("error")
                print(json.dumps(msg)[:2000], flush=True)
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
        sp = SETUP[args.device]["sp"]
        found.update(_fit(found["sizes"], memory_gib, key, sp))
        if "full_sizes" in found:
            found["full_line"] = _fit(found["full_sizes"], memory_gib, key, sp)
            found["predicted_longest"] = _predicted(found, sp)
        summary = {k: v for k, v in found.items() if k not in ("sizes", "full_sizes")}
        print(json.dumps({"mode": mode, **summary}))
        record["modes"][mode] = found
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu_memory.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
