"""Reading a node's arguments by parameter name, never by position.

Dynamo's graphs call torch functions, ``Tensor`` methods and ``operator`` builtins with
arguments spelled as the model wrote them (``x.max(1)``, ``torch.max(x, y)``,
``F.softmax(x, dim=-1)``). Rules read them through ``arguments``, which matches the call to the
op's schema (``torch.fx.operator_schemas.normalize_function``, overloads told apart by the
argument types), so that ``dim`` is the ``dim`` whatever the spelling.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import Node
from torch.fx.operator_schemas import normalize_function
from torch.utils import _pytree as pytree


def _type_of(value: Any) -> Any:
    """The Python type ``normalize_function`` matches a traced value against."""
    if isinstance(value, Node):
        value = value.meta.get("example_value")
    if isinstance(value, torch.Tensor):
        return torch.Tensor
    if isinstance(value, (torch.SymInt, torch.SymBool, torch.SymFloat)):
        return {torch.SymInt: int, torch.SymBool: bool, torch.SymFloat: float}[type(value)]
    if isinstance(value, (list, tuple)):
        inner = {_type_of(v) for v in value}
        return list[inner.pop()] if len(inner) == 1 else type(value)
    return type(value)


def _function(node: Node) -> Callable[..., Any] | None:
    """The torch function ``node`` calls; a method ``x.f(...)`` as ``torch.f(x, ...)``."""
    if node.op == "call_function":
        return node.target
    if node.op == "call_method":
        name = str(node.target)
        return getattr(torch, name, None) or getattr(torch, name.removesuffix("_"), None)
    return None


def arguments(node: Node) -> dict[str, Any] | None:
    """``node``'s arguments by parameter name (defaults filled in), or None when no schema of
    the op matches the call."""
    fn = _function(node)
    if fn is None:
        return None
    arg_types = tuple(_type_of(a) for a in node.args)
    kwarg_types = {k: _type_of(v) for k, v in node.kwargs.items()}
    try:
        found = normalize_function(
            fn,
            tuple(node.args),
            dict(node.kwargs),
            arg_types=arg_types,
            kwarg_types=kwarg_types,
            normalize_to_only_use_kwargs=True,
        )
    except (RuntimeError, TypeError, ValueError):
        found = None
    if found is None:
        return bind_defaults(fn, node)
    return dict(found.kwargs)


def bind_defaults(fn: Callable[..., Any], node: Node) -> dict[str, Any] | None:
    """Bind ``node``'s arguments to ``fn``'s Python signature, defaults applied; None if
    ``fn`` has no signature or the call does not fit it."""
    try:
        bound = inspect.signature(fn).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def nodes_in(value: Any) -> list[Node]:
    """The graph nodes inside an argument (lists, tuples, dicts, slices)."""
    found = []
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, Node):
            found.append(leaf)
        elif isinstance(leaf, slice):
            found.extend(n for n in (leaf.start, leaf.stop, leaf.step) if isinstance(n, Node))
    return found
