"""Token routing kept on this rank: mixture-of-experts dispatch over the flattened tokens.

Note [Token bags]
-----------------
A mixture-of-experts layer sorts its (token, expert) pairs by expert, gathers the tokens in
that order, runs each expert on its group (``grouped_mm`` with per-expert offsets) and puts the
results back in token order with the inverse permutation. No single step is row-wise (a sort
along the tokens mixes them), but the whole is: every token's result depends on that token
only. The ops between the sort and the way back hold a *bag*: items made from this rank's
tokens (padding rows included), in an order and number of the rank's own. A bag is no slice of
the global value, so it is never gathered; the pass follows it op by op and proves where each
index points:

* ``sort`` / ``argsort`` along a sequence-sharded 1-D value makes a bag (``Local(bag, 0)``);
  its indices are a permutation of the rows of that value (a ``RowIndex`` fact);
* ``perm // k`` of indices into a dimension where the sequence is merged with ``inner`` = a
  multiple of ``k`` points into the layout with ``inner / k`` (``(token, k)`` pairs ->
  tokens);
* ``x[idx]``: a sharded ``x`` read at indices into its own layout gives bag items; a table
  without the sequence (an expert's bias) read at a bag's values gives bag items; a bag read at
  sharded indices into the bag gives sharded rows again;
* ``inv[perm] = arange(n)`` writes the inverse of a permutation: ``inv`` is then held as the
  permuted value's rows, pointing into the bag;
* elementwise, layout and per-row ops keep bag items; ``histc`` / ``cumsum`` over the bag give
  a value of the whole bag (``Local(bag, None)``: its per-expert counts and offsets), which
  ``grouped_mm`` reads with the same bag's items.

An op this module has no rule for raises ``BagEscape``; the pass then runs again with the
bag's sort gathered (exact, slower, with a warning), so a bag that cannot be followed back to
its tokens is never made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch.fx import Node

from autosp.compiler.args import arguments
from autosp.compiler.ops_table import (
    FACTORY,
    IN_PLACE_POINTWISE,
    LAYOUT,
    POINTWISE,
    REDUCE_DIM,
    SHAPE_ARG_OPS,
    meta,
    op_name,
)
from autosp.compiler.placement import Local, Replicate, Shard, normalize_dim
from autosp.compiler.propagate import (
    BagEscape,
    ShardingPass,
    UnsupportedOp,
    local_rule,
    rule,
    tensor_args,
)
from autosp.compiler.rules import reduce_dim

GROUPED_MM = ("grouped_mm", "grouped_mm_fallback")
"""``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm`` and Hugging Face's fallback op."""


@dataclass(frozen=True, slots=True)
class RowIndex:
    """A value's entries are indices of rows along dim 0 of a value laid out as ``layout``
    (``_layout``); each row appears once if ``permutation``."""

    layout: tuple
    permutation: bool
    rows: Shard | None = None
    """The placement of the rows pointed into, when the indices came from sorting them."""

    @property
    def bag(self) -> str | None:
        """The bag pointed into (its rank-local order gives the values meaning)."""
        return self.layout[1] if self.layout[0] == "bag" else None


def _layout(placement: Shard | Local, size: Any = None) -> tuple:
    """What identifies the rows an index points into: a bag, or a sharded dim 0 by its inner
    size, length and full size."""
    if isinstance(placement, Local):
        return ("bag", placement.bag)
    expr = size.node.expr if isinstance(size, torch.SymInt) else size
    return ("shard", max(placement.inner, 1), placement.length, sympy.sympify(expr))


def _escape(sp: ShardingPass, node: Node) -> BagEscape:
    bags = [bag for arg in tensor_args(node) if (bag := sp.bag_of(arg)) is not None]
    return BagEscape(bags[0], node)


def _size_expr(value: torch.Tensor, dim: int) -> sympy.Expr:
    size = value.shape[dim]
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(size)


# --------------------------------------------------------------------------- making a bag


@rule("sort", "argsort")
def sort(sp: ShardingPass, node: Node) -> None:
    """A sort along the sequence of a 1-D sharded value makes a bag (Note [Token bags]);
    along another dimension it is a per-row reduction."""
    found = arguments(node) or {}
    source = found.get("input")
    placement = sp.placement(source)
    if not isinstance(placement, Shard):
        reduce_dim(sp, node)
        return
    x = meta(source)
    if normalize_dim(found.get("dim", -1), x.dim()) != placement.dim:
        reduce_dim(sp, node)
        return
    if x.dim() != 1 or node.name in sp.unbagged:
        raise UnsupportedOp("a sort along the sequence whose items could not be followed")
    index = RowIndex(_layout(placement, x.shape[0]), permutation=True, rows=placement)
    bag = Local(node.name, 0)
    sp.emit_local(node, (bag, bag) if op_name(node) == "sort" else bag)
    sp.facts[node] = (None, index) if op_name(node) == "sort" else index


# --------------------------------------------------------------------------- on bags


def _bag_dim(sp: ShardingPass, node: Node, source: Node, bag: Local) -> int | None:
    """The output dim of ``node`` that holds ``source``'s bag dim: the one of equal size."""
    if bag.dim is None:
        return None
    out = meta(node)
    out = out[0] if isinstance(out, (tuple, list)) else out
    size = _size_expr(meta(source), bag.dim)
    dims = [d for d in range(out.dim()) if _size_expr(out, d) == size]
    if len(dims) != 1 or not size.free_symbols:
        raise _escape(sp, node)
    return dims[0]


def _one_bag(sp: ShardingPass, node: Node) -> tuple[Node, Local]:
    """The bag input of ``node``: all bag inputs of one bag and dim, other inputs replicated
    without the sequence."""
    bags = [a for a in tensor_args(node) if isinstance(sp.placement(a), Local)]
    first = sp.placement(bags[0])
    for arg in tensor_args(node):
        placement = sp.placement(arg)
        if isinstance(placement, Local):
            aligned = (
                placement.dim is None
                or first.dim is None
                or (meta(arg).dim() - placement.dim == meta(bags[0]).dim() - first.dim)
            )
            if placement.bag != first.bag or (placement.dim is None) != (first.dim is None):
                raise _escape(sp, node)
            if not aligned:
                raise _escape(sp, node)
        elif not isinstance(placement, Replicate) or sp.seq_dims(arg):
            raise _escape(sp, node)
    return bags[0], first


@local_rule(*POINTWISE, *IN_PLACE_POINTWISE, *(n for n in FACTORY if n.endswith("_like")))
def bag_pointwise(sp: ShardingPass, node: Node) -> None:
    """Elementwise ops on items of one bag (and replicated values without the sequence),
    in place too (``out.add_(selected_biases)``)."""
    source, bag = _one_bag(sp, node)
    out = meta(node)
    dim = None if bag.dim is None else bag.dim + out.dim() - meta(source).dim()
    sp.emit_local(node, Local(bag.bag, dim))
    fact = sp.facts.get(node.args[0]) if node.args and isinstance(node.args[0], Node) else None
    if op_name(node) == "floordiv" and isinstance(fact, RowIndex) and fact.layout[0] == "shard":
        divisor = node.args[1]
        _, inner, length, rows = fact.layout
        if isinstance(divisor, int) and divisor > 0 and inner % divisor == 0:
            sp.facts[node] = RowIndex(("shard", inner // divisor, length, rows / divisor), False)


@local_rule(*LAYOUT, *REDUCE_DIM, "split", "chunk", "unbind", "contiguous", "clone")
def bag_rows(sp: ShardingPass, node: Node) -> None:
    """Layout changes and per-item reductions that keep the bag dim whole; a cumulative sum
    over a whole-bag value (per-expert offsets) stays one."""
    source, bag = _one_bag(sp, node)
    name = op_name(node)
    if bag.dim is None:
        if name not in ("cumsum", "to", "float", "int", "long", "contiguous", "clone"):
            raise _escape(sp, node)
        sp.emit_local(node, bag)
        return
    found = arguments(node) or {}
    dim = found.get("dim")
    if name in REDUCE_DIM and (
        dim is None or bag.dim in {normalize_dim(d, meta(source).dim()) for d in _dims(dim)}
    ):
        raise _escape(sp, node)
    if name == "unbind" and normalize_dim(found.get("dim", 0), meta(source).dim()) == bag.dim:
        raise _escape(sp, node)
    out_dim = _bag_dim(sp, node, source, bag)
    placement = Local(bag.bag, out_dim)
    out = meta(node)
    several = isinstance(out, (tuple, list))
    if name in SHAPE_ARG_OPS:
        size = _size_expr(meta(source), bag.dim)
        shape = [
            -1 if i == out_dim else int(s) if not isinstance(s, torch.SymInt) else None
            for i, s in enumerate(out.shape)
        ]
        if None in shape or name == "expand" and not size.free_symbols:
            raise _escape(sp, node)
        sp.emit(node, (sp.env[source], *shape), {}, placement)
        return
    sp.emit_local(node, tuple([placement] * len(out)) if several else placement)


def _dims(dim: Any) -> tuple:
    return tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)


@local_rule("histc")
def bag_histc(sp: ShardingPass, node: Node) -> None:
    """Counts over the whole bag: a value of the bag, not of the sequence."""
    _, bag = _one_bag(sp, node)
    if bag.dim is None:
        raise _escape(sp, node)
    sp.emit_local(node, Local(bag.bag, None))


@local_rule(*GROUPED_MM)
def bag_grouped_mm(sp: ShardingPass, node: Node) -> None:
    """Experts on their groups of the bag: items in, items out, offsets of the same bag."""
    x, weight = node.args[:2]
    offsets = node.kwargs.get("offs", node.args[2] if len(node.args) > 2 else None)
    bag = sp.placement(x)
    if (
        not isinstance(bag, Local)
        or bag.dim != 0
        or sp.placement(offsets) != Local(bag.bag, None)
        or not isinstance(sp.placement(weight), Replicate)
        or sp.seq_dims(weight)
    ):
        raise _escape(sp, node)
    sp.emit_local(node, bag)


@local_rule("getitem")
def bag_getitem(sp: ShardingPass, node: Node) -> None:
    """Picking an output of a bag op; plain indexing that keeps the bag dim; reading rows at
    indices proved to point into the rows read (Note [Token bags])."""
    container, index = node.args
    placement = sp.placement(container)
    if isinstance(placement, tuple):
        sp.emit(node, (sp.env[container], index), {}, placement[index])
        facts = sp.facts.get(container)
        if isinstance(facts, tuple) and facts[index] is not None:
            sp.facts[node] = facts[index]
        return
    if isinstance(index, Node) and isinstance(meta(index), torch.Tensor):
        _read_rows(sp, node, container, index)
        return
    if not isinstance(placement, Local):
        raise _escape(sp, node)
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, Node) for i in items) or None in items:
        raise _escape(sp, node)
    ndim = meta(container).dim()
    consumed = sum(1 for i in items if i is not Ellipsis)
    expanded: list[Any] = []
    for item in items:
        expanded.extend([slice(None)] * (ndim - consumed) if item is Ellipsis else [item])
    if (
        placement.dim is None
        or placement.dim < len(expanded)
        and (
            expanded[placement.dim] != slice(None)
            or any(not isinstance(i, slice) for i in expanded[: placement.dim])
        )
    ):
        raise _escape(sp, node)
    sp.emit(node, (sp.env[container], tuple(expanded)), {}, placement)


def _read_rows(sp: ShardingPass, node: Node, table: Node, index: Node) -> None:
    table_p, index_p = sp.placement(table), sp.placement(index)
    fact = sp.facts.get(index)
    if meta(index).dim() != 1 or meta(index).dtype == torch.bool:
        raise _escape(sp, node)
    if isinstance(index_p, Local) and isinstance(table_p, Replicate):
        if sp.seq_dims(table):
            raise _escape(sp, node)
        placement = index_p  # an expert's row of a table per item
    elif isinstance(index_p, Local) and isinstance(table_p, Shard):
        expected = _layout(table_p, meta(table).shape[0])
        if table_p.dim != 0 or not isinstance(fact, RowIndex) or fact.layout != expected:
            raise _escape(sp, node)
        placement = index_p  # this rank's rows, in the bag's order
    elif isinstance(table_p, Local) and isinstance(index_p, Shard):
        if table_p.dim != 0 or index_p.dim != 0:
            raise _escape(sp, node)
        if not isinstance(fact, RowIndex) or fact.layout != _layout(table_p):
            raise _escape(sp, node)
        placement = index_p  # the bag's items back in the rows' order
    else:
        raise _escape(sp, node)
    sp.emit(node, (sp.env[table], sp.env[index]), {}, placement)


@local_rule("setitem")
def bag_inverse(sp: ShardingPass, node: Node) -> None:
    """``inv[perm] = arange(n)`` with ``perm`` a bag's permutation of sharded rows: ``inv`` is
    held as those rows and points into the bag."""
    target, index, value = node.args
    fact = sp.facts.get(index)
    bag = sp.placement(index)
    if (
        not isinstance(bag, Local)
        or not isinstance(fact, RowIndex)
        or not fact.permutation
        or fact.rows is None
        or sp.placement(target) != bag
        or any(u is not node and u.op != "output" and _before(u, node) for u in target.users)
        or not isinstance(value, Node)
        or op_name(value) != "arange"
        or len(value.args) != 1
        or sympy.sympify(_expr(value.args[0])) != fact.layout[3]
    ):
        raise _escape(sp, node)
    local_index = sp.env[index]
    count = sp.graph.call_method("size", (local_index, 0))
    iota = sp.call(torch.arange, count, dtype=meta(value).dtype, device=meta(value).device)
    sp.emit(node, (sp.env[target], local_index, iota), {}, Replicate())
    sp.placements[target] = fact.rows
    sp.facts[target] = RowIndex(_layout(bag), permutation=True)


def _expr(value: Any) -> Any:
    if isinstance(value, Node):
        value = meta(value)
    return value.node.expr if isinstance(value, torch.SymInt) else value


def _before(a: Node, b: Node) -> bool:
    for n in b.graph.nodes:
        if n is a:
            return True
        if n is b:
            return False
    return False
