"""One prepared check for a one-GPU machine: bf16 parity at 2 ranks, and one memory/time line.

Part 1 spawns 2 gloo ranks on the one device (both on ``cuda:0``, or on the CPU with
``--device cpu``). It first tries each collective autosp uses on tensors of that device (gloo
stages CUDA tensors through the host for some collectives, not necessarily all), then, per
strategy, compares the loss and every parameter gradient of a small random-init Hugging Face
model in three runs on the same bf16 weights: an fp64 single-process reference, a bf16
single-process run and autosp in bf16. PASS when autosp's error against fp64 is at most twice
the single-process bf16 error (``tests/test_low_precision.py``, TransformerEngine's criterion).

Part 2 emulates rank 0 of a sequence-parallel group of 8 in one process (torch's fake process
group: per-rank memory and compute are real, collectives move no data and take no time) for a
Llama-3.2-1B-shaped model in bf16 at 65,536 tokens per rank, and measures peak memory and step
time (forward + backward) of (a) a hand-written Ulysses baseline (an HF attention function
with all-to-alls, HF full gradient checkpointing, the model called on its shard) and (b)
autosp's defaults called with the full 524,288-token batch.

Each part runs in child processes under a wall-clock budget (the whole run defaults to 440 s on
a GPU); a child that fails, hangs or dies is reported and the script goes on.

    python benchmarks/gpu_check.py --out $OUT            # the GPU machine
    python benchmarks/gpu_check.py --device cpu --out /tmp/gc   # small sizes on a CPU
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import gc
import json
import math
import os
import platform
import queue as queue_module
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # autosp from this checkout, installed or not
    sys.path.insert(0, str(REPO))

RATIO = 2.0
"""autosp's bf16 error may be at most this multiple of the single-process bf16 error."""
FLOOR = 2.0**-12
"""Absolute slack on relative errors (as in tests/test_low_precision.py)."""
NORM_FLOOR = 1e-6
"""Reference gradient norms below this are measured absolutely."""

SIZES = {
    # Part 1: a small Llama-shaped model (and a Mistral with a sliding window shorter than
    # the sequence); part 2: a Llama-3.2-1B shape on the GPU, a tiny one on the CPU.
    "cuda": {
        "p1": dict(hidden=128, heads=4, kv_heads=2, intermediate=256, layers=2, vocab=1024),
        "p1_batch": 2,
        "p1_seq": 2048,
        "p1_window": 256,
        "p2": dict(hidden=2048, heads=32, kv_heads=8, intermediate=8192, layers=16, vocab=128256),
        "p2_tokens_per_rank": 65536,
        "p2_sp": 8,
        "budget_s": 440.0,
        "p1_budget_s": 170.0,
        "baseline_reserve_s": 80.0,
    },
    "cpu": {
        "p1": dict(hidden=64, heads=4, kv_heads=2, intermediate=128, layers=2, vocab=96),
        "p1_batch": 2,
        "p1_seq": 64,
        "p1_window": 8,
        "p2": dict(hidden=128, heads=8, kv_heads=2, intermediate=256, layers=2, vocab=1024),
        "p2_tokens_per_rank": 256,
        "p2_sp": 8,
        "budget_s": 1800.0,
        "p1_budget_s": 1000.0,
        "baseline_reserve_s": 200.0,
    },
}

# Part 1 cases: (name, model, strategy, collectives the strategy needs).
CASES = [
    ("ulysses", "llama", "ulysses", ("all_reduce", "all_to_all_single")),
    ("ulysses+sliding_window", "mistral_sw", "ulysses", ("all_reduce", "all_to_all_single")),
    ("ring", "llama", "ring", ("all_reduce", "all_to_all_single", "batch_isend_irecv")),
    (
        "ring+sliding_window",
        "mistral_sw",
        "ring",
        ("all_reduce", "all_to_all_single", "batch_isend_irecv"),
    ),
]
P2P = "batch_isend_irecv"
"""Probed after the Ulysses cases: a send/recv of device tensors that gloo cannot carry might
take the rank down, and the Ulysses results should come back first."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:400]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _versions() -> dict[str, str]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "transformers": transformers.__version__,
    }


def _device_name(device: str) -> str:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.1f} GiB)"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _llama_config(size: dict[str, int], **extra: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        use_cache=False,
        **extra,
    )


# --------------------------------------------------------------------------- part 1


def _build_small(kind: str, size: dict[str, int], window: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    if kind == "llama":
        return transformers.LlamaForCausalLM(_llama_config(size, attn_implementation="sdpa"))
    config = transformers.MistralConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        sliding_window=window,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return transformers.MistralForCausalLM(config)


def _batch(batch: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels; -100 on a leading block, so the ranks hold different numbers of
    labels (as tests/workers.make_batch)."""
    gen = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[0, : seq // 2 + 1] = -100
    if batch > 1:
        labels[1, -3:] = -100
    return ids, labels


def _rel(value: torch.Tensor, ref: torch.Tensor) -> float:
    return ((value.double() - ref).norm() / ref.norm().clamp(min=NORM_FLOOR)).item()


def _probe(name: str, device: torch.device) -> str:
    """Run collective ``name`` over the 2 ranks on tensors of ``device``; 'ok', or what
    went wrong."""
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if name == "all_reduce":
            t = torch.full((4,), float(rank + 1), device=device)
            dist.all_reduce(t)
            got, want = t, torch.full((4,), world * (world + 1) / 2, device=device)
        elif name == "all_gather_into_tensor":
            t = torch.full((2,), float(rank), device=device)
            got = torch.empty(2 * world, device=device)
            dist.all_gather_into_tensor(got, t)
            want = torch.arange(world, device=device).float().repeat_interleave(2)
        elif name == "reduce_scatter_tensor":
            t = torch.arange(2 * world, device=device).float() + rank
            got = torch.empty(2, device=device)
            dist.reduce_scatter_tensor(got, t)
            full = world * torch.arange(2 * world, device=device).float() + sum(range(world))
            want = full[2 * rank : 2 * rank + 2]
        elif name == "all_to_all_single":
            t = (rank * 10 + torch.arange(world, device=device)).float()
            got = torch.empty_like(t)
            dist.all_to_all_single(got, t)
            want = (torch.arange(world, device=device) * 10 + rank).float()
        elif name == P2P:
            t = torch.full((3,), float(rank), device=device)
            got = torch.empty_like(t)
            ops = [
                dist.P2POp(dist.isend, t, (rank + 1) % world),
                dist.P2POp(dist.irecv, got, (rank - 1) % world),
            ]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            want = torch.full((3,), float((rank - 1) % world), device=device)
        else:
            raise ValueError(name)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if got.device.type != device.type:
            return f"result came back on {got.device}"
        if not torch.equal(got.cpu(), want.cpu()):
            return f"wrong values: got {got.tolist()}, expected {want.tolist()}"
        return "ok"
    except Exception as err:  # noqa: BLE001 - reported, not raised
        return "error: " + _first_line(err)


def _bf16_case(model_kind: str, strategy: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """(autosp error, single-process bf16 error) against fp64 for the loss and every
    parameter gradient (as tests/test_low_precision.bf16_errors)."""
    import autosp

    device = torch.device(cfg["device"])
    model = _build_small(model_kind, cfg["p1"], cfg["p1_window"]).to(torch.bfloat16)
    reference = copy.deepcopy(model).double().to(device)
    single = copy.deepcopy(model).to(device)
    model.to(device)
    parallel = autosp.parallelize(model, backend=cfg["p1_backend"], attention=strategy)
    ids, labels = _batch(cfg["p1_batch"], cfg["p1_seq"], cfg["p1"]["vocab"])
    ids, labels = ids.to(device), labels.to(device)
    losses = {}
    for key, module in (("ref", reference), ("single", single), ("autosp", parallel)):
        losses[key] = module(input_ids=ids, labels=labels)["loss"]
        losses[key].backward()
    ref_loss = losses["ref"].detach()
    errors = {
        "loss": (
            _rel(losses["autosp"].detach(), ref_loss),
            _rel(losses["single"].detach(), ref_loss),
        )
    }
    params = zip(model.named_parameters(), single.parameters(), reference.parameters(), strict=True)
    missing = []
    for (name, p), s, r in params:
        if p.grad is None or s.grad is None or r.grad is None:
            missing.append(name)
            continue
        errors[name] = (_rel(p.grad, r.grad), _rel(s.grad, r.grad))
    return {
        "losses": {k: v.item() for k, v in losses.items()},
        "errors": errors,
        "missing_grads": missing,
        "grad_dtype": str(next(model.parameters()).grad.dtype),
        "gathered": sorted({op for plan in parallel.plans for op in plan.gathered_ops}),
        "attention": [line for plan in parallel.plans for line in plan.attention],
    }


def _part1_rank(rank: int, world: int, port: int, cfg: dict[str, Any], queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A rank that crashes, or still runs when its budget ends, prints its stack (stderr).
    faulthandler.enable()
    faulthandler.dump_traceback_later(max(5.0, cfg["p1_deadline"] - time.time() - 3))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))

    def send(kind: str, **payload: Any) -> None:
        queue.put({"rank": rank, "kind": kind, **payload})

    device = torch.device(cfg["device"])
    if device.type == "cuda":
        torch.cuda.set_device(0)  # both ranks on the one GPU
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=timedelta(seconds=cfg["p1_timeout_s"])
    )
    probes: dict[str, str] = {}

    def probe(name: str) -> None:
        send("step", what=f"probe {name}")
        probes[name] = _probe(name, device)
        send("probe", name=name, result=probes[name])

    for name in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor"):
        probe(name)
    probe("all_to_all_single")
    for case, model_kind, strategy, needs in CASES:
        if P2P in needs and P2P not in probes:
            probe(P2P)
        failed = [n for n in needs if probes.get(n) != "ok"]
        if failed:
            send("case", case=case, skipped=f"needs {', '.join(failed)}, which failed on {device}")
            continue
        send("step", what=f"case {case}")
        start = time.perf_counter()
        try:
            result = _bf16_case(model_kind, strategy, cfg)
            result["seconds"] = round(time.perf_counter() - start, 1)
            send("case", case=case, result=result)
        except Exception as err:  # noqa: BLE001
            send("case", case=case, error=_first_line(err), trace=traceback.format_exc()[-3000:])
    send("done")
    dist.destroy_process_group()


def _summarise_case(case: str, by_rank: dict[int, dict[str, Any]], strategy: str) -> dict:
    """One line per case from both ranks' results: the worst ratio over ranks."""
    out: dict[str, Any] = {"case": case}
    for rank, msg in sorted(by_rank.items()):
        if "skipped" in msg:
            return {**out, "status": "SKIPPED", "why": msg["skipped"]}
        if "error" in msg:
            return {**out, "status": "ERROR", "rank": rank, "error": msg["error"]}
    worst_loss, worst_grad, worst_name, ok, notes = 0.0, 0.0, "", True, []
    for rank, msg in sorted(by_rank.items()):
        r = msg["result"]
        for what, (ours, single) in r["errors"].items():
            ratio = ours / single if single > 0 else (0.0 if ours == 0 else math.inf)
            ok &= ours <= RATIO * single + FLOOR
            if what == "loss":
                worst_loss = max(worst_loss, ratio)
            elif ratio > worst_grad:
                worst_grad, worst_name = ratio, f"{what} ({ours:.2e} vs {single:.2e}, rank {rank})"
        if r["missing_grads"]:
            ok = False
            notes.append(f"rank {rank}: no gradient for {r['missing_grads'][:3]}")
        if r["gathered"]:
            notes.append(f"rank {rank} gathered {r['gathered']}")
        if r["grad_dtype"] != "torch.bfloat16":
            notes.append(f"gradients in {r['grad_dtype']}")
        if not all(strategy in line for line in r["attention"]):
            notes.append(f"attention plan: {r['attention']}")
    first = by_rank[min(by_rank)]["result"]
    return {
        **out,
        "status": "PASS" if ok else "FAIL",
        "loss_ratio": worst_loss,
        "worst_grad_ratio": worst_grad,
        "worst_grad": worst_name,
        "loss_errors_rank0": first["errors"]["loss"],
        "losses_rank0": first["losses"],
        "attention_rank0": sorted(set(first["attention"])),
        "seconds": max(m["result"]["seconds"] for m in by_rank.values()),
        "notes": notes,
    }


def part1(cfg: dict[str, Any], deadline: float, log: Any) -> dict[str, Any]:
    world = 2
    cfg = {**cfg, "p1_deadline": deadline}
    log(
        f"part 1: bf16 parity, {world} gloo ranks on {cfg['device']} (both on the one device), "
        f"backend {cfg['p1_backend']}, batch {cfg['p1_batch']} x {cfg['p1_seq']} tokens, "
        f"model {cfg['p1']}, sliding window {cfg['p1_window']}; PASS if autosp's error vs fp64 "
        f"<= {RATIO:g} x single-process bf16 error (+{FLOOR:g})"
    )
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_part1_rank, args=(r, world, port, cfg, queue), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    probes: dict[str, dict[int, str]] = {}
    cases: dict[str, dict[int, dict]] = {}
    summaries: dict[str, dict] = {}
    last_step = {r: "starting" for r in range(world)}
    done: set[int] = set()
    failures: list[str] = []
    strategies = {c[0]: c[2] for c in CASES}

    def handle(msg: dict[str, Any]) -> None:
        rank, kind = msg["rank"], msg["kind"]
        if kind == "step":
            last_step[rank] = msg["what"]
        elif kind == "probe":
            probes.setdefault(msg["name"], {})[rank] = msg["result"]
            if len(probes[msg["name"]]) == world:
                results = probes[msg["name"]]
                same = len(set(results.values())) == 1
                text = results[0]
                if not same:
                    text = "; ".join(f"rank {r}: {v}" for r, v in results.items())
                log(f"part 1: gloo {msg['name']} on {cfg['device']} tensors: {text}")
        elif kind == "case":
            cases.setdefault(msg["case"], {})[rank] = msg
            if "trace" in msg:
                failures.append(f"rank {rank} {msg['case']}:\n{msg['trace']}")
            if len(cases[msg["case"]]) == world:
                s = _summarise_case(msg["case"], cases[msg["case"]], strategies[msg["case"]])
                summaries[msg["case"]] = s
                log(_case_line(s))
        elif kind == "done":
            done.add(rank)

    while len(done) < world:
        try:
            handle(queue.get(timeout=1.0))
            continue
        except queue_module.Empty:
            pass
        dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in done]
        if time.time() > deadline:
            log(
                "part 1: TIMEOUT (budget spent); ranks were at: "
                + "; ".join(f"rank {r}: {w}" for r, w in last_step.items())
            )
            break
        if dead:
            time.sleep(0.5)
            while True:  # drain what the ranks sent before going
                try:
                    handle(queue.get_nowait())
                except queue_module.Empty:
                    break
            dead = [r for r in dead if r not in done]
            if dead:
                for r in dead:
                    log(
                        f"part 1: rank {r} DIED (exit code {procs[r].exitcode}) during "
                        f"{last_step[r]}"
                    )
                break
    for p in procs:
        if p.is_alive():
            p.terminate()
        p.join(timeout=10)
    for case in (c[0] for c in CASES):
        if case in cases and case not in summaries:  # one rank's result only
            s = _summarise_case(case, cases[case], strategies[case])
            s["notes"] = s.get("notes", []) + ["only some ranks reported"]
            summaries[case] = s
            log(_case_line(s))
        elif case not in cases:
            summaries[case] = {"case": case, "status": "NOT RUN"}
            log(f"part 1: {case}: NOT RUN")
    for text in failures:
        log("part 1: traceback of " + text.rstrip())
    return {"probes": probes, "cases": summaries}


def _case_line(s: dict[str, Any]) -> str:
    if s["status"] in ("SKIPPED", "ERROR"):
        return f"part 1: {s['case']}: {s['status']} {s.get('why') or s.get('error')}"
    ours, single = s["loss_errors_rank0"]
    line = (
        f"part 1: {s['case']}: {s['status']} loss error ratio {s['loss_ratio']:.2f} "
        f"(autosp {ours:.2e}, single bf16 {single:.2e} vs fp64), worst gradient error ratio "
        f"{s['worst_grad_ratio']:.2f} ({s['worst_grad']}); {s['seconds']} s; "
        f"attention {s['attention_rank0']}"
    )
    if s["notes"]:
        line += "; " + "; ".join(s["notes"])
    return line


# --------------------------------------------------------------------------- part 2

_GROUP: dist.ProcessGroup | None = None
"""The sequence-parallel group of the hand-written baseline's attention function."""


def _seq_head_all_to_all(x: torch.Tensor, to_heads: bool) -> torch.Tensor:
    """[B, H, S/P, D] -> [B, H/P, S, D] (``to_heads``) or back, over ``_GROUP``."""
    p = dist.get_world_size(_GROUP)
    b, h, s, d = x.shape
    if to_heads:  # chunk i of the heads goes to rank i; the sequence chunks come back
        send = x.reshape(b, p, h // p, s, d).transpose(0, 1).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=_GROUP)
        return recv.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * s, d)
    send = x.reshape(b, h, p, s // p, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=_GROUP)
    return recv.transpose(0, 1).reshape(b, p * h, s // p, d)


class _SeqHeadAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, to_heads: bool) -> torch.Tensor:
        ctx.to_heads = to_heads
        return _seq_head_all_to_all(x, to_heads)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _seq_head_all_to_all(grad.contiguous(), not ctx.to_heads), None


def _ulysses_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """HF attention function: [B, H, S/P, D] shards -> causal SDPA over the whole sequence on
    H/P heads -> [B, S/P, H, D]. Key/value heads are repeated up to a multiple of P."""
    p = dist.get_world_size(_GROUP)
    kv_heads = key.shape[1]
    if kv_heads % p:
        repeat = math.lcm(kv_heads, p) // kv_heads
        key, value = (t.repeat_interleave(repeat, dim=1) for t in (key, value))
    q, k, v = (_SeqHeadAllToAll.apply(t, True) for t in (query, key, value))
    out = F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scaling, enable_gqa=q.shape[1] != k.shape[1]
    )
    out = _SeqHeadAllToAll.apply(out, False)
    return out.transpose(1, 2).contiguous(), None


class _RssPeak:
    """Peak resident memory while running (sampled every 2 ms), for CPU runs."""

    def __enter__(self) -> _RssPeak:
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())


def _is_oom(err: BaseException) -> bool:
    while err is not None:
        if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
            return True
        err = err.__cause__ or getattr(err, "inner_exception", None)
    return False


def _timed_step(run: Any, device: torch.device) -> dict[str, Any]:
    """One forward+backward: seconds, peak memory (GiB: CUDA max allocated, or CPU RSS
    growth), or the out-of-memory / error it raised."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    result: dict[str, Any] = {}
    rss = _RssPeak() if device.type == "cpu" else None
    start = time.perf_counter()
    try:
        if rss is not None:
            with rss:
                result["loss"] = run()
        else:
            result["loss"] = run()
            torch.cuda.synchronize()
        result["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - OOM and other failures are results here
        result["status"] = "OOM" if _is_oom(err) else "error"
        result["error"] = _first_line(err)
        if result["status"] == "error":
            result["trace"] = traceback.format_exc()[-3000:]
        del err
    result["seconds"] = round(time.perf_counter() - start, 2)
    if device.type == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["before_gib"] = round(before / 2**30, 2)
    else:
        result["peak_rss_growth_gib"] = round((rss.peak - rss.start) / 2**30, 4)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _part2_mode(mode: str, cfg: dict[str, Any], deadline: float, queue: Any) -> None:
    global _GROUP
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import AttentionInterface, LlamaForCausalLM

    def send(kind: str, **payload: Any) -> None:
        queue.put({"mode": mode, "kind": kind, **payload})

    faulthandler.enable()  # a crash prints its stack (stderr)
    faulthandler.dump_traceback_later(max(5.0, deadline - time.time() + 5))
    try:
        device = torch.device(cfg["device"])
        sp, local = cfg["p2_sp"], cfg["p2_tokens_per_rank"]
        dist.init_process_group("fake", rank=0, world_size=sp, store=FakeStore())
        _GROUP = dist.group.WORLD
        attn = "sdpa"
        if mode == "baseline":
            AttentionInterface.register("gpu_check_ulysses", _ulysses_attention)
            attn = "gpu_check_ulysses"
        config = _llama_config(
            cfg["p2"],
            max_position_embeddings=1 << 21,
            rope_theta=500000.0,
            tie_word_embeddings=True,
            attn_implementation=attn,
        )
        send("step", what="building the model")
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.train()
        if mode == "baseline":
            model.gradient_checkpointing_enable()
            target = model
        else:
            import autosp

            target = autosp.parallelize(model, group=_GROUP)
        sizes = [local, local // 2]
        for i, tokens in enumerate(sizes):
            gen = torch.Generator().manual_seed(1)
            full = torch.randint(0, cfg["p2"]["vocab"], (1, tokens * sp), generator=gen)
            if mode == "baseline":  # rank 0's shard and its positions
                ids = full[:, :tokens].to(device)
                kwargs = dict(input_ids=ids, labels=ids, position_ids=torch.arange(tokens)[None])
                kwargs["position_ids"] = kwargs["position_ids"].to(device)
            else:  # the full batch; autosp shards it
                ids = full.to(device)
                kwargs = dict(input_ids=ids, labels=ids)

            def run(kwargs: dict = kwargs) -> float:
                loss = target(**kwargs)["loss"]
                loss.backward()
                value = loss.item()
                del loss
                model.zero_grad(set_to_none=True)
                return value

            send("step", what=f"first step at {tokens} tokens per rank")
            first = _timed_step(run, device)
            entry = {"tokens_per_rank": tokens, "total_tokens": tokens * sp, "first": first}
            if first["status"] == "ok":
                left = deadline - time.time()
                if left > first["seconds"] + 15:
                    send("step", what=f"timed step at {tokens} tokens per rank")
                    entry["timed"] = _timed_step(run, device)
                else:
                    entry["timed_skipped"] = f"{left:.0f} s left, first step {first['seconds']} s"
            send("size", entry=entry)
            if first["status"] != "OOM" or i + 1 == len(sizes):
                break
            if deadline - time.time() < 30:
                send("size", entry={"tokens_per_rank": sizes[i + 1], "skipped": "no time left"})
                break
        if mode != "baseline":
            send("plans", attention=sorted({a for p in target.plans for a in p.attention}))
    except Exception as err:  # noqa: BLE001
        send("error", error=_first_line(err), trace=traceback.format_exc()[-4000:])
    send("done")


def _size_line(mode: str, e: dict[str, Any], device: str) -> str:
    label = {
        "baseline": "(a) hand-written Ulysses + HF full checkpointing, shard input",
        "autosp": "(b) autosp defaults, full-batch input",
    }[mode]
    head = f"part 2: {label}: {e['tokens_per_rank']} tokens/rank"
    if "skipped" in e:
        return f"{head}: skipped ({e['skipped']})"
    head += f" ({e['total_tokens']} total)"
    step = e.get("timed") or e["first"]
    mem_key = "peak_gib" if device == "cuda" else "peak_rss_growth_gib"
    mem_name = "peak max_memory_allocated" if device == "cuda" else "peak RSS growth"
    if e["first"]["status"] != "ok":
        return (
            f"{head}: {e['first']['status']} {e['first'].get('error', '')} "
            f"(after {e['first']['seconds']} s, {mem_name} {e['first'][mem_key]} GiB)"
        )
    if step["status"] != "ok":
        return f"{head}: first step ok ({e['first']['seconds']} s), second {step['status']}"
    timed = (
        f"step {step['seconds']} s (after a warm-up step of {e['first']['seconds']} s)"
        if "timed" in e
        else f"step {step['seconds']} s (first step, no warm-up: {e.get('timed_skipped')})"
    )
    return f"{head}: {mem_name} {step[mem_key]} GiB, {timed}, loss {step['loss']:.4f}"


def part2(cfg: dict[str, Any], deadline: float, log: Any) -> dict[str, Any]:
    sp, local = cfg["p2_sp"], cfg["p2_tokens_per_rank"]
    log(
        f"part 2: rank 0 of SP={sp} emulated in one process (torch fake process group): "
        f"per-rank memory and compute are real, communication is NOT (collectives move no "
        f"data and take no time); model {cfg['p2']} bf16, random weights, tied embeddings, "
        f"{local} tokens per rank ({local * sp} total); forward+backward, no optimizer; "
        f"loss values are rank 0's part only"
    )
    ctx = mp.get_context("spawn")
    results: dict[str, Any] = {}
    # autosp first: it compiles, and its result is the unknown one; the baseline keeps a
    # reserve of the budget.
    for mode, mode_deadline in (
        ("autosp", deadline - cfg["baseline_reserve_s"]),
        ("baseline", deadline),
    ):
        left = mode_deadline - time.time()
        if left < 20:
            log(f"part 2: {mode}: SKIPPED (only {left:.0f} s of the budget left)")
            results[mode] = {"skipped": "budget"}
            continue
        queue = ctx.Queue()
        proc = ctx.Process(target=_part2_mode, args=(mode, cfg, mode_deadline, queue), daemon=True)
        start = time.time()
        proc.start()
        entry: dict[str, Any] = {"sizes": []}
        last = "starting"
        finished = False
        while not finished:
            try:
                msg = queue.get(timeout=1.0)
            except queue_module.Empty:
                if not proc.is_alive():
                    time.sleep(0.5)
                    if queue.empty():
                        log(f"part 2: {mode}: DIED (exit code {proc.exitcode}) during {last}")
                        entry["died"] = proc.exitcode
                        break
                    continue
                if time.time() > mode_deadline + 10:
                    log(f"part 2: {mode}: TIMEOUT after {time.time() - start:.0f} s during {last}")
                    entry["timeout_during"] = last
                    break
                continue
            if msg["kind"] == "step":
                last = msg["what"]
            elif msg["kind"] == "size":
                entry["sizes"].append(msg["entry"])
                log(_size_line(mode, msg["entry"], cfg["device"]))
                for key in ("first", "timed"):
                    if "trace" in msg["entry"].get(key, {}):
                        log(f"part 2: {mode}: traceback\n{msg['entry'][key]['trace'].rstrip()}")
            elif msg["kind"] == "plans":
                entry["attention"] = msg["attention"]
                log(f"part 2: {mode}: attention plan {msg['attention']}")
            elif msg["kind"] == "error":
                entry["error"] = msg["error"]
                log(f"part 2: {mode}: FAILED during {last}: {msg['error']}")
                log(f"part 2: {mode}: traceback\n{msg['trace'].rstrip()}")
            elif msg["kind"] == "done":
                finished = True
        if proc.is_alive():
            proc.terminate()
        proc.join(timeout=20)
        entry["seconds"] = round(time.time() - start, 1)
        results[mode] = entry
    return results


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json")
    parser.add_argument("--parts", default="1,2", help="which parts to run: 1, 2 or 1,2")
    parser.add_argument("--budget", type=float, help="seconds for the whole run")
    parser.add_argument("--p1-budget", type=float, help="seconds for part 1")
    parser.add_argument("--p1-seq", type=int, help="tokens per sequence in part 1")
    parser.add_argument("--p1-backend", default="aot_eager")
    parser.add_argument("--p2-tokens-per-rank", type=int)
    parser.add_argument("--p2-sp", type=int)
    args = parser.parse_args()
    start = time.time()
    cfg: dict[str, Any] = {**SIZES[args.device], "device": args.device}
    cfg["p1_backend"] = args.p1_backend
    for key in ("p1_seq", "p2_tokens_per_rank", "p2_sp"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    budget = args.budget or cfg["budget_s"]
    p1_budget = args.p1_budget or cfg["p1_budget_s"]
    cfg["p1_timeout_s"] = max(30, int(p1_budget / 2))
    deadline = start + budget
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    command = "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    versions = _versions()
    log(f"command: {command}")
    log(f"device: {_device_name(args.device)}")
    log("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    log(f"budget: {budget:.0f} s in all, part 1 at most {p1_budget:.0f} s")
    report: dict[str, Any] = {
        "command": command,
        "device": _device_name(args.device),
        "versions": versions,
        "config": {k: v for k, v in cfg.items()},
    }
    parts = {p.strip() for p in args.parts.split(",")}
    if "1" in parts:
        t = time.time()
        report["part1"] = part1(cfg, min(deadline, t + p1_budget), log)
        log(f"part 1: took {time.time() - t:.0f} s")
    if "2" in parts:
        t = time.time()
        report["part2"] = part2(cfg, deadline, log)
        log(f"part 2: took {time.time() - t:.0f} s")
    log(f"total: {time.time() - start:.0f} s")
    report["lines"] = lines
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
