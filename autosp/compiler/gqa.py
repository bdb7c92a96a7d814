"""Grouped-query attention whose key/value heads the graph repeats: the attention takes them
unrepeated.

Note [Repeated key/value heads]
-------------------------------
Under ``torch.compile`` Hugging Face repeats each key/value head before SDPA (``repeat_kv``)::

    k = k[:, :, None, :, :].expand(B, Hkv, n, S, D).reshape(B, Hkv * n, S, D)

instead of passing ``enable_gqa=True`` (its eager path does that; Note in
``../shared/NOTES.md``), and hand-written models spell it ``repeat_interleave(n, dim=1)``.
Sharded, the repeated keys and values would cross the network ``n`` times over (Ulysses'
all-to-alls, the ring's key/value blocks) and be saved ``n`` times for the backward.
``fold_repeated_kv_pass`` gives the attention the unrepeated key and value and
``enable_gqa=True``: SDPA lets query head ``h`` use key/value head ``h // n``, which is the
order ``repeat_kv`` and ``repeat_interleave`` make, so the values are the same (the gradient
of a key head is summed over its ``n`` query heads by the kernel instead of by the repeat's
backward). Every strategy takes fewer key/value heads than query heads (Note [Ulysses]).

Folded only when key and value are both repeated ``n`` times, the query has ``Hkv * n`` heads
and the attention is the only user of every node of each repeat (else the repeated tensor
exists anyway).
"""

from __future__ import annotations

from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from autosp.compiler.args import arguments
from autosp.compiler.context import CompileContext
from autosp.compiler.ops_table import ATTENTION, meta, op_name

ENABLE_GQA_POSITION = 7
"""``enable_gqa``'s position in ``scaled_dot_product_attention`` and
``softcapped_attention``."""


def _same(a: object, b: object) -> bool:
    return bool(statically_known_true(a == b))


def _only_user(node: Node, user: Node) -> bool:
    return list(node.users) == [user]


def _unsqueezed_at_2(node: Node) -> Node | None:
    """``x`` if ``node`` is ``x[:, :, None]`` (or ``x.unsqueeze(2)``) of a 4-d ``x``."""
    name = op_name(node)
    source = node.args[0] if node.args else None
    if not isinstance(source, Node) or meta(source) is None or meta(source).dim() != 4:
        return None
    if name == "getitem":
        index = node.args[1]
        full = slice(None, None, None)
        if index in ((full, full, None), (full, full, None, full, full)):
            return source
        return None
    if name == "unsqueeze":
        dim = (arguments(node) or {}).get("dim")
        return source if dim in (2, -3) else None
    return None


def _repeat(node: Node) -> tuple[Node, int, list[Node]] | None:
    """``(x, n, chain)`` if ``node`` repeats each head of ``x`` ``[B, Hkv, S, D]`` ``n`` times
    along dim 1 (``repeat_kv`` or ``repeat_interleave``); ``chain``: its nodes, last first."""
    value = meta(node)
    if value is None or value.dim() != 4:
        return None
    name = op_name(node)
    if name == "repeat_interleave":
        args = arguments(node) or {}
        source, repeats, dim = args.get("input"), args.get("repeats"), args.get("dim")
        if isinstance(source, Node) and isinstance(repeats, int) and dim in (1, -3):
            return source, repeats, [node]
        return None
    if name not in ("reshape", "view"):
        return None
    expanded = node.args[0]
    if not isinstance(expanded, Node) or op_name(expanded) != "expand":
        return None
    unsqueezed = expanded.args[0]
    if not isinstance(unsqueezed, Node):
        return None
    source = _unsqueezed_at_2(unsqueezed)
    if source is None or not _only_user(expanded, node) or not _only_user(unsqueezed, expanded):
        return None
    small, big, wide = meta(source).shape, value.shape, meta(expanded).shape
    n = wide[2]  # the unsqueezed dim: 4-d source, so wide is 5-d
    shapes_match = (
        isinstance(n, int)
        and all(_same(wide[i], small[j]) for i, j in ((0, 0), (1, 1), (3, 2), (4, 3)))
        and _same(big[1], small[1] * n)
        and all(_same(big[i], small[i]) for i in (0, 2, 3))
    )
    return (source, n, [node, expanded, unsqueezed]) if shapes_match else None


def fold_repeated_kv_pass(gm: GraphModule, ctx: CompileContext) -> GraphModule:
    """Give each attention its unrepeated key/value heads with ``enable_gqa=True`` (Note
    [Repeated key/value heads])."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or op_name(node) not in ATTENTION or len(node.args) < 3:
            continue
        query, key, value = node.args[:3]
        found = [_repeat(t) if isinstance(t, Node) else None for t in (key, value)]
        if None in found or key is value:
            continue
        (k_small, n, k_chain), (v_small, n_v, v_chain) = found
        heads = meta(query).shape[-3]
        if n != n_v or n < 2 or not _same(heads, meta(k_small).shape[1] * n):
            continue
        if not (_only_user(key, node) and _only_user(value, node)):
            continue
        args = list(node.args)
        args[1], args[2] = k_small, v_small
        if len(args) > ENABLE_GQA_POSITION:
            args[ENABLE_GQA_POSITION] = True
            node.args = tuple(args)
        else:
            node.args = tuple(args)
            node.kwargs = {**node.kwargs, "enable_gqa": True}
        for dead in k_chain + v_chain:
            graph.erase_node(dead)
    gm.recompile()
    return gm
