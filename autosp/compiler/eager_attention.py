"""Recognising attention written out by hand, so that it runs as one attention call.

Hugging Face's "eager" attention (and many hand-written models) computes::

    scores = matmul(q, k.transpose(-2, -1)) * scale     # or / sqrt(d), or no scale
    scores = scores + mask                               # optional additive mask, or
    scores = scores.masked_fill(hidden, -inf)            # nanoGPT: the hidden positions
    probs  = softmax(scores, dim=-1, dtype=float32).to(q.dtype)
    probs  = dropout(probs, p)                           # optional
    out    = matmul(probs, v)

``fuse_eager_attention_pass`` replaces each such chain by
``scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)``, which the
attention strategies then parallelise (and whose mask ``masks.py`` may recognise as causal).
A tanh soft-cap of the scores (Gemma-2: ``cap * tanh(scores / cap)`` before the mask) becomes
``softcapped_attention``. The S x S ``scores`` are never sharded along keys, so without this the
chain would be gathered. Chains with anything else between the two products (ALiBi biases
added after the mask) are left as they are.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from autosp.compiler.args import arguments
from autosp.compiler.attention.reference import softcapped_attention
from autosp.compiler.context import CompileContext
from autosp.compiler.mutation import writes_in_place
from autosp.compiler.ops_table import meta, op_name

logger = logging.getLogger(__name__)

CASTS = frozenset({"to", "float", "type_as", "contiguous"})


def _skip_casts(node: Node) -> Node:
    while isinstance(node, Node) and op_name(node) in CASTS:
        node = node.args[0]
    return node


def _constant(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _transposed_key(node: Node) -> Node | None:
    """``k`` if ``node`` is ``k.transpose(-2, -1)`` (any spelling of the last two dims)."""
    if op_name(node) not in ("transpose", "swapaxes", "swapdims"):
        return None
    ndim = meta(node).dim()
    dims = {d % ndim for d in node.args[1:3]} if len(node.args) >= 3 else set()
    return node.args[0] if dims == {ndim - 2, ndim - 1} else None


def _match_softcap(node: Node) -> tuple[Node, float] | None:
    """(scores, cap) if ``node`` computes ``tanh(scores / cap) * cap``."""
    if op_name(node) != "mul" or not isinstance(node.args[0], Node):
        return None
    cap = _constant(node.args[1])
    tanh = node.args[0]
    if cap is None or op_name(tanh) != "tanh":
        return None
    divided = tanh.args[0]
    if not isinstance(divided, Node) or op_name(divided) not in ("div", "truediv"):
        return None
    if _constant(divided.args[1]) != cap or not isinstance(divided.args[0], Node):
        return None
    return divided.args[0], cap


@dataclass(frozen=True)
class Hidden:
    """A boolean mask of the positions a ``masked_fill(..., -inf)`` hides."""

    positions: Node


def _match_scores(node: Node) -> tuple[Node, Node, float, Any, float] | None:
    """(q, k, scale, mask, softcap) if ``node`` computes
    ``[softcap *tanh(] q @ k^T * scale [/ softcap)] (+ mask | .masked_fill(hidden, -inf))``;
    a mask given as the hidden positions is returned as ``Hidden(hidden)``."""
    node = _skip_casts(node)
    if op_name(node) == "masked_fill":
        found = arguments(node) or {}
        scores, hidden, value = found.get("input"), found.get("mask"), found.get("value")
        inner = _match_scores(scores) if isinstance(scores, Node) else None
        is_bool = isinstance(hidden, Node) and getattr(meta(hidden), "dtype", None) == torch.bool
        if inner is None or inner[3] is not None or not is_bool or _constant(value) != -math.inf:
            return None
        return inner[0], inner[1], inner[2], Hidden(hidden), inner[4]
    if op_name(node) == "add":
        left, right = node.args[:2]
        for scores, mask in ((left, right), (right, left)):
            inner = _match_scores(scores) if isinstance(scores, Node) else None
            masked = isinstance(mask, Node) and isinstance(meta(mask), torch.Tensor)
            if inner is not None and inner[3] is None and masked:
                return inner[0], inner[1], inner[2], mask, inner[4]
        return None
    capped = _match_softcap(node)
    if capped is not None:
        inner = _match_scores(capped[0])
        if inner is None or inner[3] is not None or inner[4]:
            return None
        return inner[0], inner[1], inner[2], None, capped[1]
    scale = 1.0
    if op_name(node) in ("mul", "div", "truediv"):
        left, right = node.args[:2]
        factor = _constant(right) if isinstance(left, Node) else _constant(left)
        if factor is None or (op_name(node) != "mul" and not isinstance(left, Node)):
            return None
        scale = factor if op_name(node) == "mul" else 1.0 / factor
        node = _skip_casts(left if isinstance(left, Node) else right)
    if op_name(node) != "matmul" or len(node.args) != 2:
        return None
    query, key_t = node.args
    key = _transposed_key(key_t) if isinstance(key_t, Node) else None
    if key is None:
        return None
    return query, key, scale, None, 0.0


def _softmax_dim_is_last(node: Node) -> bool:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return isinstance(dim, int) and dim % meta(node).dim() == meta(node).dim() - 1


def _without_max_shift(node: Node) -> Node:
    """``x`` if ``node`` is ``x - x.max(-1, keepdim=True).values`` (softmax ignores it)."""
    if op_name(node) != "sub" or not isinstance(node.args[1], Node):
        return node
    shift = node.args[1]
    if op_name(shift) == "getitem" and shift.args[1] == 0:
        shift = shift.args[0]
    if op_name(shift) in ("max", "amax") and shift.args and shift.args[0] is node.args[0]:
        return node.args[0]
    return node


def _match_sinks(node: Node) -> tuple[Node, Node | None, Node | None]:
    """(softmax, scores, sinks) if ``node`` is ``softmax(cat([scores, sinks], -1))[..., :-1]``
    with ``sinks`` one logit per head (``[..., heads, 1, 1]`` once its expand is undone);
    else (node, None, None)."""
    container, index = node.args
    items = index if isinstance(index, tuple) else (index,)
    if not isinstance(container, Node) or items[-1] != slice(None, -1, None):
        return node, None, None
    if any(i is not Ellipsis and i != slice(None) for i in items[:-1]):
        return node, None, None
    softmax = _skip_casts(container)
    if op_name(softmax) != "softmax":
        return node, None, None
    joined = _without_max_shift(_skip_casts(softmax.args[0]))
    if op_name(joined) != "cat" or not isinstance(joined.args[0], (list, tuple)):
        return node, None, None
    dim = joined.kwargs.get("dim", joined.args[1] if len(joined.args) > 1 else 0)
    pieces = joined.args[0]
    if len(pieces) != 2 or dim % meta(joined).dim() != meta(joined).dim() - 1:
        return node, None, None
    scores, sinks = pieces
    while op_name(sinks) in ("expand", "expand_as", "broadcast_to"):
        sinks = sinks.args[0]
    shape = meta(sinks).shape
    if meta(sinks).dim() < 3 or any(isinstance(s, torch.SymInt) or s != 1 for s in shape[-2:]):
        return node, None, None
    return softmax, scores, sinks


def fuse_eager_attention_pass(gm: GraphModule, ctx: CompileContext) -> GraphModule:
    """Replace written-out attention chains by ``scaled_dot_product_attention``."""
    fused = 0
    for node in list(gm.graph.nodes):
        if op_name(node) != "matmul" or len(node.args) != 2:
            continue
        probs, value = node.args
        if not isinstance(probs, Node):
            continue
        dropout_p = 0.0
        probs = _skip_casts(probs)
        if op_name(probs) == "dropout":
            training = probs.kwargs.get("training", probs.args[2] if len(probs.args) > 2 else True)
            dropout_p = probs.kwargs.get("p", probs.args[1] if len(probs.args) > 1 else 0.5)
            dropout_p = dropout_p if training else 0.0
            probs = _skip_casts(probs.args[0])
        sinks, logits = None, None
        if op_name(probs) == "getitem":
            probs, logits, sinks = _match_sinks(probs)
        if op_name(probs) != "softmax" or not _softmax_dim_is_last(probs):
            continue
        match = _match_scores(logits if sinks is not None else probs.args[0])
        if match is None:
            continue
        query, key, scale, mask, softcap = match
        if meta(query).dim() < 3 or meta(query).dtype != meta(node).dtype:
            continue
        if isinstance(mask, Hidden):  # nanoGPT's masked_fill: SDPA takes what is attended
            with gm.graph.inserting_before(node):
                hidden = mask.positions
                mask = gm.graph.call_function(torch.logical_not, (hidden,))
            mask.meta["example_value"] = torch.logical_not(meta(hidden))
        kwargs = {"attn_mask": mask, "dropout_p": dropout_p, "scale": scale}
        target = F.scaled_dot_product_attention
        if softcap or sinks is not None:
            target, kwargs["softcap"] = softcapped_attention, softcap
        if sinks is not None:
            kwargs["sinks"] = sinks
        with gm.graph.inserting_before(node):
            sdpa = gm.graph.call_function(target, (query, key, value), kwargs)
        sdpa.meta["example_value"] = meta(node)
        node.replace_all_uses_with(sdpa)
        fused += 1
    if fused:
        gm.graph.eliminate_dead_code(is_impure_node=writes_in_place)  # keeps x.add_(b)
        gm.recompile()
        logger.info("autosp: %d written-out attention chains run as one attention call", fused)
    return gm
