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

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg
from torch.utils import _pytree as pytree

import autosp.comm.ops  # noqa: F401 - registers the torch.ops.autosp collectives
from autosp.compiler import runtime
from autosp.compiler.context import CompileContext, GroupInfo
from autosp.compiler.find_sequence import is_user_input
from autosp.compiler.mutation import Aliases, settle_writes, writes_in_place
from autosp.compiler.ops_table import ATTENTION, meta, op_name
from autosp.compiler.placement import REPLICATE, Local, Partial, Placement, Replicate, Shard
from autosp.compiler.seqdims import SeqDim, seq_dims

logger = logging.getLogger(__name__)


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
    recompute: list[str] = field(default_factory=list)
    mlp: list[str] = field(default_factory=list)
    """The MLPs run over chunks of tokens (Note [Tiled MLP])."""
    auto_limits: tuple[int, int] | None = None
    """Under ``recompute="auto"``: the tokens per rank up to which a call runs ``"cheap"``,
    and ``"layers"`` (Note [Recomputation by length])."""
    offload: list[str] = field(default_factory=list)
    """What the partitioner moved to host memory (Note [Activation offloading])."""


class UnsupportedOp(Exception):
    """Raised by a rule that cannot keep its op sharded; the pass gathers instead."""


class BagEscape(Exception):
    """A value of a token bag (``Local``) met an op that cannot keep it local: a bag has no
    global order to gather in, so the pass starts over with the bag's maker gathered."""

    def __init__(self, bag: str, node: Node) -> None:
        super().__init__(f"bag {bag} reaches {node.format_node()}")
        self.bag = bag


def is_param(node: Any) -> bool:
    """A parameter of the module (a differentiable input of the caller's is a token tensor),
    or a tensor computed from parameters alone: a gathered shard (Note [Parameters gathered in
    the graph]), Gemma's ``1 + weight``."""
    value = meta(node)
    if isinstance(value, torch.nn.Parameter):
        return True
    if not isinstance(node, Node) or not isinstance(value, torch.Tensor):
        return False
    if node.op == "placeholder":
        return value.requires_grad and not is_user_input(node)
    inputs = node.all_input_nodes
    computed = node.op in ("call_function", "call_method")
    return computed and bool(inputs) and all(map(is_param, inputs))


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
        unbagged: frozenset[str] = frozenset(),
    ) -> None:
        self.gm = gm
        self.unbagged = unbagged
        """Nodes that may not make token bags (their bag escaped on an earlier try)."""
        self.facts: dict[Node, Any] = {}
        """What rules proved about the values of a node beyond its placement (``routing``'s
        row indices); a fact whose ``bag`` is set makes the values depend on that bag's
        rank-local order."""
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
        self.inputs: dict[Node, Node] = {}
        """The rank-local placeholder of each graph input (``env`` may hold a wrapper)."""
        self.seq_len: Node | None = None
        self._block_len: Node | None = None
        self.plan = Plan()
        self.current: Node | None = None
        """The node of the source graph being rewritten: the nodes made for it carry its
        module stack (``recompute.layer_of``)."""

    # ------------------------------------------------------------------ entry point
    def run(self) -> tuple[GraphModule, Plan]:
        aliases = Aliases(list(self.gm.graph.nodes))
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.inputs[node] = self.graph.node_copy(node, lambda n: self.env[n])
                self.env[node] = self._input(node)
                self.placements[node] = REPLICATE
                if node.name == self.seq_source[0]:
                    self.seq_len = self.graph.call_method(
                        "size", (self.inputs[node], self.seq_source[1])
                    )
            elif node.op == "output":
                self._output(node)
            elif node.op == "get_attr":
                self.env[node] = self.graph.node_copy(node, lambda n: self.env[n])
                self.placements[node] = REPLICATE
            else:
                self.current = node
                apply_rule(self, node)
                settle_writes(self, node, aliases)
        self.graph.eliminate_dead_code(is_impure_node=writes_in_place)
        self.graph.lint()
        return GraphModule(self.gm, self.graph), self.plan

    def _input(self, node: Node) -> Node:
        """A graph input as the rank-local graph uses it. A differentiable input of the
        caller's (``inputs_embeds=outer(ids)``) is replicated, so each rank's gradient for it
        is partial (only its rows); ``sum_grad`` makes it whole on every rank, so the caller's
        own parameters get their full gradient. Parameters of the module are summed by
        ``GradSync`` instead."""
        local = self.inputs[node]
        value = meta(node)
        if (
            is_user_input(node)
            and isinstance(value, torch.Tensor)
            and value.requires_grad
            and value.dtype.is_floating_point
        ):
            return self.call(torch.ops.autosp.sum_grad.default, local, self.name)
        return local

    # ------------------------------------------------------------------ helpers for rules
    def placement(self, arg: Any) -> Any:
        return self.placements.get(arg, REPLICATE) if isinstance(arg, Node) else REPLICATE

    def seq_dims(self, node: Node) -> list[SeqDim]:
        value = meta(node)
        return seq_dims(value, self.syms) if isinstance(value, torch.Tensor) else []

    def emit(self, node: Node, args: tuple, kwargs: dict, placement: Any) -> Node:
        """Emit ``node``'s op with new (local) arguments and record its placement."""
        args, kwargs = map_arg((args, kwargs), self._own)
        new = self.graph.create_node(node.op, node.target, args, kwargs, name=node.name)
        new.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
        self.env[node] = new
        self.placements[node] = placement
        return new

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Node:
        """Emit ``fn(*args, **kwargs)``; scalar values of the source graph (a ``SymFloat``
        scale, a ``SymInt`` size) are mapped to their local nodes."""
        args, kwargs = map_arg((args, kwargs), self._own)
        new = self.graph.call_function(fn, args, kwargs)
        if self.current is not None and "nn_module_stack" in self.current.meta:
            new.meta["nn_module_stack"] = self.current.meta["nn_module_stack"]
        return new

    def _own(self, node: Node) -> Node:
        if node.graph is self.graph:
            return node
        if isinstance(meta(node), torch.Tensor):
            raise AssertionError(
                f"autosp internal error: tensor {node.name} of the source graph was passed to "
                "the rank-local graph without choosing its placement"
            )
        return self.env[node]

    def emit_local(self, node: Node, placement: Any) -> None:
        """Emit ``node`` on the local values of its arguments."""
        self.emit(node, *self.local((node.args, node.kwargs)), placement)

    def local(self, arg: Any) -> Any:
        """The local value of an argument, whatever its placement."""
        return map_arg(arg, lambda n: self.env[n])

    def replicate(self, arg: Any) -> Any:
        """The whole value of an argument (gathering or reducing it if needed)."""
        return map_arg(arg, self._replicate_node)

    def bag_of(self, node: Node) -> str | None:
        """The token bag whose rank-local order ``node``'s values depend on, if any."""
        placement = self.placement(node)
        for p in placement if isinstance(placement, tuple) else (placement,):
            if isinstance(p, Local):
                return p.bag
        return getattr(self.facts.get(node), "bag", None)

    def _replicate_node(self, node: Node) -> Node:
        placement = self.placement(node)
        bag = self.bag_of(node)
        if bag is not None:
            raise BagEscape(bag, node)
        if isinstance(placement, Replicate):
            return self.env[node]
        if isinstance(placement, tuple):
            if all(isinstance(p, Replicate) for p in placement):
                return self.env[node]
            raise UnsupportedOp("a tuple of sharded values is used whole")
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

    def shard(self, node: Node, target: Shard, pad_value: float | bool | None = None) -> Node:
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

    def mean_group(self) -> tuple[str, int]:
        """The group a token-mean loss averages over and its local sum's gradient scale
        (Note [Token mean over data-parallel groups])."""
        name, scale = self.group.mean
        return (name or self.name), scale

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
        bag = self.bag_of(value)
        if bag is not None:
            raise BagEscape(bag, value)
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


# --------------------------------------------------------------------------- rules

Rule = Callable[[ShardingPass, Node], None]
RULES: dict[str, Rule] = {}


def rule(*names: str, default: bool = False) -> Callable[[Rule], Rule]:
    """Register a rule for ops named ``names`` (as ``op_name`` spells them). A ``default``
    rule (one for a whole family, such as pointwise ops) does not replace a specific one."""

    def register(fn: Rule) -> Rule:
        for name in names:
            if not (default and name in RULES):
                RULES[name] = fn
        return fn

    return register


def needs_grad(value: Any) -> bool:
    """Whether any tensor in a traced value (a tensor, or a tuple such as ``topk``'s)
    requires grad."""
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in pytree.tree_leaves(value))


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return any(isinstance(v, torch.Tensor) for v in value)
    return isinstance(value, torch.Tensor)


def tensor_args(node: Node) -> list[Node]:
    """The arguments of ``node`` that are tensors (or tuples of tensors, as from ``split``)."""
    flat = pytree.tree_leaves((node.args, node.kwargs))
    return [a for a in flat if isinstance(a, Node) and _holds_tensor(meta(a))]


def apply_rule(sp: ShardingPass, node: Node) -> None:
    """Emit ``node`` on this rank: by its rule, a plain copy, or gathered inputs."""
    name = op_name(node)
    inputs = tensor_args(node)
    distributed = [a for a in inputs if not isinstance(sp.placement(a), Replicate)]
    if not distributed and name not in ATTENTION:
        start = _token_input_to_shard(sp, node, inputs)
        if start is None:
            _emit_replicated(sp, node)
            return
        # Shard the token tensor for this op only; other users keep the whole value.
        (dim,) = [d for d in sp.seq_dims(start) if not d.merged and d.length == 0]
        saved = sp.env[start], sp.placements[start]
        sp.env[start] = sp.shard(start, Shard(dim.dim))
        sp.placements[start] = Shard(dim.dim)
        try:
            _dispatch(sp, node, name)
        finally:
            sp.env[start], sp.placements[start] = saved
        return
    _dispatch(sp, node, name)


def _dispatch(sp: ShardingPass, node: Node, name: str) -> None:
    bags = _bags_of(sp, node)
    if bags:
        handler = LOCAL_RULES.get(name)
        if handler is None:
            raise BagEscape(bags[0], node)
        handler(sp, node)
        return
    handler = RULES.get(name)
    if handler is None:
        sp.gather_fallback(node, "no rule for this op")
        return
    try:
        handler(sp, node)
    except UnsupportedOp as err:
        sp.gather_fallback(node, str(err))


LOCAL_RULES: dict[str, Rule] = {}
"""Rules for ops with a token-bag (``Local``) input; such an op without one ends the bag."""


def local_rule(*names: str) -> Callable[[Rule], Rule]:
    """Register a rule for ops named ``names`` that take a ``Local`` input (``routing.py``);
    it raises ``BagEscape`` where it cannot keep the bag local."""

    def register(fn: Rule) -> Rule:
        for name in names:
            LOCAL_RULES.setdefault(name, fn)
        return fn

    return register


def _bags_of(sp: ShardingPass, node: Node) -> list[str]:
    return [bag for arg in tensor_args(node) if (bag := sp.bag_of(arg)) is not None]


LOSS = Replicate(loss_grad=True)


def _emit_replicated(sp: ShardingPass, node: Node) -> None:
    """Copy an op on replicated inputs. Scalar arithmetic on the loss keeps the loss mark (its
    gradient arrives whole on every rank); an op mixing the loss with other replicated values
    (whose gradients are partial) makes the loss's gradient partial too, so ``sum_grad`` sums
    it back before the loss's identity-backward all-reduce."""
    inputs = tensor_args(node)
    marked = {a for a in inputs if sp.placement(a) == LOSS}
    others_need_grad = any(a not in marked and needs_grad(meta(a)) for a in inputs)
    if marked and not others_need_grad:
        sp.emit_local(node, LOSS)
        return
    summed = {a: sp.call(torch.ops.autosp.sum_grad.default, sp.env[a], sp.name) for a in marked}
    args, kwargs = map_arg((node.args, node.kwargs), lambda n: summed.get(n, sp.env[n]))
    sp.emit(node, args, kwargs, REPLICATE)


def _token_input_to_shard(sp: ShardingPass, node: Node, inputs: list[Node]) -> Node | None:
    """The whole token tensor that ``node`` computes on with a parameter, if any."""
    if not any(is_param(a) for a in inputs):
        return None
    for arg in inputs:
        if is_param(arg):
            continue
        dims = [d for d in sp.seq_dims(arg) if not d.merged and d.length == 0]
        if len(dims) == 1:
            return arg
    return None


def shard_sequence_pass(gm: GraphModule, ctx: CompileContext) -> GraphModule:
    """The rank-local graph of ``gm`` for ``ctx``'s mask plan; records the plan in ``ctx``.
    A token bag that cannot be kept local is not made: the pass runs again with its maker
    gathered."""
    unbagged: frozenset[str] = frozenset()
    while True:
        sharding = ShardingPass(
            gm,
            ctx.group,
            ctx.seq_syms,
            ctx.seq_source,
            ctx.masks.masks,
            ctx.config.attention,
            ctx.config.load_balance,
            unbagged,
        )
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                local_gm, ctx.plan = sharding.run()
        except BagEscape as escape:
            logger.info("autosp: %s; gathering instead", escape)
            unbagged |= {escape.bag}
            continue
        for warning in caught:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
        return local_gm
