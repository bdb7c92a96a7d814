"""Finding the token inputs and the symbols of the sequence length in a captured graph.

``autosp.api`` marks the sequence dimension of every token input dynamic, so Dynamo gives it
a symbol; the sequence is the symbol whose traced value is the call's sequence length.
"""

from __future__ import annotations

import re

import sympy
import torch
from torch.fx import GraphModule, Node

from autosp.compiler.context import CompileContext
from autosp.compiler.ops_table import ATTENTION, meta, op_name
from autosp.errors import AutoSPError


def is_user_input(node: Node) -> bool:
    """A placeholder fed by the caller's arguments, not by a parameter or buffer."""
    grapharg = node.meta.get("grapharg")
    if grapharg is None or not isinstance(meta(node), torch.Tensor):
        return False
    name = grapharg.source.name
    return not any(part in name for part in ("_parameters", "_buffers", "_modules"))


def input_name(node: Node) -> str:
    """The caller's name for an input placeholder: ``input_ids`` for ``L['kwargs']['input_ids']``,
    ``argument 1`` for ``L['args'][1]``."""
    source = node.meta["grapharg"].source.name
    found = re.findall(r"\['([^']+)'\]|\[(\d+)\]", source)
    if not found:
        return source
    key, index = found[-1]
    return key or f"argument {index}"


def find_sequence_pass(gm: GraphModule, ctx: CompileContext) -> GraphModule:
    """Record in ``ctx`` the symbols that stand for the sequence length and one
    (placeholder, dim) holding it; refuse a graph without attention."""
    require_attention(gm)
    seq_len = ctx.seq_len
    syms: set[sympy.Symbol] = set()
    source: tuple[str, int] | None = None
    for node in gm.graph.find_nodes(op="placeholder"):
        if not is_user_input(node):
            continue
        for dim, size in enumerate(meta(node).shape):
            if isinstance(size, torch.SymInt) and size.node.hint == seq_len:
                expr = size.node.expr
                if isinstance(expr, sympy.Symbol):
                    syms.add(expr)
                    source = source or (node.name, dim)
    if source is None:
        raise AutoSPError(
            f"autosp: no input of the compiled graph has a dynamic sequence dimension of length "
            f"{seq_len}; the model code specialised the sequence length. Check for Python "
            "branches on the sequence length in the model's forward."
        )
    ctx.seq_syms, ctx.seq_source = frozenset(syms), source
    return gm


def require_attention(gm: GraphModule) -> None:
    if not any(op_name(n) in ATTENTION for n in gm.graph.nodes):
        raise AutoSPError(
            "autosp: no attention found in the captured graph. autosp recognises "
            "torch.nn.functional.scaled_dot_product_attention and attention written out as "
            "matmul-softmax-matmul; a model without attention has nothing to split."
        )
