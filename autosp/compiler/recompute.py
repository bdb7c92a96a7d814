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

A region the model checkpointed itself (Note [Checkpointed regions]) keeps its own tags when
``Config.recompute`` is ``"off"``; otherwise this policy replaces them. Recomputation changes
memory and time, never values.
"""

from __future__ import annotations

import re

from torch.fx import GraphModule, Node
from torch.utils.checkpoint import CheckpointPolicy

from autosp.compiler.context import CompileContext
from autosp.compiler.ops_table import op_name

MATMULS = frozenset({"linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "grouped_mm"})
RANDOM = frozenset({"dropout", "native_dropout", "rand", "randn", "rand_like", "bernoulli"})
SAVED_MODULES = ("autosp.comm", "autosp.compiler.attention", "autosp.compiler.runtime")
"""Functions of these modules in the rank-local graph communicate or attend: never
recomputed."""

MUST_SAVE = CheckpointPolicy.MUST_SAVE
_NUMBERED = re.compile(r"\.(\d+)$|\[(\d+)\]$")


def layer_of(node: Node) -> str | None:
    """The outermost module on ``node``'s module stack at a numbered path (a layer of a
    ``ModuleList``), or None."""
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        if _NUMBERED.search(path):
            return path
    return None


def _saved(node: Node, policy: str) -> bool:
    module = getattr(node.target, "__module__", "") or ""
    if module.startswith(SAVED_MODULES) or str(node.target).startswith("autosp."):
        return True  # autosp's functions and its custom ops (torch.ops.autosp.*)
    name = op_name(node)
    return name in RANDOM or (policy == "cheap" and name in MATMULS)


def tag_recompute_pass(gm: GraphModule, ctx: CompileContext) -> GraphModule:
    """Tag the rank-local graph for the partitioner (Note [Sequence-aware recomputation])."""
    policy = ctx.config.recompute
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
    return gm
