"""Activation checkpointing that the model asked for (``torch.utils.checkpoint``).

Note [Checkpointed regions]
---------------------------
Under ``torch.compile`` a checkpointed function (Hugging Face's
``gradient_checkpointing_enable()``, a hand-written ``checkpoint(layer, x)``) becomes one
``tag_activation_checkpoint`` higher-order op whose body is a subgraph: the rules, which walk
the top-level graph, would see neither its attention nor its token path. ``inline_checkpoints_
pass`` copies each body into the graph in place of the call and tags the copied nodes as
AOTAutograd's selective checkpointing does (``node.meta["recompute"] =
CheckpointPolicy.PREFER_RECOMPUTE``, one ``ac_graph_id`` per region). The sharding pass keeps
the meta of every node it emits, and AOTAutograd copies these tags to the ATen nodes it traces,
so the partitioner recomputes the region in the backward as the model asked; what autosp adds
(collectives, attention strategies) carries no tag and is not recomputed. Values are the same
either way: checkpointing changes memory, never results.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node
from torch.utils.checkpoint import CheckpointPolicy

from autosp.compiler.context import CompileContext

CHECKPOINT = torch.ops.higher_order.tag_activation_checkpoint


def _inline(gm: GraphModule, call: Node, region: int) -> None:
    """Copy the body of ``call`` into ``gm`` before it, and route its outputs' readers."""
    body_attr = call.args[0]
    body: GraphModule = getattr(gm, body_attr.target)
    env: dict[Node, Node] = {}
    placeholders = list(body.graph.find_nodes(op="placeholder"))
    for placeholder, arg in zip(placeholders, call.args[1:], strict=True):
        env[placeholder] = arg
    results = None
    with gm.graph.inserting_before(call):
        for node in body.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                results = torch.fx.map_arg(node.args[0], lambda n: env[n])
                continue
            if node.op == "get_attr":  # a nested region's body: give it a name in gm
                name = f"{body_attr.target}_{node.target}"
                gm.add_submodule(name, getattr(body, node.target))
                copied = gm.graph.get_attr(name)
                copied.meta.update(node.meta)
            else:
                copied = gm.graph.node_copy(node, lambda n: env[n])
            copied.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
            copied.meta["ac_graph_id"] = region
            env[node] = copied
    for user in list(call.users):
        if user.target is operator.getitem and isinstance(results, (tuple, list)):
            user.replace_all_uses_with(results[user.args[1]])
            gm.graph.erase_node(user)
    if call.users:
        call.replace_all_uses_with(results)
    gm.graph.erase_node(call)
    if not body_attr.users:
        gm.graph.erase_node(body_attr)
        gm.delete_submodule(body_attr.target)


def inline_checkpoints_pass(gm: GraphModule, ctx: CompileContext) -> GraphModule:
    """Inline every checkpointed region, tagged for recomputation (Note [Checkpointed
    regions])."""
    region = 0
    while calls := list(gm.graph.find_nodes(op="call_function", target=CHECKPOINT)):
        for call in calls:
            region += 1
            _inline(gm, call, region)
    if region:
        gm.recompile()
    return gm
