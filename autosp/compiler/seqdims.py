"""Finding the sequence in symbolic shapes.

The token inputs are traced with their sequence dimension dynamic, so every size that depends
on the sequence is a sympy expression in the sequence symbol(s) ``s``. A dimension of size
``s + c`` (``c`` <= 0) holds one row per token (``c`` = -1 after ``x[:, :-1]``); a dimension of
size ``k * (s + c)`` holds the tokens merged with other dimensions (``x.view(-1, H)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch


@dataclass(frozen=True, slots=True)
class SeqDim:
    """A dimension that holds the sequence: its index, whether it is merged, its length offset."""

    dim: int
    merged: bool
    length: int


def _linear_offset(expr: sympy.Expr, syms: frozenset[sympy.Symbol]) -> int | None:
    for sym in expr.free_symbols & syms:
        diff = sympy.expand(expr - sym)
        if diff.is_Integer and int(diff) <= 0:
            return int(diff)
    return None


def classify(size: int | torch.SymInt, syms: frozenset[sympy.Symbol]) -> SeqDim | None:
    """Whether a size is the sequence (``merged=False``), a merge of it, or neither (None)."""
    if not isinstance(size, torch.SymInt):
        return None
    expr = sympy.factor(size.node.expr)
    offset = _linear_offset(expr, syms)
    if offset is not None:
        return SeqDim(-1, False, offset)
    if isinstance(expr, sympy.Mul):
        for factor in expr.args:
            if factor.free_symbols & syms:
                offset = _linear_offset(factor, syms)
                rest = sympy.expand(expr / factor)
                if offset is not None and not (rest.free_symbols & syms):
                    return SeqDim(-1, True, offset)
    return None


def seq_dims(meta: torch.Tensor, syms: frozenset[sympy.Symbol]) -> list[SeqDim]:
    """Every dimension of ``meta`` (a fake tensor) that holds the sequence."""
    found = []
    for dim, size in enumerate(meta.shape):
        kind = classify(size, syms)
        if kind is not None:
            found.append(SeqDim(dim, kind.merged, kind.length))
    return found


def hint(size: int | torch.SymInt) -> int:
    """The concrete value a size had when the graph was traced."""
    if isinstance(size, torch.SymInt):
        return size.node.hint if size.node.hint is not None else int(size.node.expr)
    return int(size)
