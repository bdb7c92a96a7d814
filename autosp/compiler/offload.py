"""Saved activations offloaded to host memory between the forward and the backward.

Note [Activation offloading]
----------------------------
What the forward saves for the backward inside the repeated layers (Note [Sequence-aware
recomputation]: attention outputs, collective results, under ``recompute="cheap"`` the
matmul outputs, and each layer's input) grows with the tokens of a rank and waits, unused,
from its layer's forward to its layer's backward. ``Config.offload`` moves those tensors to
host memory in the forward and brings each back before its first use in the backward, with
AOTAutograd's own pass (``torch._functorch._activation_offloading``), which runs inside the
partitioner under ``torch._functorch.config.enable_activation_offloading`` on the forward
outputs whose joint-graph node carries ``meta["should_offload"]``::

    forward graph                              backward graph
    y = mm(x, w)  ... last forward use of y    y_host (a saved value)
    y_host = offload(y)    y freed on device   ...
    return ..., y_host                         y = reload(y_host)   before y's first use
                                               ... uses of y

``OffloadPartitioner`` is that partitioner: it marks every forward node that a repeated layer
computes (``layer_of``) and whose shape depends on the sequence, then runs torch's
``min_cut_rematerialization_partition``, which decides what is saved (honouring the recompute
tags) and offloads the marked values it saves, except those torch refuses: views, getitems
(so the outputs of a tuple-returning attention kernel, and its log-sum-exp, stay on the
device) and non-contiguous tensors; the plan line lists both. So the policy of *what* is
saved stays Note [Sequence-aware recomputation]'s; offloading only changes *where* it waits.
Values are copied, never recomputed or rounded, so the loss and gradients are those of the
run without offload.

Where the tensors are on an accelerator (CUDA), the copies are torch's ``ao.offload`` /
``ao.reload`` / ``ao.wait_tensor`` ops (``activation_offload_separate_stream``): each copy
runs on a dedicated transfer stream, into (out of) a pinned host buffer, and the compute stream
waits for its event where torch puts the wait: right after the offload in the forward, so the
device tensor is freed at once, and right before the first use in the backward. Torch's two
further options stay off: ``activation_offload_sink_wait`` (waits at the end of the forward:
more overlap, but with one graph for the whole model nothing would be freed before the forward
ends) and ``activation_reload_prefetch`` (reloads moved earlier by benchmarking nodes at
compile time). These ops first exist in torch 2.12; torch 2.11's partitioner has the same
marking and config, but its side-stream copies run on Dynamo's experimental stream objects
(its own docstring: "testings should be done once that is more finalized") and its plain copies
on the compute stream, so ``Config(offload=True)`` asks for torch >= 2.12 (``check_torch``).

On a CPU there is no separate host memory. The same pass runs with plain
``prims.device_put(x, "cpu")`` copies (the transfer-stream ops need an accelerator): the graph
and the plan are those of a GPU run, the "copies" are to the same memory (a clone under
Inductor, the tensor itself under ``aot_eager``) and save nothing. That keeps the mechanism
testable on CPU ranks (``tests/test_offload.py``); it is documented here rather than warned
about at run time.

The AOTAutograd cache is off for these compilations (``enable_autograd_cache``): a cache hit
would skip the partitioner, and with it the offload decision the plan records. Torch's pass
reads every forward output as a node, so constant outputs (the ``None`` logits of a chunked
loss) are taken out of the graph before it is compiled and put back around the call.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import sympy
import torch
from torch._inductor.custom_graph_pass import CustomPartitionerFn
from torch.fx import GraphModule, Node

from autosp.compiler.ops_table import op_name
from autosp.compiler.propagate import Plan
from autosp.compiler.recompute import layer_of
from autosp.compiler.seqdims import hint
from autosp.errors import AutoSPError

MIN_TORCH = (2, 12)
"""The first torch whose partitioner offloads through the transfer-stream ops (``ao.*``)."""


def check_torch(version: str = torch.__version__) -> None:
    """Raise ``AutoSPError`` unless ``version`` is a torch that offloads asynchronously."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None or tuple(int(g) for g in found.groups()) < MIN_TORCH:
        raise AutoSPError(
            f"autosp: Config(offload=True) needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}, whose "
            "partitioner copies saved activations to pinned host memory on a transfer stream "
            f"(torch.ops.ao.offload / ao.reload); this is torch {version}. Upgrade torch or set "
            "offload=False."
        )


TRANSFERS = {
    "forward": frozenset({"prims.device_put.default", "ao.offload.default"}),
    "backward": frozenset({"prims.device_put.default", "ao.reload.default"}),
}
"""The copies torch's pass inserts into the forward and the backward graph: plain
``device_put`` or the transfer-stream ops."""


def _count_transfers(gm: GraphModule, graph: str) -> int:
    return sum(
        n.op == "call_function" and str(n.target) in TRANSFERS[graph] for n in gm.graph.nodes
    )


def _op(node: Node) -> str:
    """The op's name without its overload (``mm``, ``all_to_all``)."""
    packet = getattr(node.target, "overloadpacket", None)
    return packet.__name__ if packet is not None else op_name(node)


def _kinds(nodes: list[Node]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(Counter(map(_op, nodes)).items()))


def _nbytes(value: torch.Tensor) -> int:
    return math.prod(hint(size) for size in value.shape) * value.element_size()


class OffloadPartitioner(CustomPartitionerFn):
    """``min_cut_rematerialization_partition`` with the layers' token-shaped saved values
    offloaded (Note [Activation offloading]); records what it did in ``plan.offload``."""

    def __init__(self, plan: Plan, seq_syms: frozenset[sympy.Symbol]) -> None:
        self.plan = plan
        self.seq_syms = seq_syms

    def _wanted(self, node: Node) -> bool:
        value = node.meta.get("val")
        return (
            node.op == "call_function"
            and isinstance(value, torch.Tensor)
            and layer_of(node) is not None
            and any(
                isinstance(size, torch.SymInt) and size.node.expr.free_symbols & self.seq_syms
                for size in value.shape
            )
        )

    def __call__(
        self, gm: GraphModule, joint_inputs: Sequence[object], **kwargs: Any
    ) -> tuple[GraphModule, GraphModule]:
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        for node in gm.graph.nodes:
            if self._wanted(node):
                node.meta["should_offload"] = True
        on_accelerator = any(
            isinstance(v := p.meta.get("val"), torch.Tensor) and v.device.type != "cpu"
            for p in gm.graph.find_nodes(op="placeholder")
        )
        with torch._functorch.config.patch(
            enable_activation_offloading=True,
            activation_offload_separate_stream=on_accelerator,
        ):
            fw, bw = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
        self._record(fw, bw, kwargs["num_fwd_outputs"], on_accelerator)
        return fw, bw

    def _record(
        self, fw: GraphModule, bw: GraphModule, num_fwd_outputs: int, on_accelerator: bool
    ) -> None:
        """One plan line: how many saved values went to the host, their bytes at the traced
        length, by op, and how many marked ones torch kept on the device."""
        (output,) = fw.graph.find_nodes(op="output")
        saved = [n for n in output.args[0][num_fwd_outputs:] if isinstance(n, Node)]
        moved = [n for n in fw.graph.nodes if n.meta.get("saved_for_offloading")]
        kept = [n for n in saved if n.meta.get("should_offload") and n not in moved]
        mib = sum(_nbytes(n.meta["val"]) for n in moved) / 2**20
        how = (
            "pinned host buffers, transfer stream (ao.offload / ao.reload)"
            if on_accelerator
            else "CPU: copies to the same memory, nothing saved (Note [Activation offloading])"
        )
        self.plan.offload.append(
            f"offload: {len(moved)} saved layer activations to host memory, "
            f"{mib:.2f} MiB per step per rank at the traced length "
            f"({_count_transfers(fw, 'forward')} copies out in the forward, "
            f"{_count_transfers(bw, 'backward')} back in the backward; {how}): {_kinds(moved)}"
            + (
                f"; kept on the device (views, getitems, non-contiguous): {_kinds(kept)}"
                if kept
                else ""
            )
        )

    def uuid(self) -> None:
        """No cache key: the partitioner must run to record the plan (the AOTAutograd cache is
        off for these compilations)."""
        return None


def _without_constant_outputs(
    gm: GraphModule,
) -> tuple[GraphModule, Callable[[Sequence[Any]], list[Any]]]:
    """``gm`` returning only its computed outputs, and the function that puts the constants
    (``None`` for logits the chunked loss never built) back: torch's offload pass reads every
    forward output as a node."""
    (output,) = gm.graph.find_nodes(op="output")
    outputs = list(output.args[0])
    constants = {i: v for i, v in enumerate(outputs) if not isinstance(v, Node)}
    output.args = (tuple(v for v in outputs if isinstance(v, Node)),)
    gm.recompile()

    def restore(computed: Sequence[Any]) -> list[Any]:
        values = iter(computed)
        return [constants[i] if i in constants else next(values) for i in range(len(outputs))]

    return gm, restore


def offload_compiler(
    compiler_for: Callable[[OffloadPartitioner], Callable[..., Any]],
    plan: Plan,
    seq_syms: frozenset[sympy.Symbol],
) -> Callable[[GraphModule, list[Any]], Callable[..., Any]]:
    """The inner compiler ``compiler_for(partitioner)`` partitioning with
    ``OffloadPartitioner``, with the AOTAutograd cache off."""
    compiler = compiler_for(OffloadPartitioner(plan, seq_syms))

    def compile_graph(gm: GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        gm, restore = _without_constant_outputs(gm)
        with torch._functorch.config.patch(enable_autograd_cache=False):
            compiled = compiler(gm, example_inputs)
        return lambda *args: restore(compiled(*args))

    return compile_graph
