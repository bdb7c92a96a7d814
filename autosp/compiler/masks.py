"""Recognising attention masks, so that no S x S mask is ever built.

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
second compiled graph.

The mask may also be structured (Note [Structured masks]): sliding windows, documents packed
by restarting positions, key padding. Those are found by evaluating the subgraph on sampled
inputs (each token input tried as positions, packed at random cut points, or as a random 0/1
padding mask) and comparing with every spec built from the rules and the subgraph's integer
constants (window candidates). A spec is a function of the inputs, but matched only on the
sampled values: a padding input is guarded to hold only 0 and 1 (an ``attention_mask`` of
document ids 1, 2, 3 is not a padding mask). Specs are used where the causal verdict is not
(its guard failed, or the mask is not causal). A mask that is neither runs as the model builds
it.

Inputs that are not token inputs are evaluated at their values in the traced call: a
non-sequence tensor (a prefix length, a buffer) of at most ``GUARD_NUMEL`` elements that needs
no gradient, or an integer that is not the size of a tensor input. Every verdict of a mask that
reads one is guarded by that value; a mask reading a larger or trained tensor is not
recognised. The plans thus form a chain: causal verdicts and specs, then specs alone, then
none, each used when its guards hold (``MaskPlan``).

Probe lengths include one above every integer constant of the subgraph: a window of 4096
looks causal at length 8. A subgraph with a constant above ``MAX_PROBE`` is not recognised.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch.fx import Graph, GraphModule, Node
from torch.utils import _pytree as pytree

from autosp.compiler.attention.mask_spec import MaskSpec, allowed, document_ids
from autosp.compiler.context import CompileContext
from autosp.compiler.ops_table import ATTENTION, meta, op_name

logger = logging.getLogger(__name__)

PROBE_LENGTHS = (5, 8)
"""Small sequence lengths at which masks are evaluated; two, so that no size coincides."""

MAX_PROBE = 8192
"""The longest probe length (an ``n x n`` mask is built per trial)."""

TRIALS = 3
"""Sampled inputs per probe length when matching a structured mask."""

CANDIDATES = ("arange", "ones")

GUARD_NUMEL = 4096
"""The largest non-sequence tensor a recognised mask may read (compared at every call)."""


@dataclass(frozen=True, slots=True)
class InputGuard:
    """Placeholder ``index`` must equal the candidate ``kind`` along sequence dim ``dim``."""

    index: int
    kind: str
    dim: int

    def holds(self, value: torch.Tensor) -> bool:
        if self.kind == "ones":
            return bool((value == 1).all())
        if self.kind == "binary":  # the values a padding role was matched on
            return bool(((value == 0) | (value == 1)).all())
        positions = torch.arange(value.shape[self.dim], device=value.device)
        shape = [1] * value.dim()
        shape[self.dim] = -1
        return bool((value == positions.view(shape)).all())


@dataclass(frozen=True, slots=True, eq=False)
class ValueGuard:
    """Placeholder ``index`` (an input a mask reads that is not a token input) must equal the
    ``value`` it had when the mask was probed."""

    index: int
    value: torch.Tensor | int

    def holds(self, value: torch.Tensor | int) -> bool:
        if not isinstance(self.value, torch.Tensor):
            return value == self.value
        return (
            isinstance(value, torch.Tensor)
            and value.shape == self.value.shape
            and torch.equal(value.to(self.value.device), self.value)
        )


Guard = InputGuard | ValueGuard


@dataclass(frozen=True, slots=True)
class MaskPlan:
    """For each recognised attention node: its replacement (``"causal"``, ``"none"`` or a
    ``MaskSpec``), valid when all ``guards`` hold; else ``fallback`` (None: no mask
    recognised) is tried."""

    masks: dict[str, str | MaskSpec]
    guards: tuple[Guard, ...]
    fallback: MaskPlan | None = None


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


def _allowed(result: Any, n: int) -> torch.Tensor | None:
    """A mask result as booleans (True = attend); None unless it is an ``[..., n, n]`` boolean
    or 0 / -inf additive mask."""
    if not isinstance(result, torch.Tensor) or result.dim() < 2:
        return None
    if tuple(result.shape[-2:]) != (n, n):
        return None
    if result.dtype == torch.bool:
        return result
    ok = result > torch.finfo(result.dtype).min / 2
    return ok if bool(((result == 0) | ~ok).all()) else None


def _is_causal(result: Any, n: int) -> bool | None:
    """True if ``result`` is a causal mask of ``n`` rows, False if it masks nothing, else None."""
    ok = _allowed(result, n)
    if ok is None:
        return None
    if bool((ok == torch.ones(n, n, dtype=torch.bool).tril()).all()):
        return True
    if bool(ok.all()):
        return False
    return None


class _Evaluator:
    """Evaluates a mask subgraph at a length ``n`` with given values for its token inputs."""

    def __init__(
        self,
        sub: GraphModule,
        inputs: list[Node],
        example_inputs: list[Any],
        positions: dict[Node, int],
        syms: frozenset[sympy.Symbol],
    ) -> None:
        self.sub, self.inputs, self.syms = sub, inputs, syms
        self.fixed = {p: example_inputs[positions[p]] for p in inputs}
        tensors = (t for t in example_inputs if isinstance(t, torch.Tensor))
        self.device = next(tensors, torch.empty(0)).device
        """The graph's device: candidate values go there, results come back to the CPU."""

    def shape(self, p: Node, n: int) -> list[int]:
        return [n if _is_seq(s, self.syms) else _hint(s) for s in meta(p).shape]

    def __call__(self, n: int, values: dict[Node, torch.Tensor]) -> torch.Tensor | None:
        args = []
        for p in self.inputs:
            value = meta(p)
            if isinstance(value, torch.SymInt):
                args.append(n if value.node.expr in self.syms else value.node.hint)
            elif p in values:
                args.append(values[p].to(self.device))
            elif isinstance(value, torch.Tensor) and any(
                _is_seq(s, self.syms) for s in value.shape
            ):
                return None
            else:
                args.append(self.fixed[p])
        try:
            with torch.no_grad():
                result = self.sub(*args)
            return _allowed(result.cpu() if isinstance(result, torch.Tensor) else result, n)
        except Exception as err:  # noqa: BLE001 - any failure means "not recognised"
            logger.debug("mask probe failed: %s", err)
            return None


def _probe_causal(
    evaluate: _Evaluator, tokens: dict[Node, int], lengths: tuple[int, ...]
) -> tuple[str, dict[Node, str]] | None:
    """Evaluate the mask for candidate values of its token inputs (Note [Mask probing])."""
    for kinds in itertools.product(CANDIDATES, repeat=len(tokens)):
        chosen = dict(zip(tokens, kinds, strict=True))
        verdicts = set()
        for n in lengths:
            values = {
                p: _candidate(kind, evaluate.shape(p, n), tokens[p], meta(p).dtype)
                for p, kind in chosen.items()
            }
            result = evaluate(n, values)
            verdicts.add(None if result is None else _is_causal(result, n))
        if len(verdicts) == 1 and None not in verdicts:
            return ("causal" if verdicts.pop() else "none"), chosen
    return None


def _sample(role: str, shape: list[int], dtype: torch.dtype, trial: int, gen) -> torch.Tensor:  # noqa: ANN001
    """Trial ``trial`` of a ``[B, n]`` token input playing ``role``: positions of documents
    packed at two random cuts per row (trial 0: one document), each starting at 0 (trial 1) or
    at any position (trial 2: documents continued from an earlier sequence), or a random 0/1
    padding mask (trial 0: all ones)."""
    batch, n = shape
    if role == "padding":
        values = torch.rand(batch, n, generator=gen) > 0.3 if trial else torch.ones(batch, n)
        return values.to(dtype)
    values = torch.arange(n).repeat(batch, 1)
    if trial:
        for row in values:
            starts = torch.randint(n if trial > 1 else 1, (3,), generator=gen).tolist()
            cuts = [0, *sorted(torch.randint(1, n, (2,), generator=gen).tolist())]
            for cut, start in zip(cuts, starts, strict=True):
                row[cut:] = start + torch.arange(n - cut)
    return values.to(dtype)


def _probe_spec(
    evaluate: _Evaluator,
    tokens: dict[Node, int],
    indices: dict[Node, int],
    lengths: tuple[int, ...],
    windows: list[int],
) -> MaskSpec | None:
    """The ``MaskSpec`` that equals the mask on sampled inputs (Note [Mask probing])."""
    if any(meta(p).dim() != 2 or tokens[p] != 1 for p in tokens) or len(tokens) > 2:
        return None  # roles are [B, S] inputs: positions, padding
    for roles in itertools.product(("positions", "padding"), repeat=len(tokens)):
        if len(set(roles)) != len(roles):
            continue
        role_of = dict(zip(tokens, roles, strict=True))
        trials = []
        gen = torch.Generator().manual_seed(0)
        for n in lengths:
            for trial in range(TRIALS):
                values = {
                    p: _sample(role, evaluate.shape(p, n), meta(p).dtype, trial, gen)
                    for p, role in role_of.items()
                }
                result = evaluate(n, values)
                if result is None:
                    return None
                trials.append((n, values, result))
        by_role = {role: p for p, role in role_of.items()}
        for causal, window, documents, padding in itertools.product(
            (True, False),
            (0, *windows),
            (None, by_role.get("positions")),
            (None, by_role.get("padding")),
        ):
            if all(
                _matches(result, n, values, causal, window, documents, padding)
                for n, values, result in trials
            ):
                return MaskSpec(
                    causal,
                    window,
                    None if documents is None else indices[documents],
                    None if padding is None else indices[padding],
                )
    return None


def _matches(
    result: torch.Tensor,
    n: int,
    values: dict[Node, torch.Tensor],
    causal: bool,
    window: int,
    documents: Node | None,
    padding: Node | None,
) -> bool:
    """Whether the mask ``result`` equals the spec's on the trial inputs ``values``."""
    docs = None if documents is None else document_ids(values[documents])
    valid = None if padding is None else values[padding]
    pos = torch.arange(n)
    expected = allowed(causal, window, pos, pos, docs, valid)
    try:
        a, b = torch.broadcast_tensors(result, expected)
    except RuntimeError:
        return False
    return bool((a == b).all())


def _constants(sub: GraphModule) -> list[int]:
    """The positive integer constants in the subgraph's op arguments (window candidates)."""
    found = set()
    for node in sub.graph.nodes:
        for arg in pytree.tree_leaves((node.args, node.kwargs)):
            if isinstance(arg, int) and not isinstance(arg, bool) and arg > 0:
                found.add(arg)
    return sorted(found)


def _is_seq(size: Any, syms: frozenset[sympy.Symbol]) -> bool:
    return isinstance(size, torch.SymInt) and size.node.expr in syms


def _hint(size: Any) -> int:
    return size.node.hint if isinstance(size, torch.SymInt) else int(size)


def _fixed_inputs(
    inputs: list[Node], seq_dims: dict[Node, int], sizes: set[sympy.Symbol]
) -> list[Node] | None:
    """The inputs a probe evaluates at their traced values (they must be guarded), or None if
    one of them cannot be (a tensor needing gradients, or larger than ``GUARD_NUMEL``)."""
    fixed = []
    for p in inputs:
        value = meta(p)
        if isinstance(value, torch.SymInt):
            if value.node.expr not in sizes:
                fixed.append(p)
        elif isinstance(value, torch.Tensor) and p not in seq_dims:
            if value.requires_grad or value.numel() > GUARD_NUMEL:
                return None
            fixed.append(p)
    return fixed


Probed = tuple[tuple[str, dict[Node, str]] | None, MaskSpec | None, list[Node]]


def _probe(
    mask: Node,
    example_inputs: list[Any],
    positions: dict[Node, int],
    syms: frozenset[sympy.Symbol],
    seq_dims: dict[Node, int],
    sizes: set[sympy.Symbol],
) -> Probed:
    """The causal verdict (with the candidate values it assumes) and the structured spec of
    ``mask``'s subgraph, each None if it does not match, and the inputs both assume the traced
    values of (``_fixed_inputs``)."""
    sub, inputs = _subgraph(mask)
    fixed = _fixed_inputs(inputs, seq_dims, sizes)
    if fixed is None:
        logger.info("autosp: the mask %s reads a trained or large tensor", mask.name)
        return None, None, []
    constants = _constants(sub)
    longest = max(constants, default=0) + 3
    if longest > MAX_PROBE:
        logger.info("autosp: the mask %s has constants too large to probe", mask.name)
        return None, None, []
    lengths = tuple(sorted({*PROBE_LENGTHS, longest}))
    evaluate = _Evaluator(sub, inputs, example_inputs, positions, syms)
    tokens = {p: seq_dims[p] for p in inputs if p in seq_dims}
    return (
        _probe_causal(evaluate, tokens, lengths),
        _probe_spec(evaluate, tokens, positions, lengths, constants),
        fixed,
    )


def recognise_masks_pass(gm: GraphModule, ctx: CompileContext) -> GraphModule:
    """Record in ``ctx.masks`` the attention masks that are causal (or empty) for guarded input
    values, and the structured ones (Note [Mask probing]); none if the config says so."""
    ctx.masks = (
        recognise_masks(gm, ctx.example_inputs, ctx.seq_syms)
        if ctx.config.recognise_masks
        else MaskPlan({}, ())
    )
    return gm


def recognise_masks(
    gm: GraphModule, example_inputs: list[Any], syms: frozenset[sympy.Symbol]
) -> MaskPlan:
    """The ``MaskPlan`` of ``gm``'s attention masks."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    positions = {p: i for i, p in enumerate(placeholders)}
    seq_dims = {}
    for p in placeholders:
        value = meta(p)
        if isinstance(value, torch.Tensor) and not value.requires_grad:
            dims = [d for d, s in enumerate(value.shape) if _is_seq(s, syms)]
            if len(dims) == 1 and not value.is_floating_point():
                seq_dims[p] = dims[0]
    sizes = {
        s.node.expr
        for p in placeholders
        if isinstance(meta(p), torch.Tensor)
        for s in meta(p).shape
        if isinstance(s, torch.SymInt)
    }
    values: dict[Node, ValueGuard] = {}  # made once per input, when a probe reads it
    masks: dict[str, str | MaskSpec] = {}
    specs: dict[str, MaskSpec] = {}
    probed: dict[Node, Probed] = {}
    # Hugging Face builds one mask for all layers: each mask's subgraph is probed once.
    candidates: dict[int, InputGuard] = {}  # the causal verdicts' (one candidate per input)
    guards: dict[tuple[int, str], Guard] = {}  # all of the first plan's
    spec_guards: dict[tuple[int, str], Guard] = {}
    for node in gm.graph.nodes:
        if op_name(node) not in ATTENTION:
            continue
        mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
        if not isinstance(mask, Node):
            continue
        if mask not in probed:
            probed[mask] = _probe(mask, example_inputs, positions, syms, seq_dims, sizes)
        found, spec, fixed = probed[mask]
        for p in fixed:
            if p not in values:
                value = example_inputs[positions[p]]
                value = value.detach().clone() if isinstance(value, torch.Tensor) else int(value)
                values[p] = ValueGuard(positions[p], value)
        assumed: dict[tuple[int, str], Guard] = {
            (values[p].index, "value"): values[p] for p in fixed
        }
        if spec is not None:
            specs[node.name] = spec
            if spec.padding is not None:
                assumed[(spec.padding, "binary")] = InputGuard(spec.padding, "binary", 1)
            spec_guards.update(assumed)
        new_guards = ()
        if found is not None:
            verdict, chosen = found
            new_guards = tuple(
                InputGuard(positions[p], kind, seq_dims[p]) for p, kind in chosen.items()
            )
            if any(candidates.get(g.index, g) != g for g in new_guards):
                found = None
        if found is not None:
            masks[node.name] = verdict
            candidates.update({g.index: g for g in new_guards})
            guards.update({(g.index, g.kind): g for g in new_guards})
            guards.update({key: g for key, g in assumed.items() if key[1] == "value"})
        elif spec is not None:
            masks[node.name] = spec
            guards.update(assumed)
        else:
            logger.info("autosp: the mask of %s is not recognised; it is kept whole", node.name)
    spec_plan = MaskPlan(specs, tuple(spec_guards.values()), MaskPlan({}, ()))
    if masks == specs:
        return spec_plan if spec_guards else MaskPlan(specs, ())
    return MaskPlan(masks, tuple(guards.values()), spec_plan)
