"""What each op does to the sequence dimension: the facts the per-op rules read.

Ops are named as ``op_name`` returns: a function's ``__name__`` (``torch.add``, ``operator.add``
and ``Tensor.add`` are all ``"add"``) or the method name of a ``call_method`` node.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node

POINTWISE = frozenset(
    """
    abs acos add addcdiv addcmul and asin atan atan2 bitwise_and bitwise_not bitwise_or
    bitwise_xor ceil clamp clamp_max clamp_min clip clone contiguous cos cosh detach div double
    dropout elu eq erf erfinv exp exp2 expm1 float floor floordiv fmod gelu ge gt half
    hardsigmoid hardswish hardtanh int invert isfinite isinf isnan le leaky_relu lerp log log10
    log1p log2 logical_and logical_not logical_or logical_xor logit long lt masked_fill maximum
    minimum mish mod mul nan_to_num ne neg not or pos pow reciprocal relu relu6 remainder
    round rsqrt sigmoid sign silu sin sinh softplus sqrt square sub tan tanh threshold to
    true_divide truediv trunc type type_as where xor bfloat16 bool iadd isub imul itruediv
    """.split()
)
"""Elementwise with broadcasting: rows never mix."""

IN_PLACE_POINTWISE = frozenset({f"{name}_" for name in POINTWISE} | {"copy_", "zero_", "fill_"})
"""In-place elementwise methods (``x.mul_(y)``): elementwise, writing their first argument
(Note [In-place ops] in ``mutation.py``)."""

LAYOUT = frozenset(
    """
    view reshape transpose permute unsqueeze squeeze flatten unflatten movedim expand
    expand_as t swapaxes swapdims view_as
    """.split()
)
"""Pure layout changes: the sequence dimension keeps its rows, possibly merged with others."""

SHAPE_ARG_OPS = frozenset("view reshape expand".split())
"""Layout ops whose arguments spell the output shape (full sizes in the original program)."""

REDUCE_DIM = frozenset(
    """
    sum mean amax amin max min prod softmax log_softmax cumsum cumprod logsumexp argmax argmin
    var std norm all any topk sort argsort kthvalue mode aminmax var_mean std_mean cummax cummin
    """.split()
)
"""Ops that mix values along their ``dim`` argument (rows mix only if ``dim`` is the sequence);
some return several tensors of one shape (``topk``: values and indices)."""

FACTORY = frozenset(
    """
    arange zeros ones full empty tensor zeros_like ones_like full_like empty_like rand randn
    new_zeros new_ones new_full new_empty new_tensor randint eye linspace scalar_tensor
    """.split()
)
"""Ops whose output does not depend on the values of their tensor inputs."""

SIZE_OPS = frozenset("size sym_size dim numel".split())

ATTENTION = frozenset({"scaled_dot_product_attention", "softcapped_attention"})
"""Attention calls (SDPA and autosp's reference for what SDPA cannot express)."""


def meta(node: Any) -> Any:
    """The traced (fake) value of a node; None for anything else."""
    return node.meta.get("example_value") if isinstance(node, Node) else None


def op_name(node: Node) -> str:
    """A uniform name for ``call_function`` and ``call_method`` nodes."""
    if node.op == "call_method":
        return str(node.target)
    target = node.target
    if target is operator.getitem:
        return "getitem"
    if target is torch.ops.aten.sym_size.int:
        return "sym_size"
    return getattr(target, "__name__", str(target)).lstrip("_").removesuffix("_")
