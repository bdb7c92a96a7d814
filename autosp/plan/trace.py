"""Tracing one training step of a parallelized model on fake tensors, and its memory.

Note [Planning by tracing]
--------------------------
``autosp plan`` answers "how long a sequence fits" by running the step autosp would run,
without the memory: the model's parameters, the batch and every intermediate are fake CPU
tensors (``FakeTensorMode``: shapes, dtypes and storage sizes, no data), and the
sequence-parallel group is torch's ``fake`` process group of ``sp`` ranks in one process,
this process playing rank 0 (collectives move nothing; their outputs have the right shapes).
The model goes through ``autosp.parallelize`` as in training, compiled with ``aot_eager``:
the same rewritten rank-local graph, AOTAutograd's min-cut partitioner and autosp's
recomputation tags, run op by op (on the CPU benchmark's model the saved bytes equal those
with Inductor's decompositions and partitioner, ``aot_eager_decomp_partition``). Then one
step -- forward, backward (with the gradient all-reduce), optimizer step -- runs under
``MemoryTracker``, a dispatch mode that sees every op the compiled graphs run and follows
every storage from its allocation to its release, so its peak is the peak of live tensor
bytes on the rank.

autosp's own custom ops (chunked loss, collectives, ring attention) would run only their
shape functions on fake tensors; the tracker runs their real implementations instead, so
their internal buffers (a chunk's logits, the fp32 weight-gradient accumulator) are counted.
Their chunk loops visit the first and the last chunk only (Note [Chunk loops on fake
tensors]): every full chunk reaches the same peak.

What it does not see: the allocator's rounding and caching, the runtime's own memory (CUDA
context, gloo buffers, Python), and kernel workspaces. Inductor fuses pointwise ops, so its
transients can be smaller than the op-by-op ones counted here; against the CPU allocator's
live bytes of an Inductor run the traced peak is recorded by
``benchmarks/plan_vs_measured.py``.

Every live byte at the peak is given one category:

=====================  ==============================================================
weights                parameters and buffers
optimizer              optimizer state (and fp32 master weights, when planned)
gradients              storages that are a parameter's ``.grad`` after the backward
saved activations      made in the forward and still alive when it ends (what the
                       backward reads, and the outputs)
transient              everything else: temporaries of the op running at the peak
=====================  ==============================================================
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = ("weights", "optimizer", "gradients", "saved activations", "transient")
PHASES = ("forward", "backward", "optimizer step")
_CPU_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


@dataclass(slots=True, eq=False)
class Block:
    """One storage: its size, the phase that made it and, once known, its category."""

    nbytes: int
    phase: str
    kind: str | None = None
    saved: bool = False

    def category(self) -> str:
        if self.kind is not None:
            return self.kind
        return "saved activations" if self.saved else "transient"


@dataclass(slots=True)
class StepMemory:
    """The memory of one traced step on one rank (bytes)."""

    peak: int
    breakdown: dict[str, int]
    """Live bytes at the peak per category (``CATEGORIES``); they add up to ``peak``."""
    peak_phase: str
    phase_peaks: dict[str, int]
    saved_at_forward_end: int
    """What the forward leaves for the backward (the recomputation policy's result)."""
    ops: int
    """Ops the step ran."""
    autosp_ops: int
    """autosp's own ops among them (none: the trace did not see the parallelized graph)."""


class MemoryTracker(TorchDispatchMode):
    """Follows every storage made while it is active, and records the peak of live bytes.

    ``ignore_compile_internals``: the mode is off while torch.compile compiles and on while
    the compiled graphs run, so it sees the ops of autosp's rank-local graph. Higher-order ops
    pass through it too (a recomputed attention runs under ``run_and_save_rng_state``): their
    outputs are followed."""

    supports_higher_order_operators = True

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, Block] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.now = 0
        self.peak = 0
        self.peak_blocks: list[Block] = []
        self.peak_phase = PHASES[0]
        self.phase = PHASES[0]
        self.phase_peaks = dict.fromkeys(PHASES, 0)
        self.ops = 0
        self.autosp_ops = 0

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def add(self, tensor: torch.Tensor, kind: str | None = None) -> None:
        """Follow ``tensor``'s storage (if new); give it ``kind`` when one is named."""
        storage = tensor.untyped_storage()
        key = id(storage)
        block = self.live.get(key)
        if block is None:
            block = Block(storage.nbytes(), self.phase)
            self.live[key] = block
            self._refs[key] = weakref.ref(storage, lambda _, key=key: self._release(key))
            self.now += block.nbytes
            self.phase_peaks[self.phase] = max(self.phase_peaks[self.phase], self.now)
            if self.now > self.peak:
                self.peak, self.peak_phase = self.now, self.phase
                self.peak_blocks = list(self.live.values())
        if kind is not None:
            block.kind = kind

    def _release(self, key: int) -> None:
        block = self.live.pop(key, None)
        self._refs.pop(key, None)
        if block is not None:
            self.now -= block.nbytes

    def end_forward(self) -> int:
        """Mark what the forward leaves alive as saved; return its bytes."""
        saved = 0
        for block in self.live.values():
            if block.kind is None and block.phase == PHASES[0]:
                block.saved = True
                saved += block.nbytes
        return saved

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.ops += 1
        if func.namespace == "autosp":
            self.autosp_ops += 1
            # Fake tensors would run only the op's shape function: run its implementation,
            # with this mode on, so the op's own buffers are followed too.
            with self:
                out = func.redispatch(_CPU_KEYS, *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.add(value)
        return out

    def result(self, saved_at_forward_end: int) -> StepMemory:
        breakdown = dict.fromkeys(CATEGORIES, 0)
        for block in self.peak_blocks:
            breakdown[block.category()] += block.nbytes
        return StepMemory(
            peak=self.peak,
            breakdown=breakdown,
            peak_phase=self.peak_phase,
            phase_peaks=dict(self.phase_peaks),
            saved_at_forward_end=saved_at_forward_end,
            ops=self.ops,
            autosp_ops=self.autosp_ops,
        )


@dataclass(slots=True)
class Optimizer:
    """AdamW as planned: on fp32 master copies of the parameters (``"fp32"``, the usual
    mixed-precision recipe: 12 bytes per parameter; the parameters themselves when they are
    fp32), on the parameters (``"param"``: states in their dtype), or none (``"none"``). The
    multi-tensor implementation, CUDA's default, whose temporaries span all parameters."""

    params: list[torch.nn.Parameter]
    kind: str
    masters: list[torch.Tensor] = field(default_factory=list)
    adamw: torch.optim.Optimizer | None = None

    def __post_init__(self) -> None:
        if self.kind == "none":
            return
        targets: list[torch.Tensor] = self.params
        if self.kind == "fp32" and any(p.dtype != torch.float32 for p in self.params):
            self.masters = [p.detach().float().requires_grad_() for p in self.params]
            targets = self.masters
        self.adamw = torch.optim.AdamW(targets, lr=1e-4, foreach=True)  # CUDA's default

    def state_tensors(self) -> list[torch.Tensor]:
        states = [
            t
            for state in (self.adamw.state.values() if self.adamw else [])
            for t in state.values()
            if isinstance(t, torch.Tensor)
        ]
        return states + self.masters

    def step(self) -> None:
        if self.adamw is None:
            return
        if self.masters:
            for master, param in zip(self.masters, self.params, strict=True):
                master.grad = None if param.grad is None else param.grad.float()
        self.adamw.step()
        if self.masters:
            with torch.no_grad():
                for master, param in zip(self.masters, self.params, strict=True):
                    param.copy_(master)
                    master.grad = None
