"""Sequence-sharding propagation: rewrite a captured graph so that each rank runs its share.

Every value of the single-process graph gets a placement (``placement.py``) from the rule of
the op that makes it (``rules.py``). The pass walks the graph once, in order, and emits a new
graph in which each value is held in its placement:

* token inputs stay whole until an op that computes with parameters (embedding, linear, norm)
  or attention meets them; there they are sliced (no communication);
* small full-length values (positions, rotary tables, labels) stay replicated and are sliced
  where they meet sharded values, padded as Note [Placements and padding] says;
* attention is replaced by a strategy (``attention/``) and the loss by its exact sharded form
  (``loss.py``);
* an op without a rule gets its inputs gathered, with a warning naming it: slower, never wrong.

Invariant: every ``SymInt`` in the graph keeps its single-process meaning (full lengths); a
rule that passes a size to an op on a sharded value rewrites it to the local size.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg
from torch.utils import _pytree as pytree

import autosp.comm.ops  # noqa: F401 - registers the torch.ops.autosp collectives
from autosp.compiler import runtime
from autosp.compiler.ops_table import op_name
from autosp.compiler.placement import REPLICATE, Partial, Placement, Replicate, Shard
from autosp.compiler.seqdims import SeqDim, seq_dims


@dataclass(slots=True)
class GroupInfo:
    """The sequence-parallel group as the rewritten graph sees it (constants per rank)."""

    rank: int
    world: int
    name: str
    hybrid: dict[int, tuple[str, str]] = field(default_factory=dict)
    """For each Ulysses size ``u`` (a proper divisor of ``world``): this rank's Ulysses group
    and ring names for hybrid attention."""


@dataclass(slots=True)
class ShardedOutput:
    """A graph output returned as this rank's rows: its index, dim and length offset."""

    index: int
    dim: int
    length: int


@dataclass(slots=True)
class Plan:
    """What the pass found and did, for the runtime wrapper and for the user."""

    sharded_outputs: list[ShardedOutput] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)
    gathered_ops: list[str] = field(default_factory=list)
    loss: list[str] = field(default_factory=list)


class UnsupportedOp(Exception):
    """Raised by a rule that cannot keep its op sharded; the pass gathers instead."""


def meta(node: Any) -> Any:
    return node.meta.get("example_value") if isinstance(node, Node) else None


def is_param(node: Any) -> bool:
    value = meta(node)
    return isinstance(value, torch.nn.Parameter) or (
        isinstance(node, Node)
        and node.op == "placeholder"
        and isinstance(value, torch.Tensor)
        and value.requires_grad
    )


class ShardingPass:
    """Build the rank-local graph of ``gm`` for the group ``group``."""

    def __init__(
        self,
        gm: GraphModule,
        group: GroupInfo,
        seq_syms: frozenset[sympy.Symbol],
        seq_source: tuple[str, int],
        mask_overrides: dict[str, Any] | None = None,
        attention: str = "auto",
        load_balance: bool = True,
    ) -> None:
        self.gm = gm
        self.attention = attention
        self.load_balance = load_balance
        self.mask_overrides = mask_overrides or {}
        self.group = group
        self.syms = seq_syms
        self.seq_source = seq_source
        self.graph = Graph()
        self.env: dict[Node, Any] = {}
        self.placements: dict[Node, Any] = {}
        self._converted: dict[tuple[Node, Placement, Any], Node] = {}
        self.seq_len: Node | None = None
        self._block_len: Node | None = None
        self.plan = Plan()

    # ------------------------------------------------------------------ entry point
    def run(self) -> tuple[GraphModule, Plan]:
        from autosp.compiler.rules import apply_rule

        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.env[node] = self.graph.node_copy(node, lambda n: self.env[n])
                self.placements[node] = REPLICATE
                if node.name == self.seq_source[0]:
                    self.seq_len = self.graph.call_method(
                        "size", (self.env[node], self.seq_source[1])
                    )
            elif node.op == "output":
                self._output(node)
            elif node.op == "get_attr":
                self.env[node] = self.graph.node_copy(node, lambda n: self.env[n])
                self.placements[node] = REPLICATE
            else:
                apply_rule(self, node)
        self.graph.eliminate_dead_code()
        self.graph.lint()
        return GraphModule(self.gm, self.graph), self.plan

    # ------------------------------------------------------------------ helpers for rules
    def placement(self, arg: Any) -> Any:
        return self.placements.get(arg, REPLICATE) if isinstance(arg, Node) else REPLICATE

    def seq_dims(self, node: Node) -> list[SeqDim]:
        value = meta(node)
        return seq_dims(value, self.syms) if isinstance(value, torch.Tensor) else []

    def emit(self, node: Node, args: tuple, kwargs: dict, placement: Any) -> Node:
        """Emit ``node``'s op with new (local) arguments and record its placement."""
        new = self.graph.create_node(node.op, node.target, args, kwargs, name=node.name)
        new.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
        self.env[node] = new
        self.placements[node] = placement
        return new

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Node:
        return self.graph.call_function(fn, args, kwargs)

    def local(self, arg: Any) -> Any:
        """The local value of an argument, whatever its placement."""
        return map_arg(arg, lambda n: self.env[n])

    def replicate(self, arg: Any) -> Any:
        """The whole value of an argument (gathering or reducing it if needed)."""
        return map_arg(arg, self._replicate_node)

    def _replicate_node(self, node: Node) -> Node:
        placement = self.placement(node)
        if isinstance(placement, Replicate) or isinstance(placement, tuple):
            return self.env[node]
        key = (node, REPLICATE, None)
        if key not in self._converted:
            if isinstance(placement, Partial):
                self._converted[key] = self.call(runtime.reduce_partial, self.env[node], self.name)
            else:
                self._converted[key] = self.call(
                    runtime.gather,
                    self.env[node],
                    placement.dim,
                    self.seq_len,
                    self.group.world,
                    self.name,
                    placement.inner,
                    placement.length,
                )
        return self._converted[key]

    def shard(self, node: Node, target: Shard, pad_value: float | bool = 0) -> Node:
        """``node`` held as ``target`` (slicing a replicated value needs no communication)."""
        placement = self.placement(node)
        if placement == target:
            return self.env[node]
        key = (node, target, pad_value)
        if key not in self._converted:
            self._converted[key] = self.call(
                runtime.shard,
                self._replicate_node(node),
                target.dim,
                self.seq_len,
                self.group.rank,
                self.group.world,
                target.inner,
                target.length,
                pad_value,
            )
        return self._converted[key]

    @property
    def block_len(self) -> Node:
        """The rows every rank holds, ``runtime.block_len`` (one node, made on first use)."""
        if self._block_len is None:
            self._block_len = self.call(runtime.block_len, self.seq_len, self.group.world)
        return self._block_len

    @property
    def name(self) -> str:
        return self.group.name

    def gather_fallback(self, node: Node, reason: str) -> None:
        """Run ``node`` on whole inputs: correct, slower; warns once per op."""
        name = op_name(node)
        if name not in self.plan.gathered_ops:
            self.plan.gathered_ops.append(name)
            warnings.warn(
                f"autosp: op '{name}' ({node.format_node()}) has no sequence-parallel rule for "
                f"this use ({reason}); its inputs are gathered to full length on every rank. "
                "The result is exact but this part of the model runs unsharded.",
                stacklevel=2,
            )
        args, kwargs = self.replicate((node.args, node.kwargs))
        self.emit(node, args, kwargs, REPLICATE)

    # ------------------------------------------------------------------ outputs
    def _output(self, node: Node) -> None:
        outputs = []
        flat, spec = pytree.tree_flatten(node.args[0])
        for index, value in enumerate(flat):
            outputs.append(self._output_value(index, value))
        self.graph.output(pytree.tree_unflatten(outputs, spec))

    def _output_value(self, index: int, value: Any) -> Any:
        if not isinstance(value, Node):
            return value
        placement = self.placement(value)
        local = self.env[value]
        value_meta = meta(value)
        if isinstance(placement, Shard) and not placement.merged:
            self.plan.sharded_outputs.append(ShardedOutput(index, placement.dim, placement.length))
            return local
        if isinstance(placement, Partial) and value_meta.dim() == 0:
            return self.call(torch.ops.autosp.all_reduce_loss.default, local, self.name)
        if isinstance(placement, Replicate) and placement.loss_grad:
            return local
        whole = self._replicate_node(value)
        if (
            isinstance(value_meta, torch.Tensor)
            and value_meta.requires_grad
            and value_meta.dtype.is_floating_point
        ):
            return self.call(torch.ops.autosp.scale_grad.default, whole, 1.0 / self.group.world)
        return whole
