"""Per-op sharding rules.

Each rule receives the pass and one node of the single-process graph, emits the node's
rank-local computation and records its placement; raising ``UnsupportedOp`` makes the pass
gather the inputs instead (``ShardingPass.gather_fallback``). Ops whose inputs are all
replicated are copied unchanged, except that an op computing with a parameter on a whole
token tensor first slices that tensor: this is where the token path is sharded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import Node
from torch.utils import _pytree as pytree

from autosp.compiler import runtime
from autosp.compiler.args import arguments
from autosp.compiler.ops_table import (
    FACTORY,
    IN_PLACE_POINTWISE,
    LAYOUT,
    POINTWISE,
    REDUCE_DIM,
    SHAPE_ARG_OPS,
    SIZE_OPS,
    meta,
    op_name,
)
from autosp.compiler.placement import REPLICATE, Partial, Replicate, Shard, normalize_dim
from autosp.compiler.propagate import ShardingPass, UnsupportedOp, rule, tensor_args
from autosp.compiler.seqdims import SeqDim, hint, seq_dims

# --------------------------------------------------------------------------- helpers


def _shard_of(out_dim: SeqDim, like: Shard) -> Shard:
    """The placement of an output whose rows are `like`'s, found at `out_dim`."""
    return Shard(out_dim.dim, like.inner if out_dim.merged else 0, out_dim.length)


def _single_shard(sp: ShardingPass, node: Node) -> tuple[Node, Shard]:
    """The one sharded input of ``node`` (others must be replicated)."""
    inputs = tensor_args(node)
    sharded = [a for a in inputs if isinstance(sp.placement(a), Shard)]
    partial = [a for a in inputs if isinstance(sp.placement(a), Partial)]
    if len(sharded) != 1 or partial:
        raise UnsupportedOp("expected exactly one sequence-sharded input")
    return sharded[0], sp.placement(sharded[0])


def _output_seq_dim(sp: ShardingPass, node: Node, placement: Shard) -> SeqDim:
    """The output dimension that carries ``placement``'s rows, read off the output shape."""
    dims = [d for d in sp.seq_dims(node) if d.merged == placement.merged]
    if placement.merged:
        candidates = dims
    else:
        candidates = [d for d in dims if d.length == placement.length]
    if len(candidates) != 1:
        raise UnsupportedOp("cannot tell which output dimension holds the sequence")
    return candidates[0]


def _emit_local(sp: ShardingPass, node: Node, placement: Any) -> None:
    sp.emit_local(node, placement)


def _args(node: Node) -> dict[str, Any]:
    """``node``'s arguments by name (``args.arguments``); an op with no matching schema is
    not sharded."""
    found = arguments(node)
    if found is None:
        raise UnsupportedOp("its arguments match no known signature")
    return found


# --------------------------------------------------------------------------- pointwise


def pointwise(sp: ShardingPass, node: Node) -> None:
    """Elementwise ops: align every input's sequence dim through broadcasting."""
    out = meta(node)
    if not isinstance(out, torch.Tensor):
        raise UnsupportedOp("non-tensor output")
    inputs = tensor_args(node)
    partial = [a for a in inputs if isinstance(sp.placement(a), Partial)]
    if partial:
        _pointwise_partial(sp, node, partial)
        return
    out_nd = out.dim()
    target: Shard | None = None
    for arg in inputs:
        placement = sp.placement(arg)
        if isinstance(placement, Shard):
            aligned = Shard(
                placement.dim + out_nd - meta(arg).dim(), placement.inner, placement.length
            )
            if target is not None and target != aligned:
                raise UnsupportedOp("inputs are sharded along different dimensions")
            target = aligned
    assert target is not None

    def convert(arg: Any) -> Any:
        if not (isinstance(arg, Node) and isinstance(meta(arg), torch.Tensor)):
            return sp.local(arg)
        if isinstance(sp.placement(arg), Shard):
            return sp.env[arg]
        arg_meta = meta(arg)
        dim = target.dim - (out_nd - arg_meta.dim())
        if dim < 0 or hint(arg_meta.shape[dim]) == 1 and hint(out.shape[target.dim]) != 1:
            return sp.env[arg]
        dims = [d for d in sp.seq_dims(arg) if d.dim == dim]
        if not dims:
            raise UnsupportedOp("a replicated input is not sequence-shaped where it broadcasts")
        return sp.shard(arg, Shard(dim, target.inner, dims[0].length))

    args, kwargs = pytree.tree_map(convert, (node.args, node.kwargs))
    sp.emit(node, args, kwargs, target)


def _pointwise_partial(sp: ShardingPass, node: Node, partial: list[Node]) -> None:
    """Linear scalar ops keep a partial sum partial (``loss_sum / n`` with replicated ``n``)."""
    name = op_name(node)
    others = [a for a in tensor_args(node) if a not in partial]
    linear = name in ("mul", "div", "truediv", "neg", "to", "float", "clone", "contiguous")
    if len(partial) == 1 and linear and all(isinstance(sp.placement(a), Replicate) for a in others):
        if name in ("div", "truediv") and next(iter(_args(node).values())) is not partial[0]:
            raise UnsupportedOp("division by a partial sum")
        _emit_local(sp, node, Partial())
        return
    args, kwargs = sp.replicate((node.args, node.kwargs))
    sp.emit(node, args, kwargs, REPLICATE)


# --------------------------------------------------------------------------- layout


def _shape_arg(node: Node) -> tuple[list[Any], Callable[[list[Any]], tuple]]:
    """The shape argument of view/reshape/expand, and how to rebuild the args from a new one."""
    args = node.args
    shape = args[1] if len(args) == 2 else None
    if isinstance(shape, Node) and shape.target is torch.Size:
        shape = shape.args[0]
    if isinstance(shape, (tuple, list, torch.Size)):
        return list(shape), lambda new: (args[0], tuple(new))
    return list(args[1:]), lambda new: (args[0], *new)


def _merge_inner(in_meta: torch.Tensor, out_meta: torch.Tensor, in_dim: int, out_dim: int) -> int:
    """For a view that merges the sequence dim ``in_dim`` into ``out_dim``: the product of the
    input dims merged after it (all static)."""
    before = math.prod(hint(s) for s in out_meta.shape[:out_dim])
    start, acc = 0, 1
    while acc < before and start < in_meta.dim():
        acc *= hint(in_meta.shape[start])
        start += 1
    if acc != before:
        raise UnsupportedOp("view does not merge whole dimensions")
    target, acc, end = hint(out_meta.shape[out_dim]), 1, start
    while acc < target and end < in_meta.dim():
        acc *= hint(in_meta.shape[end])
        end += 1
    if acc != target or not start <= in_dim < end:
        raise UnsupportedOp("view does not merge whole dimensions")
    inner = in_meta.shape[in_dim + 1 : end]
    if any(isinstance(s, torch.SymInt) for s in inner):
        raise UnsupportedOp("the sequence is merged with a dynamic dimension")
    return math.prod(int(s) for s in inner)


RESHAPES = frozenset({"view", "reshape", "flatten", "unflatten"})
"""Layout ops that may regroup the dimensions merged with the sequence."""


def _reshaped_inner(
    in_meta: torch.Tensor, out_meta: torch.Tensor, placement: Shard, out: int
) -> int:
    """The ``inner`` of a merged sequence after a reshape into output dim ``out``: the
    sequence's stride in the flat layout, which a reshape keeps, over the output dims after
    ``out`` (all static)."""
    after_in, after_out = in_meta.shape[placement.dim + 1 :], out_meta.shape[out + 1 :]
    if any(isinstance(s, torch.SymInt) for s in (*after_in, *after_out)):
        raise UnsupportedOp("the sequence is merged with a dynamic dimension")
    stride = placement.inner * math.prod(int(s) for s in after_in)
    rest = math.prod(int(s) for s in after_out)
    if stride % rest:
        raise UnsupportedOp("a reshape splits the sequence")
    return stride // rest


def layout(sp: ShardingPass, node: Node) -> None:
    """View-like ops: the sequence rows move to the output dim whose size is the sequence."""
    source, placement = _single_shard(sp, node)
    if source is not node.args[0]:  # the viewed tensor is ``self`` for every layout op
        raise UnsupportedOp("the sharded value is not the viewed tensor")
    dims = [d for d in sp.seq_dims(node)]
    if placement.merged:
        plain = [d for d in dims if not d.merged]
        merged = [d for d in dims if d.merged]
        if len(plain) == 1 and not merged:
            out_dim, target = plain[0], Shard(plain[0].dim, 0, plain[0].length)
        elif len(merged) == 1 and not plain:
            out_dim = merged[0]
            inner = placement.inner
            if op_name(node) in RESHAPES:
                inner = _reshaped_inner(meta(source), meta(node), placement, out_dim.dim)
            target = Shard(out_dim.dim, inner, placement.length)
        else:
            raise UnsupportedOp("a merged sequence dimension is reshaped")
    else:
        plain = [d for d in dims if not d.merged and d.length == placement.length]
        merged = [d for d in dims if d.merged]
        if len(plain) == 1 and not merged:
            out_dim, target = plain[0], Shard(plain[0].dim, 0, placement.length)
        elif len(merged) == 1 and not plain:
            out_dim = merged[0]
            inner = _merge_inner(meta(source), meta(node), placement.dim, out_dim.dim)
            target = Shard(out_dim.dim, inner, placement.length)
        else:
            raise UnsupportedOp("cannot tell which output dimension holds the sequence")
    name = op_name(node)
    if name in SHAPE_ARG_OPS:
        shape, rebuild = _shape_arg(node)
        args = rebuild(_local_shape(sp, node, sp.local(shape), out_dim))
        sp.emit(node, (sp.env[args[0]], *args[1:]), sp.local(node.kwargs), target)
    elif name == "unflatten":
        found = _args(node)
        dim, sizes = found["dim"], list(found["sizes"])
        base = normalize_dim(dim, meta(source).dim())
        if not base <= out_dim.dim < base + len(sizes):
            raise UnsupportedOp("unflatten of the sequence dimension")
        sizes[out_dim.dim - base] = -1
        sp.emit(node, sp.local((source, dim, tuple(sizes))), {}, target)
    else:
        _emit_local(sp, node, target)


def _local_shape(sp: ShardingPass, node: Node, shape: list[Any], out_dim: SeqDim) -> list[Any]:
    """Rewrite a full output shape (already mapped to the local graph) for the local rows.

    A plain sequence entry becomes the rows per rank ``L``; a merged one becomes -1, which
    needs every other entry explicit.
    """
    out_meta = meta(node)
    shape = list(shape)
    offset = len(shape) - out_meta.dim()
    position = out_dim.dim + offset
    if not out_dim.merged:
        shape[position] = sp.block_len
        return shape
    for i, entry in enumerate(shape):
        if i != position and isinstance(entry, int) and entry == -1:
            size = out_meta.shape[i - offset]
            if isinstance(size, torch.SymInt):
                raise UnsupportedOp("a dynamic -1 beside a merged sequence in a view")
            shape[i] = int(size)
    shape[position] = -1
    return shape


def _size(sp: ShardingPass, node: Node) -> None:
    """``x.size()`` / ``x.size(d)``: full sizes, whatever the placement of ``x``."""
    source = node.args[0]
    placement = sp.placement(source)
    if not isinstance(placement, Shard):
        sp.emit(node, *sp.replicate((node.args, node.kwargs)), REPLICATE)
        return
    ndim = meta(source).dim()
    dim = _size_dim(node)
    local = sp.env[source]

    def size_of(d: int) -> Any:
        if d == placement.dim:
            return sp.call(
                runtime.full_size,
                local,
                d,
                sp.seq_len,
                sp.group.world,
                placement.inner,
                placement.length,
            )
        return sp.graph.call_method("size", (local, d))

    if op_name(node) == "dim":
        _emit_local(sp, node, REPLICATE)
    elif dim is not None:
        sp.env[node] = size_of(normalize_dim(dim, ndim))
        sp.placements[node] = REPLICATE
    elif op_name(node) == "size":
        sp.env[node] = sp.call(torch.Size, [size_of(d) for d in range(ndim)])
        sp.placements[node] = REPLICATE
    else:
        sp.gather_fallback(node, "numel of a sharded value")


def _size_dim(node: Node) -> Any:
    """The ``dim`` of ``x.size(dim)`` / ``sym_size(x, dim)`` (None for ``x.size()``); these
    have no Python signature to bind to."""
    if "dim" in node.kwargs:
        return node.kwargs["dim"]
    return node.args[1] if len(node.args) > 1 else None


# --------------------------------------------------------------------------- by dim


def reduce_dim(sp: ShardingPass, node: Node) -> None:
    """Reductions and normalisations along ``dim``: row by row unless ``dim`` is the sequence;
    a sum or mean over the sequence is this rank's term of a ``Partial`` sum. Ops with several
    outputs of one shape (``topk``, ``max(dim)``) place each alike."""
    found = _args(node)
    if isinstance(found.get("other"), Node):
        pointwise(sp, node)  # torch.max(a, b): elementwise, not a reduction
        return
    source, placement = _single_shard(sp, node)
    dim = found.get("dim")
    ndim = meta(source).dim()
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    if dim is None or dims == () or placement.dim in {normalize_dim(d, ndim) for d in dims}:
        if op_name(node) in ("sum", "mean") and source is next(iter(found.values())):
            _sum_rows(sp, node, source, placement, found)
            return
        raise UnsupportedOp("reduction along the sequence dimension")
    out = meta(node)
    several = isinstance(out, (tuple, list))
    dims_out = [
        d for d in seq_dims(out[0] if several else out, sp.syms) if d.merged == placement.merged
    ]
    if not placement.merged:
        dims_out = [d for d in dims_out if d.length == placement.length]
    if len(dims_out) != 1:
        raise UnsupportedOp("cannot tell which output dimension holds the sequence")
    target = _shard_of(dims_out[0], placement)
    _emit_local(sp, node, tuple([target] * len(out)) if several else target)


def _sum_rows(
    sp: ShardingPass, node: Node, source: Node, placement: Shard, found: dict[str, Any]
) -> None:
    """``sum`` / ``mean`` over dims including the sequence: this rank's rows (padding left
    out; a mean divides by the whole count), summed over ranks where the value is needed."""
    dim = found.get("dim")
    dims = list(dim) if isinstance(dim, (tuple, list)) else None if dim is None else [dim]
    local = sp.call(
        runtime.sum_rows,
        sp.env[source],
        dims or None,
        bool(found.get("keepdim", False)),
        found.get("dtype"),
        op_name(node) == "mean",
        placement.dim,
        sp.seq_len,
        sp.group.rank,
        sp.group.world,
        placement.inner,
        placement.length,
    )
    sp.env[node], sp.placements[node] = local, Partial()


@rule("histc")
def histc(sp: ShardingPass, node: Node) -> None:
    """A histogram of sharded values with a fixed range: this rank's counts, a ``Partial``."""
    source, placement = _single_shard(sp, node)
    found = _args(node)
    low, high = found.get("min"), found.get("max")
    if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and low < high):
        raise UnsupportedOp("a histogram whose range is taken from the data")
    local = sp.call(
        runtime.histc_rows,
        sp.env[source],
        found.get("bins", 100),
        low,
        high,
        placement.dim,
        sp.seq_len,
        sp.group.rank,
        sp.group.world,
        placement.inner,
        placement.length,
    )
    sp.env[node], sp.placements[node] = local, Partial()


@rule("layer_norm", "rms_norm", "group_norm")
def norm(sp: ShardingPass, node: Node) -> None:
    source, placement = _single_shard(sp, node)
    found = _args(node)
    if source is not found["input"]:
        raise UnsupportedOp("sharded weight")
    shape = found.get("normalized_shape")
    count = len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
    if op_name(node) == "group_norm" or placement.dim >= meta(source).dim() - count:
        raise UnsupportedOp("normalisation over the sequence dimension")
    _emit_local(sp, node, placement)


@rule("linear", "embedding")
def rowwise_first_arg(sp: ShardingPass, node: Node) -> None:
    """``linear(x, W)``, ``embedding(ids, W)``: rows of the first argument stay rows."""
    source, placement = _single_shard(sp, node)
    if source is not _args(node)["input"]:
        raise UnsupportedOp("a sharded weight")
    if (
        op_name(node) == "linear"
        and placement.dim == meta(source).dim() - 1
        and not placement.merged
    ):
        raise UnsupportedOp("the sequence is the contracted dimension")
    _emit_local(sp, node, placement)


MATMUL_OPERANDS = (
    ("mat1", "mat2"),
    ("batch1", "batch2"),
    ("input", "other"),
    ("input", "mat2"),
    ("a", "b"),
)
"""The names of the two factors: addmm/baddbmm (whose ``input`` is the bias), matmul, mm/bmm,
and ``operator.matmul`` (``a @ b``)."""


@rule("matmul", "mm", "bmm", "addmm", "baddbmm")
def matmul(sp: ShardingPass, node: Node) -> None:
    """Products whose sequence rows belong to the left operand only."""
    source, placement = _single_shard(sp, node)
    found = _args(node)
    pairs = [(found[a], found[b]) for a, b in MATMUL_OPERANDS if a in found and b in found]
    if not pairs:
        raise UnsupportedOp("unexpected operands")
    left, right = pairs[0]
    if source is not left:
        raise UnsupportedOp("the sequence is in the right operand (attention scores?)")
    if sp.seq_dims(right):
        raise UnsupportedOp("both operands carry the sequence")
    if placement.dim == meta(left).dim() - 1:
        raise UnsupportedOp("the sequence is the contracted dimension")
    out_dim = _output_seq_dim(sp, node, placement)
    if op_name(node) in ("addmm", "baddbmm") and sp.seq_dims(found["input"]):
        raise UnsupportedOp("a sequence-shaped bias")
    _emit_local(sp, node, _shard_of(out_dim, placement))


@rule("getitem")
def getitem(sp: ShardingPass, node: Node) -> None:
    """Indexing: tuples pick a placement; tensors keep the rows if the sequence is untouched
    or only cut at its end (``x[:, :-1]``)."""
    container, index = node.args
    placement = sp.placement(container)
    if isinstance(placement, tuple):
        sp.emit(node, (sp.env[container], index), {}, placement[index])
        return
    if not isinstance(meta(container), torch.Tensor):
        _emit_local(sp, node, REPLICATE)
        return
    source, placement = _single_shard(sp, node)
    if source is not container:
        raise UnsupportedOp("indexing with a sharded index")
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, Node) and isinstance(meta(i), torch.Tensor) for i in items):
        raise UnsupportedOp("advanced indexing")
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    ndim = meta(source).dim()
    expanded: list[Any] = []
    for item in items:
        if item is Ellipsis:
            expanded.extend([slice(None)] * (ndim - consumed))
        else:
            expanded.append(item)
    in_dim = 0
    for position, item in enumerate(expanded):
        if item is None:
            continue
        if in_dim == placement.dim:
            if not isinstance(item, slice) or item.step not in (None, 1):
                raise UnsupportedOp("indexing into the sequence dimension")
            if item.start not in (None, 0):
                raise UnsupportedOp("a slice that drops leading tokens")
            expanded[position] = slice(None)
            break
        in_dim += 1
    out_dim = _output_seq_dim_any_length(sp, node, placement)
    if out_dim.length > placement.length:
        raise UnsupportedOp("unexpected output length")
    target = Shard(out_dim.dim, placement.inner, out_dim.length)
    sp.emit(node, (sp.env[source], tuple(sp.local(expanded))), {}, target)


@rule("setitem")
def setitem(sp: ShardingPass, node: Node) -> None:
    """``x[index] = value`` on a sharded ``x`` (Note [In-place ops]): each rank writes its own
    rows when the index takes the whole sequence (``x[:, :, :4] = 0``); a sequence-shaped
    value is sliced like the rows it fills."""
    target, index, value = node.args
    placement = sp.placement(target)
    if not isinstance(placement, Shard) or placement.merged:
        raise UnsupportedOp("assignment into a value that is not sharded along the sequence")
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, Node) and isinstance(meta(i), torch.Tensor) for i in items):
        raise UnsupportedOp("assignment through advanced indexing")
    ndim = meta(target).dim()
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for item in items:
        expanded.extend([slice(None)] * (ndim - consumed) if item is Ellipsis else [item])
    in_dim = view_dim = 0
    seq_view_dim = None
    for item in expanded:
        if item is None:
            view_dim += 1
            continue
        if in_dim == placement.dim:
            if item != slice(None):
                raise UnsupportedOp("assignment into part of the sequence")
            seq_view_dim = view_dim
        view_dim += isinstance(item, slice)
        in_dim += 1
    view_ndim = view_dim + ndim - in_dim
    if seq_view_dim is None:
        seq_view_dim = view_dim + placement.dim - in_dim
    local_value = _assigned_value(sp, value, seq_view_dim, view_ndim, placement)
    sp.emit(node, (sp.env[target], tuple(sp.local(expanded)), local_value), {}, REPLICATE)


def _assigned_value(
    sp: ShardingPass, value: Any, seq_dim: int, view_ndim: int, placement: Shard
) -> Any:
    """The local value to assign into rows held as ``placement``, whose sequence is dim
    ``seq_dim`` of the indexed view (``view_ndim`` dims); ``value`` broadcasts to that view."""
    if not (isinstance(value, Node) and isinstance(meta(value), torch.Tensor)):
        return sp.local(value)
    value_meta = meta(value)
    dim = seq_dim - (view_ndim - value_meta.dim())
    value_placement = sp.placement(value)
    if dim < 0 or hint(value_meta.shape[dim]) == 1:
        if not isinstance(value_placement, Replicate):
            raise UnsupportedOp("a distributed value broadcast over the sequence")
        return sp.env[value]
    want = Shard(dim, 0, placement.length)
    if value_placement == want:
        return sp.env[value]
    dims = [d for d in sp.seq_dims(value) if d.dim == dim and d.length == placement.length]
    if not isinstance(value_placement, Replicate) or not dims:
        raise UnsupportedOp("the assigned value is not aligned with the rows it fills")
    return sp.shard(value, want)


def _output_seq_dim_any_length(sp: ShardingPass, node: Node, placement: Shard) -> SeqDim:
    dims = [d for d in sp.seq_dims(node) if d.merged == placement.merged]
    if len(dims) != 1:
        raise UnsupportedOp("cannot tell which output dimension holds the sequence")
    return dims[0]


def _is_empty_along(value: torch.Tensor, dim: int) -> bool:
    """Whether ``value`` has no entries along ``dim`` (statically), or is the legacy 1-D empty
    tensor that ``cat`` skips."""
    if value.dim() == 1 and value.shape[0] == 0:
        return True
    size = value.shape[normalize_dim(dim, value.dim())] if value.dim() else 1
    return not isinstance(size, torch.SymInt) and size == 0


@rule("cat", "concat", "concatenate", "stack")
def cat(sp: ShardingPass, node: Node) -> None:
    """Concatenation along another dimension than the sequence. Pieces empty along the
    concatenated dimension (an empty key/value cache) are the identity and are dropped."""
    found = _args(node)
    dim = found.get("dim", 0)
    stack = op_name(node) == "stack"
    tensors = list(found["tensors"])
    if not stack:
        tensors = [t for t in tensors if not _is_empty_along(meta(t), dim)]
    sharded = [t for t in tensors if isinstance(sp.placement(t), Shard)]
    if not sharded or any(isinstance(sp.placement(t), Partial) for t in tensors):
        raise UnsupportedOp("partial inputs")
    placement = sp.placement(sharded[0])
    ndim = meta(sharded[0]).dim()
    dim = normalize_dim(dim, ndim + 1 if stack else ndim)
    out_dtype = meta(node).dtype
    if len(tensors) == 1 and not stack:
        local = sp.env[tensors[0]]
        if meta(tensors[0]).dtype != out_dtype:
            local = sp.graph.call_method("to", (local, out_dtype))
        sp.env[node], sp.placements[node] = local, placement
        return
    if not stack and dim == placement.dim:
        raise UnsupportedOp("concatenation along the sequence")
    local = []
    for t in tensors:
        if sp.placement(t) == placement:
            local.append(sp.env[t])
        elif isinstance(sp.placement(t), Replicate):
            local.append(sp.shard(t, placement))
        else:
            raise UnsupportedOp("inputs sharded differently")
    out_dim = placement.dim + (1 if stack and dim <= placement.dim else 0)
    sp.emit(node, (local, dim), {}, Shard(out_dim, placement.inner, placement.length))


@rule("split", "chunk", "unbind", "tensor_split")
def split(sp: ShardingPass, node: Node) -> None:
    """Splits along another dimension than the sequence: every piece keeps the rows."""
    source, placement = _single_shard(sp, node)
    found = _args(node)
    if source is not next(iter(found.values())):
        raise UnsupportedOp("the sharded value is not the split tensor")
    ndim = meta(source).dim()
    dim = normalize_dim(found.get("dim", 0), ndim)
    if dim == placement.dim:
        raise UnsupportedOp("splitting the sequence")
    out_dim = placement.dim - (1 if op_name(node) == "unbind" and dim < placement.dim else 0)
    item = Shard(out_dim, placement.inner, placement.length)
    _emit_local(sp, node, tuple([item] * len(meta(node))))


@rule("pad")
def pad(sp: ShardingPass, node: Node) -> None:
    source, placement = _single_shard(sp, node)
    found = _args(node)
    if source is not found["input"]:
        raise UnsupportedOp("the sharded value is the padding value")
    if placement.dim >= meta(source).dim() - len(found["pad"]) // 2:
        raise UnsupportedOp("padding the sequence dimension")
    _emit_local(sp, node, placement)


@rule("scatter", "scatter_add", "scatter_reduce", "gather")
def index_along_other_dim(sp: ShardingPass, node: Node) -> None:
    """``scatter`` / ``gather`` along a dimension other than the sequence, with every tensor
    operand sharded alike: each row reads and writes its own row only
    (``zeros_like(probs).scatter(-1, chosen, weights)``, the gates of a MoE router)."""
    found = _args(node)
    inputs = tensor_args(node)
    placements = {sp.placement(a) for a in inputs}
    placement = placements.pop()
    if placements or not isinstance(placement, Shard):
        raise UnsupportedOp("operands not all sharded alike")
    ndim = meta(node).dim()
    if any(meta(a).dim() != ndim for a in inputs):
        raise UnsupportedOp("operands of different ranks")
    if normalize_dim(found["dim"], ndim) == placement.dim:
        raise UnsupportedOp("indexing along the sequence")
    _emit_local(sp, node, placement)


def factory(sp: ShardingPass, node: Node) -> None:
    """``zeros_like(x)`` follows ``x``; other factories ignore their input's values."""
    if op_name(node).endswith("_like"):
        pointwise(sp, node)
        return
    _emit_local(sp, node, REPLICATE)


rule(*SIZE_OPS)(_size)
rule(*POINTWISE, *IN_PLACE_POINTWISE, default=True)(pointwise)
rule(*LAYOUT, default=True)(layout)
rule(*REDUCE_DIM, default=True)(reduce_dim)
rule(*FACTORY, default=True)(factory)
