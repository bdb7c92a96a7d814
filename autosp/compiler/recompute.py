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

  - ``MUST_SAVE``: random ops (dropout: a recomputed mask would differ); under
    ``Config.recompute="cheap"`` and ``"layers"`` attention (every strategy's op),
    collectives and the helpers that call them; under ``"cheap"`` the matmuls too;
  - ``PREFER_RECOMPUTE``: everything else: norms, activations, elementwise and views, under
    ``"layers"`` the matmuls, and under ``"full"`` the attention and the collectives as well
    (a layer keeps only its input, as Hugging Face's full gradient checkpointing does);

* outside the layers (embedding, final norm, loss) nothing is tagged.

``"auto"`` (the default) picks ``"cheap"``, ``"layers"`` or ``"full"`` for each call from its
length (Note [Recomputation by length]).

A region the model checkpointed itself (Note [Checkpointed regions]) keeps its own tags when
``Config.recompute`` is ``"off"``; otherwise this policy replaces them. Recomputation changes
memory and time, never values: every recomputed op, a collective or an attention included, is
deterministic and runs in the same order on every rank.

Note [Recomputation by length]
------------------------------
``"cheap"`` is the fastest policy (no matmul is run twice), ``"layers"`` saves less (each
layer keeps its input, its attention and what crossed the network) and ``"full"`` the least
(each layer keeps its input; its attention and its collectives run twice). Which one a step
can afford depends on its length, so under ``Config.recompute="auto"`` the choice is made per
call: ``estimate_recompute_pass`` reads off the traced graph how many bytes per token of a
rank ``"cheap"`` and ``"layers"`` save inside the layers (attention and autosp op outputs,
attention inputs standing for the collectives' results, each layer's inputs, and for
``"cheap"`` the matmul outputs, less the gate and up outputs of each gated MLP in the lengths
that tile it, Note [Tiled MLP]: an estimate from the traced shapes, not a measurement), and a
call runs the first of ``"cheap"`` and ``"layers"`` whose saved activations fit the budget,
``Config.activation_memory_gib`` (default: half the memory of the rank's device,
``AUTO_SHARE``), else ``"full"``. Each policy runs one range of lengths (one switch from
``"cheap"``, even where tiling would bring a longer call back within the budget), and a call
that runs ``"full"`` logs a warning: its attention runs three times. The graph traced first is
compiled for the policy of the traced length; a call whose length needs another policy (or
other MLPs tiled: ``context.LengthChoice``) gets its own graph, compiled on first use for its
shapes (``backend.Runner``), and a log line. Values never depend on the choice.

Note [Buffer reuse under recomputation]
---------------------------------------
Under ``"layers"`` and ``"full"`` the backward graph recomputes each layer and differentiates
it before the next, and the peak is one layer's recomputed activations and gradients. Inductor
by default keeps a buffer freed by one kernel for a later kernel of the same size
(``allow_buffer_reuse``), when its own estimate of the graph's peak does not grow; that
estimate does not see the scratch of the kernels it calls (the attention's backward), so freed
MLP-sized buffers were held across the attention's backward and raised the real peak: 371 MiB
against 309 MiB with the same ops run one by one (the CPU benchmark's model, 16k tokens,
``"full"``, ``benchmarks/plan_vs_measured.py``). So graphs compiled for these two policies turn
the reuse off (``inductor_options``): 316 MiB, at the same step time on CPU; on a GPU the
caching allocator serves the extra allocations.
"""

from __future__ import annotations

import logging
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
"""Functions of these modules in the rank-local graph communicate or attend: recomputed
under ``"full"`` only."""

AUTO_SHARE = 0.5
"""``recompute="auto"`` without ``Config.activation_memory_gib``: the share of a rank's device
memory that the saved activations of ``"cheap"`` or ``"layers"`` may take (Note
[Recomputation by length])."""
GIB = 2**30

MUST_SAVE = CheckpointPolicy.MUST_SAVE
logger = logging.getLogger(__name__)
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
    name = op_name(node)
    if name in RANDOM or policy == "full":
        return name in RANDOM
    module = getattr(node.target, "__module__", "") or ""
    if module.startswith(SAVED_MODULES) or str(node.target).startswith("autosp."):
        return True  # autosp's functions and its custom ops (torch.ops.autosp.*)
    return policy == "cheap" and name in MATMULS


def policy_within(limits: tuple[int, int], tokens_per_rank: int) -> str:
    """The policy ``"auto"`` runs in a call of ``tokens_per_rank`` tokens on each rank, given
    the most tokens per rank that run ``"cheap"``, and ``"cheap"`` or ``"layers"``."""
    if tokens_per_rank <= limits[0]:
        return "cheap"
    return "layers" if tokens_per_rank <= limits[1] else "full"


@dataclass(frozen=True, slots=True)
class AutoRecompute:
    """``recompute="auto"``'s rule for one traced graph (Note [Recomputation by length])."""

    cheap_bytes_per_token: float
    """What ``"cheap"`` saves inside the layers per token of a rank, every MLP untiled
    (estimated)."""
    layers_bytes_per_token: float
    """What ``"layers"`` saves inside the layers per token of a rank (estimated)."""
    budget: int
    """Bytes of saved activations per rank that ``"cheap"`` or ``"layers"`` may take."""
    tiling: tuple[tuple[int, float], ...] = ()
    """Per gated MLP in a layer that ``Config.tile_mlp`` may tile: the most tokens per rank it
    runs untiled, and the bytes per token that ``"cheap"`` does not save once it is tiled."""

    def bytes_per_token(self, tokens_per_rank: int) -> float:
        """What ``"cheap"`` saves per token of a rank in a call of this length."""
        untiled = sum(saving for above, saving in self.tiling if tokens_per_rank > above)
        return self.cheap_bytes_per_token - untiled

    def policy(self, tokens_per_rank: int) -> str:
        return policy_within((self.limit, self.layers_limit), tokens_per_rank)

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

    @property
    def layers_limit(self) -> int:
        """The most tokens per rank that run ``"cheap"`` or ``"layers"``."""
        rate = self.layers_bytes_per_token
        return max(self.limit, int(self.budget / rate)) if rate > 0 else 2**62

    def describe(self, policy: str, tokens_per_rank: int) -> str:
        """The plan line of the choice."""
        cheap = self.bytes_per_token(tokens_per_rank) * tokens_per_rank / GIB
        layers = self.layers_bytes_per_token * tokens_per_rank / GIB
        return (
            f"auto chose '{policy}' for {tokens_per_rank:,} tokens per rank: 'cheap' would save "
            f"~{cheap:.3g} GiB per rank and 'layers' ~{layers:.3g} GiB against a budget of "
            f"{self.budget / GIB:.3g} GiB (Config.activation_memory_gib); 'cheap' up to "
            f"~{self.limit:,} tokens per rank, 'layers' up to ~{self.layers_limit:,}"
        )


def inductor_options(policy: str) -> dict[str, bool]:
    """Inductor's config for a graph compiled under ``policy`` (Note [Buffer reuse under
    recomputation])."""
    return {"allow_buffer_reuse": False} if policy in ("layers", "full") else {}


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


def _saved_bytes(gm: GraphModule, ctx: CompileContext) -> tuple[int, int]:
    """The bytes (all ranks together, at the traced shapes) that ``"cheap"`` and ``"layers"``
    save inside the layers: attention and autosp op outputs, attention inputs (for the
    collectives' results), random ops' outputs and each layer's inputs from outside it, and
    for ``"cheap"`` the matmul outputs."""

    def size(node: object) -> int:
        value = meta(node)
        if not isinstance(value, torch.Tensor) or not seq_dims(value, ctx.seq_syms):
            return 0
        return hint(value.numel()) * value.element_size()

    kept = matmuls = 0
    inputs: set[tuple[str, Node]] = set()
    for node in gm.graph.nodes:
        layer = layer_of(node) if node.op in ("call_function", "call_method") else None
        if layer is None:
            continue
        name = op_name(node)
        if name in ATTENTION:
            kept += 2 * size(node) + sum(size(a) for a in node.args[:3])
        elif name in RANDOM or str(node.target).startswith("autosp."):
            kept += size(node)
        elif name in MATMULS:
            matmuls += size(node)
        inputs.update((layer, a) for a in node.all_input_nodes if layer_of(a) != layer)
    kept += sum(size(a) for _, a in inputs)
    return kept + matmuls, kept


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
    cheap, layers = _saved_bytes(gm, ctx)
    ctx.auto_recompute = AutoRecompute(cheap / traced, layers / traced, budget, tiling)
    return gm


DESCRIPTIONS = {
    "cheap": "norms, activations and elementwise ops recomputed in the backward; attention, "
    "collectives, random ops and matmuls saved",
    "layers": "layers recomputed in the backward from their inputs; attention, collectives and "
    "random ops saved",
    "full": "layers recomputed in the backward from their inputs, attention and collectives "
    "included; random ops saved",
}
"""What a plan line says each policy does."""


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
        ctx.plan.recompute.append(f"{policy}: {len(regions)} {DESCRIPTIONS[policy]}")
        if ctx.auto_recompute is not None:
            choice = ctx.auto_recompute.describe(policy, ctx.tokens_per_rank)
            ctx.plan.recompute.append(choice)
            ctx.plan.auto_limits = (ctx.auto_recompute.limit, ctx.auto_recompute.layers_limit)
            if policy == "full":
                logger.warning(
                    "autosp: %s. Its attention and collectives run again in the backward; "
                    "where 'layers' fits, raise Config.activation_memory_gib to keep them",
                    choice,
                )
    return gm
