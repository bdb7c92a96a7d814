"""Which activations the backward recomputes: autosp's sequence-aware policy.

Note [Sequence-aware recomputation]
-----------------------------------
At long context what is saved for the backward grows with the tokens of a rank; what is
expensive to make again is the attention (quadratic) and what crossed the network. So
``tag_recompute_pass`` tags the rank-local graph for AOTAutograd's partitioner, the mechanism
of ``torch.utils.checkpoint``'s selective checkpointing (``node.meta["recompute"]``, copied to
every ATen node traced from the node):

* inside a repeated layer (a module at a numbered path, ``model.layers.3``), with one
  ``ac_graph_id`` per layer, so each layer's input is saved at the boundary and a layer is
  recomputed from it alone:

  - ``MUST_SAVE``: attention (every strategy's op), collectives and the helpers that call
    them, random ops (dropout: a recomputed mask would differ), and under
    ``Config.recompute="cheap"`` the matmuls;
  - ``PREFER_RECOMPUTE``: everything else, norms, activations, elementwise and views, and
    under ``"layers"`` the matmuls too;

* outside the layers (embedding, final norm, loss) nothing is tagged.

``"auto"`` (the default) picks ``"cheap"`` or ``"layers"`` for each call from its length
(Note [Recomputation by length]).

A region the model checkpointed itself (Note [Checkpointed regions]) keeps its own tags when
``Config.recompute`` is ``"off"``; otherwise this policy replaces them. Recomputation changes
memory and time, never values.

Note [Recomputation by length]
------------------------------
``"cheap"`` is the faster policy (no matmul is run twice) and ``"layers"`` the smaller one
(each layer keeps its input, its attention and what crossed the network). Which one a step can
afford depends on its length, so under ``Config.recompute="auto"`` the choice is made per
call: ``estimate_recompute_pass`` reads off the traced graph how many bytes per token of a
rank ``"cheap"`` saves inside the layers (matmul, attention and autosp op outputs, attention
inputs standing for the collectives' results, and each layer's inputs: an estimate from the
traced shapes, not a measurement; less the gate and up outputs of each gated MLP in the
lengths that tile it, Note [Tiled MLP]), and calls run ``"cheap"`` up to the first length
whose saved activations would exceed the budget, ``Config.activation_memory_gib`` (default:
half the memory of the rank's device, ``AUTO_SHARE``), and ``"layers"`` above it (one switch,
even where tiling would bring a longer call back within the budget). The graph traced first is
compiled for the policy of the traced length; a call whose length needs the other policy (or
other MLPs tiled: ``context.LengthChoice``) gets its own graph, compiled on first use for its
shapes (``backend.Runner``), and a log line.
Values never depend on the choice.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torch.utils.checkpoint import CheckpointPolicy

from autosp.compiler.context import CompileContext
from autosp.compiler.ops_table import ATTENTION, meta, op_name
from autosp.compiler.seqdims import hint, seq_dims

MATMULS = frozenset({"linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "grouped_mm"})
RANDOM = frozenset({"dropout", "native_dropout", "rand", "randn", "rand_like", "bernoulli"})
SAVED_MODULES = ("autosp.comm", "autosp.compiler.attention", "autosp.compiler.runtime")
"""Functions of these modules in the rank-local graph communicate or attend: never
recomputed."""

AUTO_SHARE = 0.5
"""``recompute="auto"`` without ``Config.activation_memory_gib``: the share of a rank's device
memory that ``"cheap"``'s saved activations may take (Note [Recomputation by length])."""
GIB = 2**30

MUST_SAVE = CheckpointPolicy.MUST_SAVE
_NUMBERED = re.compile(r"\.(\d+)$|\[(\d+)\]$")


def layer_of(node: Node) -> str | None:
    """The outermost module on ``node``'s module stack at a numbered path (a layer of a
    ``ModuleList``), or None. A parametrization (``weight.parametrizations.weight.0``, the
    gather of a sharded parameter) is not a layer."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        if _NUMBERED.search(path) and ".parametrizations." not in f".{path}":
            return path
    return None


def _saved(node: Node, policy: str) -> bool:
    module = getattr(node.target, "__module__", "") or ""
    if module.startswith(SAVED_MODULES) or str(node.target).startswith("autosp."):
        return True  # autosp's functions and its custom ops (torch.ops.autosp.*)
    name = op_name(node)
    return name in RANDOM or (policy == "cheap" and name in MATMULS)


@dataclass(frozen=True, slots=True)
class AutoRecompute:
    """``recompute="auto"``'s rule for one traced graph (Note [Recomputation by length])."""

    cheap_bytes_per_token: float
    """What ``"cheap"`` saves inside the layers per token of a rank, every MLP untiled
    (estimated)."""
    budget: int
    """Bytes of saved activations per rank that ``"cheap"`` may take."""
    tiling: tuple[tuple[int, float], ...] = ()
    """Per gated MLP in a layer that ``Config.tile_mlp`` may tile: the most tokens per rank it
    runs untiled, and the bytes per token that ``"cheap"`` does not save once it is tiled."""

    def bytes_per_token(self, tokens_per_rank: int) -> float:
        """What ``"cheap"`` saves per token of a rank in a call of this length."""
        untiled = sum(saving for above, saving in self.tiling if tokens_per_rank > above)
        return self.cheap_bytes_per_token - untiled

    def policy(self, tokens_per_rank: int) -> str:
        return "cheap" if tokens_per_rank <= self.limit else "layers"

    @property
    def limit(self) -> int:
        """The most tokens per rank that run ``"cheap"``: those below the first length whose
        saved activations exceed the budget."""
        low = 0
        for high in sorted({above for above, _ in self.tiling} | {2**62}):
            rate = self.bytes_per_token(low + 1)  # the same for every length in (low, high]
            if rate > 0 and rate * high > self.budget:
                return max(low, int(self.budget / rate))
            low = high
        return 2**62

    def describe(self, policy: str, tokens_per_rank: int) -> str:
        """The plan line of the choice."""
        saved = self.bytes_per_token(tokens_per_rank) * tokens_per_rank / GIB
        return (
            f"auto chose '{policy}' for {tokens_per_rank:,} tokens per rank: 'cheap' would save "
            f"~{saved:.3g} GiB per rank against a budget of {self.budget / GIB:.3g} GiB "
            f"(Config.activation_memory_gib); 'cheap' up to ~{self.limit:,} tokens per rank"
        )


def tokens_per_rank(tokens: torch.Tensor, dim: int, world: int) -> int:
    """The tokens (batch x sequence positions) one rank holds of an input whose ``dim`` is the
    sequence."""
    return math.prod(tokens.shape[:dim]) * -(-tokens.shape[dim] // world)


def device_memory_per_rank(device: torch.device, world: int) -> int:
    """The memory of the device a rank computes on: a GPU's own, or the host's memory shared
    by the ranks on this host (``LOCAL_WORLD_SIZE``, else the group's size)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return host // int(os.environ.get("LOCAL_WORLD_SIZE", world))


def _cheap_saved_bytes(gm: GraphModule, ctx: CompileContext) -> int:
    """The bytes (all ranks together, at the traced shapes) that ``"cheap"`` saves inside the
    layers: matmul, attention and autosp op outputs, attention inputs (for the collectives'
    results) and each layer's inputs from outside it."""

    def size(node: object) -> int:
        value = meta(node)
        if not isinstance(value, torch.Tensor) or not seq_dims(value, ctx.seq_syms):
            return 0
        return hint(value.numel()) * value.element_size()

    total = 0
    inputs: set[tuple[str, Node]] = set()
    for node in gm.graph.nodes:
        layer = layer_of(node) if node.op in ("call_function", "call_method") else None
        if layer is None:
            continue
        name = op_name(node)
        if name in ATTENTION:
            total += 2 * size(node) + sum(size(a) for a in node.args[:3])
        elif name in MATMULS or name in RANDOM or str(node.target).startswith("autosp."):
            total += size(node)
        inputs.update((layer, a) for a in node.all_input_nodes if layer_of(a) != layer)
    return total + sum(size(a) for _, a in inputs)


def estimate_recompute_pass(gm: GraphModule, ctx: CompileContext) -> GraphModule:
    """Under ``recompute="auto"``, the rule that picks each call's policy (Note
    [Recomputation by length]): ``ctx.auto_recompute``."""
    if ctx.config.recompute != "auto":
        return gm
    name, dim = ctx.seq_source
    index = [p.name for p in gm.graph.find_nodes(op="placeholder")].index(name)
    tokens = ctx.example_inputs[index]
    traced = tokens_per_rank(tokens, dim, 1)
    if ctx.config.activation_memory_gib is not None:
        budget = int(ctx.config.activation_memory_gib * GIB)
    else:
        budget = int(AUTO_SHARE * device_memory_per_rank(tokens.device, ctx.group.world))
    tiling = ()
    if ctx.mlps is not None:
        nodes = {n.name: n for n in gm.graph.nodes}
        tiling = tuple(
            (ctx.mlps.tiled_above(name), 2 * row)  # its gate and up matmuls' outputs
            for name, row in ctx.mlps.row_bytes.items()
            if layer_of(nodes[name]) is not None
        )
    ctx.auto_recompute = AutoRecompute(_cheap_saved_bytes(gm, ctx) / traced, budget, tiling)
    return gm


def tag_recompute_pass(gm: GraphModule, ctx: CompileContext) -> GraphModule:
    """Tag the rank-local graph for the partitioner (Note [Sequence-aware recomputation])
    with the policy of the call being compiled (``ctx.recompute``)."""
    policy = ctx.recompute
    if policy == "off":
        return gm
    regions: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        layer = layer_of(node)
        if layer is None:
            node.meta.pop("recompute", None)
            node.meta.pop("ac_graph_id", None)
            continue
        node.meta["ac_graph_id"] = regions.setdefault(layer, len(regions) + 1)
        node.meta["recompute"] = (
            CheckpointPolicy.MUST_SAVE
            if _saved(node, policy)
            else CheckpointPolicy.PREFER_RECOMPUTE
        )
    if ctx.plan is not None and regions:
        if policy == "cheap":
            what = "norms, activations and elementwise ops recomputed in the backward; "
            kept = "attention, collectives, random ops and matmuls saved"
        else:
            what = "layers recomputed in the backward from their inputs; "
            kept = "attention, collectives and random ops saved"
        ctx.plan.recompute.append(f"{policy}: {len(regions)} {what}{kept}")
        if ctx.auto_recompute is not None:
            ctx.plan.recompute.append(ctx.auto_recompute.describe(policy, ctx.tokens_per_rank))
            ctx.plan.cheap_limit = ctx.auto_recompute.limit
    return gm
