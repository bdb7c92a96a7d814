"""In-place ops: which values an op writes, and keeping every reader of them right.

Note [In-place ops]
-------------------
Dynamo keeps in-place ops in the graph (``x.mul_(2)``, ``x[i] = v``, ``x += y``,
``F.relu(x, inplace=True)``, ``out=``): the op's own result is often unused, and later ops read
the written node ``x`` or a view of its memory taken earlier. In the rank-local graph ``x`` is
held in its placement (``env[x]``) and possibly as converted copies (gathered or sharded, cached
by the pass). After the op's rule has run, ``settle_writes`` keeps the single-process meaning:

* the op wrote ``env[x]`` itself (an aligned shard, a replicated value): nothing moves;
* the op wrote a converted copy (a rule sliced a replicated ``x``, a fallback gathered a
  sharded one): ``x`` is from now on held as that copy, in the copy's placement;
* either way, copies of that memory converted before the write are stale and are dropped;
* another name for the same memory (a view taken before the write and read after it, a graph
  input, which the caller reads) must see the write: it does when its local tensor is a view
  of the written local tensor. Otherwise the pass refuses with an ``AutoSPError``: it would
  read stale values.

Ops that change a value's shape in place (``x.unsqueeze_(0)``) are refused: the traced shapes
the rules read would be stale. The rank-local graph keeps every in-place node even when its
result is unused (``keep_writes``; FX's dead-code elimination would drop ``x.mul_(2)``).
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import Node
from torch.multiprocessing.reductions import StorageWeakRef

from autosp.compiler.ops_table import LAYOUT, meta, op_name
from autosp.errors import AutoSPError

if TYPE_CHECKING:
    from autosp.compiler.propagate import ShardingPass

IN_PLACE_OPERATORS = frozenset(
    {
        operator.setitem,
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        operator.ifloordiv,
        operator.imod,
        operator.ipow,
        operator.iand,
        operator.ior,
        operator.ixor,
        operator.ilshift,
        operator.irshift,
        operator.imatmul,
    }
)
"""Python operators that write their first argument when it is a tensor."""

NOT_WRITES = frozenset({"requires_grad_", "retain_grad_", "share_memory_"})
"""Methods ending in ``_`` that do not write the tensor's values."""

RESHAPING = LAYOUT | {"resize", "resize_as", "set", "as_strided", "swapdims", "swapaxes"}
"""Ops whose in-place form changes the written value's shape."""

LOCAL_VIEWS = frozenset(
    """
    view view_as transpose permute unsqueeze squeeze expand expand_as t swapaxes swapdims
    movedim unflatten narrow select detach alias diagonal as_strided split chunk unbind
    tensor_split real imag unfold
    """.split()
)
"""Ops whose result always shares its input's memory (``reshape``, ``contiguous`` may copy)."""

Path = tuple[str, Any]
"""Where a written argument sits in a node: ``("args", 0)`` or ``("kwargs", "out")``."""


def _name(target: Any) -> str:
    return getattr(target, "__name__", "") if not isinstance(target, str) else target


def _writes_first(node: Node) -> bool:
    """Whether the op writes its first argument, read off its target alone."""
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("__") and name not in NOT_WRITES
    if node.op != "call_function":
        return False
    target = node.target
    if target in IN_PLACE_OPERATORS or _inplace_flag(node):
        return True
    if isinstance(target, torch._ops.OpOverload):
        first = target._schema.arguments[:1]
        return bool(first and first[0].alias_info and first[0].alias_info.is_write)
    if getattr(target, "__module__", None) in ("_operator", "operator"):
        return False  # operator.and_, operator.not_: not in-place
    name = _name(target)
    return name.endswith("_") and not name.startswith("_") and name not in NOT_WRITES


@functools.cache
def _inplace_position(target: Callable[..., Any]) -> int | None:
    """The position of a Python function's ``inplace`` parameter (``F.relu``), if any."""
    try:
        names = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def _inplace_flag(node: Node) -> bool:
    """``F.relu(x, inplace=True)`` or ``F.relu(x, True)``."""
    if "inplace" in node.kwargs:
        return node.kwargs["inplace"] is True
    try:
        position = _inplace_position(node.target)
    except TypeError:  # an unhashable target
        return False
    return position is not None and len(node.args) > position and node.args[position] is True


def written_paths(node: Node) -> list[Path]:
    """Where the tensors that ``node`` writes sit in its arguments."""
    if node.op not in ("call_function", "call_method"):
        return []
    paths: list[Path] = []
    if node.args and _writes_first(node):
        paths.append(("args", 0))
    if isinstance(node.kwargs.get("out"), Node):
        paths.append(("kwargs", "out"))
    return paths


def writes_in_place(node: Node) -> bool:
    """Whether ``node`` (of either graph) writes one of its arguments: kept by dead-code
    elimination even when its result is unused."""
    return node.is_impure() or bool(written_paths(node))


def _at(node: Node, path: Path) -> Any:
    where, key = path
    return node.args[key] if where == "args" else node.kwargs.get(key)


def _storage(node: Node) -> StorageWeakRef | None:
    value = meta(node)
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
        return None
    try:
        return StorageWeakRef(value.untyped_storage())
    except (NotImplementedError, RuntimeError):
        return None


def _is_basic_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return not any(isinstance(item, Node) for item in items)


def local_base(node: Any) -> Any:
    """The local tensor whose memory ``node`` (of the rank-local graph) views."""
    while isinstance(node, Node) and node.op in ("call_function", "call_method") and node.args:
        name = op_name(node)
        is_view = name in LOCAL_VIEWS or (name == "getitem" and _is_basic_index(node.args[1]))
        if not (is_view or (written_paths(node) and written_paths(node)[0] == ("args", 0))):
            break
        node = node.args[0]
    return node


class Aliases:
    """The nodes of the source graph that share memory, from Dynamo's traced (fake) values."""

    def __init__(self, nodes: list[Node]) -> None:
        self.order = {n: i for i, n in enumerate(nodes)}
        self.by_storage: dict[StorageWeakRef, list[Node]] = {}
        for n in nodes:
            key = _storage(n)
            if key is not None:
                self.by_storage.setdefault(key, []).append(n)

    def before(self, target: Node, node: Node) -> list[Node]:
        """The names of ``target``'s memory made before ``node``."""
        key = _storage(target)
        same = self.by_storage.get(key, [target]) if key is not None else [target]
        return [n for n in same if self.order[n] < self.order[node]]

    def read_after(self, alias: Node, node: Node) -> bool:
        """Whether ``alias`` is read after ``node`` (the caller reads graph inputs)."""
        return alias.op == "placeholder" or any(
            self.order[user] > self.order[node] for user in alias.users
        )


def _refuse(node: Node, why: str, fix: str) -> AutoSPError:
    return AutoSPError(
        f"autosp: the in-place op '{op_name(node)}' ({node.format_node()}) {why}. {fix}"
    )


def settle_writes(sp: ShardingPass, node: Node, aliases: Aliases) -> None:
    """After ``node``'s rule: hold every value it wrote as written (Note [In-place ops])."""
    paths = [p for p in written_paths(node) if isinstance(meta(_at(node, p)), torch.Tensor)]
    if not paths:
        return
    if op_name(node).removesuffix("_") in RESHAPING:
        raise _refuse(
            node,
            "changes the shape of a value in place",
            "Use the out-of-place op (x = x.unsqueeze(0) instead of x.unsqueeze_(0)).",
        )
    new = sp.env.get(node)
    if not (isinstance(new, Node) and new.target == node.target and new.op == node.op):
        raise _refuse(
            node,
            "was rewritten into other ops, so autosp cannot follow what it writes",
            "Use the out-of-place op (x = x * 2 instead of x.mul_(2)).",
        )
    for path in paths:
        _settle(sp, node, _at(node, path), _at(new, path), path, aliases)


def _settle(
    sp: ShardingPass, node: Node, target: Node, local: Node, path: Path, aliases: Aliases
) -> None:
    names = aliases.before(target, node)
    if local is not sp.env[target]:
        copies = {copy: key[1] for key, copy in sp._converted.items()}
        if local in copies:
            placement = copies[local]
        elif path == ("args", 0) and node.target is not operator.setitem:
            placement = sp.placements[node]  # the op returns the tensor it wrote
        else:
            raise _refuse(
                node,
                "writes a tensor autosp made for it, not the value it names",
                "Use the out-of-place op (x = x * 2 instead of x.mul_(2)).",
            )
        sp.env[target], sp.placements[target] = local, placement
    for key in [k for k in sp._converted if k[0] in names]:
        del sp._converted[key]
    base = local_base(local)
    for alias in names:
        if alias is target and alias.op != "placeholder":
            continue
        if aliases.read_after(alias, node) and local_base(_raw(sp, alias)) is not base:
            what = "a graph input" if alias.op == "placeholder" else f"'{alias.name}'"
            raise _refuse(
                node,
                f"writes memory that {what} also names, and {what} is read after the write "
                "but is held differently on each rank, so it would be read stale",
                "Write a new tensor instead (out-of-place op), or take the view after the "
                "in-place op.",
            )


def _raw(sp: ShardingPass, node: Node) -> Node:
    """The local tensor of ``node``; for a graph input, its placeholder itself."""
    if node.op == "placeholder":
        return sp.inputs[node]
    return sp.env[node]
