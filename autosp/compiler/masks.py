"""Recognising attention masks that are causal, so that no S x S mask is ever built.

Note [Mask probing]
-------------------
Under ``torch.compile`` Hugging Face models build an explicit ``[B, 1, S, S]`` boolean mask
from ``arange``, ``position_ids`` and ``attention_mask``: 16 GB at 128k tokens. Such a mask is
a function of a few small inputs. We cut the mask's subgraph out of the captured graph and
evaluate it at two small lengths (the sequence symbol bound to 5 and 8), feeding each input
it depends on a candidate value: positions ``0..n-1`` or all ones (no padding). If for one
assignment the result is exactly ``tril(ones(n, n))`` at both lengths, the attention runs with
``is_causal=True`` and the mask subgraph is dropped.

That conclusion holds for the candidate inputs, so it is guarded: before each call the runner
checks (in O(B*S)) that those inputs still have the candidate values, and otherwise runs a
second compiled graph that keeps the mask (exact, more memory).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch.fx import Graph, GraphModule, Node

from autosp.compiler.ops_table import ATTENTION, op_name
from autosp.compiler.propagate import meta

logger = logging.getLogger(__name__)

PROBE_LENGTHS = (5, 8)
"""Small sequence lengths at which masks are evaluated; two, so that no size coincides."""

CANDIDATES = ("arange", "ones")


@dataclass(frozen=True, slots=True)
class InputGuard:
    """Placeholder ``index`` must equal the candidate ``kind`` along sequence dim ``dim``."""

    index: int
    kind: str
    dim: int

    def holds(self, value: torch.Tensor) -> bool:
        if self.kind == "ones":
            return bool((value == 1).all())
        positions = torch.arange(value.shape[self.dim], device=value.device)
        shape = [1] * value.dim()
        shape[self.dim] = -1
        return bool((value == positions.view(shape)).all())


@dataclass(frozen=True, slots=True)
class MaskPlan:
    """For each recognised attention node: its replacement (``"causal"`` or ``"none"``)."""

    masks: dict[str, str]
    guards: tuple[InputGuard, ...]


def _candidate(kind: str, shape: list[int], dim: int | None, dtype: torch.dtype) -> torch.Tensor:
    if kind == "ones" or dim is None:
        return torch.ones(shape, dtype=dtype)
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return torch.arange(shape[dim]).view(view).expand(shape).to(dtype).contiguous()


def _subgraph(mask: Node) -> tuple[GraphModule, list[Node]]:
    """The mask's ancestors as a module whose inputs are the original placeholders they use."""
    needed: set[Node] = set()
    stack = [mask]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    graph = Graph()
    env: dict[Node, Node] = {}
    inputs = []
    for node in mask.graph.nodes:
        if node in needed:
            env[node] = graph.node_copy(node, lambda n: env[n])
            if node.op == "placeholder":
                inputs.append(node)
    graph.output(env[mask])
    return GraphModule(torch.nn.Module(), graph), inputs


def _is_causal(result: Any, n: int) -> bool | None:
    """True if ``result`` is a causal mask of ``n`` rows, False if it masks nothing, else None."""
    if not isinstance(result, torch.Tensor) or result.dim() < 2:
        return None
    if tuple(result.shape[-2:]) != (n, n):
        return None
    allowed = result if result.dtype == torch.bool else result > torch.finfo(result.dtype).min / 2
    if result.dtype != torch.bool and not bool(((result == 0) | ~allowed).all()):
        return None
    tril = torch.ones(n, n, dtype=torch.bool).tril()
    if bool((allowed == tril).all()):
        return True
    if bool(allowed.all()):
        return False
    return None


def _probe(
    sub: GraphModule,
    inputs: list[Node],
    example_inputs: list[Any],
    positions: dict[Node, int],
    syms: frozenset[sympy.Symbol],
    seq_dims: dict[Node, int],
) -> tuple[str, tuple[InputGuard, ...]] | None:
    """Evaluate the mask for candidate values of its token inputs (Note [Mask probing])."""
    tokens = [p for p in inputs if p in seq_dims]
    for kinds in itertools.product(CANDIDATES, repeat=len(tokens)):
        chosen = dict(zip(tokens, kinds, strict=True))
        verdicts = set()
        for n in PROBE_LENGTHS:
            args = []
            for p in inputs:
                value = meta(p)
                if isinstance(value, torch.SymInt):
                    expr = value.node.expr
                    args.append(n if expr in syms else value.node.hint)
                elif p in chosen:
                    shape = [n if _is_seq(s, syms) else _hint(s) for s in value.shape]
                    args.append(_candidate(chosen[p], shape, seq_dims[p], value.dtype))
                else:
                    real = example_inputs[positions[p]]
                    if any(_is_seq(s, syms) for s in value.shape):
                        return None
                    args.append(real)
            try:
                with torch.no_grad():
                    verdicts.add(_is_causal(sub(*args), n))
            except Exception as err:  # noqa: BLE001 - any failure means "not recognised"
                logger.debug("mask probe failed: %s", err)
                verdicts.add(None)
        if len(verdicts) == 1 and None not in verdicts:
            verdict = "causal" if verdicts.pop() else "none"
            guards = tuple(
                InputGuard(positions[p], kind, seq_dims[p]) for p, kind in chosen.items()
            )
            return verdict, guards
    return None


def _is_seq(size: Any, syms: frozenset[sympy.Symbol]) -> bool:
    return isinstance(size, torch.SymInt) and size.node.expr in syms


def _hint(size: Any) -> int:
    return size.node.hint if isinstance(size, torch.SymInt) else int(size)


def recognise_masks(
    gm: GraphModule, example_inputs: list[Any], syms: frozenset[sympy.Symbol]
) -> MaskPlan:
    """Find the attention masks that are causal (or empty) for guarded input values."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    positions = {p: i for i, p in enumerate(placeholders)}
    seq_dims = {}
    for p in placeholders:
        value = meta(p)
        if isinstance(value, torch.Tensor) and not value.requires_grad:
            dims = [d for d, s in enumerate(value.shape) if _is_seq(s, syms)]
            if len(dims) == 1 and not value.is_floating_point():
                seq_dims[p] = dims[0]
    masks: dict[str, str] = {}
    guards: dict[int, InputGuard] = {}
    for node in gm.graph.nodes:
        if op_name(node) not in ATTENTION:
            continue
        mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
        if not isinstance(mask, Node):
            continue
        sub, inputs = _subgraph(mask)
        found = _probe(sub, inputs, example_inputs, positions, syms, seq_dims)
        if found is None:
            logger.info("autosp: the mask of %s is not recognised; it is kept whole", node.name)
            continue
        verdict, new_guards = found
        if any(guards.get(g.index, g) != g for g in new_guards):
            continue
        masks[node.name] = verdict
        guards.update({g.index: g for g in new_guards})
    return MaskPlan(masks, tuple(guards.values()))
