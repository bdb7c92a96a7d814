"""Gathered parameters are gathered again in the backward, never saved whole.

Note [Gathering parameters again]
---------------------------------
With parameters sharded over the ranks (``autosp.integrations.sharded``, Note [Parameters
gathered in the graph]) the graph gathers each one where the model reads it: an
``autosp::all_gather`` of a graph input (the rank's shard), then views, casts and the
gradient scale that make it the model's tensor. Saving that full tensor for the backward (for
a matmul's input gradient) would keep every parameter of the model whole from its use in the
forward to the end of the backward, as if it were not sharded. So ``regather_pass`` tags the
gather and the one-input ops after it ``MUST_RECOMPUTE``: the partitioner saves the shard (a
graph input: free) and the backward gathers again just before it needs the parameter
(AOTAutograd orders a recomputed node before its first use in the backward).

Repeating the gather is exact when what it reads is the same in the backward: the pass tags a
chain only when it starts at a graph input and nothing in the graph reads that input except
the chain's one-input, out-of-place ops (a cast before the gather, views after it): nothing
writes into it. So this changes traffic and memory, never values.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torch.utils.checkpoint import CheckpointPolicy

import autosp.comm.ops  # noqa: F401 - defines torch.ops.autosp.all_gather
from autosp.compiler.context import CompileContext
from autosp.compiler.mutation import writes_in_place

GATHER = torch.ops.autosp.all_gather.default


def _unary(node: Node) -> bool:
    """An out-of-place op of one tensor: a function of the parameter alone."""
    return (
        node.op in ("call_function", "call_method")
        and len(node.all_input_nodes) == 1
        and not writes_in_place(node)
    )


def _single_reader_chain(node: Node) -> list[Node]:
    """``node`` and the unary ops after it while each is the only reader of the one before."""
    chain = [node]
    while len(node.users) == 1 and _unary(user := next(iter(node.users))):
        chain.append(user)
        node = user
    return chain


def _tail(gather: Node) -> list[Node]:
    """The unary ops after the gather, up to the ops that use the parameter with others
    (views, casts, the gradient scale; a tied parameter has several readers)."""
    tail: list[Node] = []
    frontier = [gather]
    while frontier:
        for user in frontier.pop().users:
            if _unary(user) and user not in tail:
                tail.append(user)
                frontier.append(user)
    return tail


def regathered(gm: GraphModule) -> list[Node]:
    """The gathers of graph inputs, with the unary ops before them (from the input, each the
    only reader of the one before) and after them (Note [Gathering parameters again]). Only
    inputs that nothing but such chains reads: nothing else reads or writes them."""
    tagged: list[Node] = []
    for placeholder in gm.graph.find_nodes(op="placeholder"):
        chains = [_single_reader_chain(r) for r in placeholder.users if _unary(r)]
        if not chains or len(chains) != len(placeholder.users):
            continue
        ends = [next((i for i, n in enumerate(c) if n.target is GATHER), None) for c in chains]
        if any(end is None for end in ends):
            continue
        for chain, end in zip(chains, ends, strict=True):
            tagged += chain[: end + 1] + _tail(chain[end])
    return tagged


def regather_pass(gm: GraphModule, ctx: CompileContext) -> GraphModule:
    """Tag what gathers a sharded parameter for recomputation in the backward (Note
    [Gathering parameters again]), whatever ``Config.recompute`` chose for the rest."""
    nodes = regathered(gm)
    for node in nodes:
        node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
    gathers = sum(1 for n in nodes if n.target is GATHER)
    if gathers and ctx.plan is not None:
        ctx.plan.recompute.append(
            f"sharded parameters: {gathers} gathers in the forward, repeated in the backward "
            "(no parameter saved whole)"
        )
    return gm
