"""The loss over a sharded sequence, exact.

Note [Exact loss]
-----------------
A mean over tokens is ``L = sum_r local_sum_r / sum_r local_count_r``. Each rank computes its
sum of per-token losses and its count of labels that are not ``ignore_index``; one all-reduce
sums both. The all-reduce has an identity backward: every rank seeds the same gradient of
``L`` (``loss.backward()``), and each rank owns only its own term of the sum, so the
parameter gradients, summed over ranks, are the single-process ones.

Labels are shifted by the model on the *whole* label tensor (they are replicated until they
meet the logits) and only then sliced like the logits; padding rows get ``ignore_index``.

Note [Token mean over data-parallel groups]
-------------------------------------------
With ``dp`` data-parallel groups beside the sequence-parallel one, every engine (autosp's own
gradient sync, DDP through ``wrap_ddp``, FSDP2, ZeRO, sharded parameters) reduces the
per-rank gradients to their sum over all ``dp x sp`` ranks divided by ``dp``: the mean over
the groups. Under ``Config.dp_mean="tokens"`` (the default) the sum and the count cross every
rank of the mesh instead of one group's, so the loss is the mean over all the groups' labelled
tokens, the same on every rank, and the local sum's gradient is scaled by ``dp`` (``scale_grad``)
so that the engines' division by ``dp`` leaves the single-process gradient of that mean:

    L = sum_r total_r / sum_r count_r      (r over dp x sp)
    d total_r = dp / sum count             -> sum over ranks / dp = the one-process gradient

A group with more labelled tokens then weighs more, as in one process on the concatenated
batch. ``"groups"`` keeps each group's own mean (DDP's weighting: equal per group). Losses
that are not token means (``reduction="sum"``, the model's own arithmetic) are per group
either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from autosp.comm import ops
from autosp.compiler import runtime
from autosp.compiler.args import bind_defaults
from autosp.compiler.context import CompileContext
from autosp.compiler.find_sequence import input_name
from autosp.compiler.ops_table import meta, op_name
from autosp.compiler.placement import Partial, Replicate, Shard
from autosp.compiler.propagate import ShardingPass, UnsupportedOp, rule
from autosp.errors import AutoSPError

Rows = tuple[int, int, int, int, int, int]
"""Where the padding rows of a per-token loss are: ``(dim, seq_len, rank, world, inner,
length)``, as ``runtime.row_mask`` takes them."""


def token_losses(
    loss_fn_name: str,
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    rows: Rows | None = None,
) -> torch.Tensor:
    """This rank's per-token losses, zero on padding rows. Padding rows of class-index labels
    hold ``ignore_index``; probability targets (soft labels) have no such value, so ``rows``
    locates their padding."""
    if loss_fn_name == "cross_entropy":
        losses = F.cross_entropy(
            logits,
            target,
            ignore_index=ignore_index,
            reduction="none",
            label_smoothing=label_smoothing,
        )
    else:
        losses = F.nll_loss(logits, target, ignore_index=ignore_index, reduction="none")
    if rows is not None:
        losses = torch.where(runtime.row_mask(losses, *rows), losses, 0.0)
    return losses


def sum_loss(
    loss_fn_name: str,
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    rows: Rows | None = None,
) -> torch.Tensor:
    """This rank's term of a ``reduction="sum"`` loss."""
    return token_losses(loss_fn_name, logits, target, ignore_index, label_smoothing, rows).sum()


def mean_loss(
    loss_fn_name: str,
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    group: str,
    rows: Rows | None = None,
    scale: int = 1,
) -> torch.Tensor:
    """The token-mean loss of the whole sequence from this rank's rows (over ``group``, the
    local sum's gradient scaled by ``scale``: Note [Token mean over data-parallel groups]).
    The sum and the count cross ranks in fp64 (a bf16 count is inexact past 256 tokens) and
    the mean is rounded once, to the logits' dtype. The count is of labels other than
    ``ignore_index``, or for probability targets of the rows (``rows``), as
    ``F.cross_entropy`` divides."""
    losses = token_losses(loss_fn_name, logits, target, ignore_index, label_smoothing, rows)
    if rows is None:
        count = (target != ignore_index).sum()
    else:
        count = runtime.row_mask(losses, *rows).expand(losses.shape).sum()
    return global_mean(losses.double().sum(), count, group, logits.dtype, scale)


def global_mean(
    total: torch.Tensor, count: torch.Tensor, group: str, dtype: torch.dtype, scale: int = 1
) -> torch.Tensor:
    """``sum_r total_r / sum_r count_r`` over the group, reduced in fp64 and rounded once to
    ``dtype``; its gradient reaches each rank's ``total`` as ``scale * grad / count``."""
    total = total.double()
    if scale != 1:
        total = ops.scale_grad(total, float(scale))
    both = ops.all_reduce_loss(torch.stack([total, count.double()]), group)
    return (both[0] / both[1]).to(dtype)


@rule("cross_entropy", "nll_loss")
def shard_loss(sp: ShardingPass, node: Node) -> None:
    """Rewrite ``cross_entropy`` / ``nll_loss`` on sharded logits into its exact sharded form."""
    name = op_name(node)
    fn = F.cross_entropy if name == "cross_entropy" else F.nll_loss
    args = bind_defaults(fn, node)
    if args is None:
        raise UnsupportedOp("the loss call's arguments match no signature")
    logits, target = args["input"], args["target"]
    placement = sp.placement(logits)
    if not isinstance(placement, Shard) or isinstance(sp.placement(target), Partial):
        raise UnsupportedOp("the loss input is not sharded along the sequence")
    if args["weight"] is not None or args["size_average"] is not None or args["reduce"] is not None:
        raise UnsupportedOp("class weights or legacy reduction arguments")
    ndim = meta(logits).dim()
    if ndim < 2 or placement.dim == 1:
        raise UnsupportedOp("the sequence is the class dimension")
    soft = meta(target).is_floating_point()
    target_dim = placement.dim if soft or placement.dim == 0 else placement.dim - 1
    target_dims = [d for d in sp.seq_dims(target) if d.dim == target_dim]
    if not target_dims or target_dims[0].length != placement.length:
        raise UnsupportedOp("the labels are not aligned with the logits")
    ignore_index = args["ignore_index"]
    target_placement = Shard(target_dim, placement.inner, placement.length)
    local_target = sp.shard(target, target_placement, pad_value=0.0 if soft else ignore_index)
    smoothing = args.get("label_smoothing", 0.0)
    reduction = args["reduction"]
    loss_dim = 0 if placement.dim == 0 else placement.dim - 1
    rows = (
        (loss_dim, sp.seq_len, sp.group.rank, sp.group.world, placement.inner, placement.length)
        if soft
        else None
    )
    local = (name, sp.env[logits], local_target, ignore_index, smoothing)
    if reduction == "mean":
        group, scale = sp.mean_group()
        sp.env[node] = sp.call(mean_loss, *local, group, rows, scale)
        sp.placements[node] = Replicate(loss_grad=True)
    elif reduction == "sum":
        sp.env[node] = sp.call(sum_loss, *local, rows)
        sp.placements[node] = Partial()
    else:
        sp.env[node] = sp.call(token_losses, *local, rows)
        sp.placements[node] = Shard(loss_dim, placement.inner, placement.length)
    sp.plan.loss.append(f"{node.name}: {name} (reduction={reduction}) over sharded tokens")


def require_loss_pass(gm: GraphModule, ctx: CompileContext) -> GraphModule:
    """Refuse a call given ``labels=`` whose graph returns nothing computed from them: the
    caller would compute the loss outside, on this rank's rows only."""
    if not ctx.label_inputs:
        return gm
    reached = {
        p for p in gm.graph.find_nodes(op="placeholder") if input_name(p) in ctx.label_inputs
    }
    for node in gm.graph.nodes:
        if node.op != "placeholder" and any(a in reached for a in node.all_input_nodes):
            reached.add(node)
    (output,) = gm.graph.find_nodes(op="output")
    if not any(a in reached for a in output.all_input_nodes):
        raise AutoSPError(
            "autosp: labels were given but the model returned no loss computed from them. "
            "autosp computes the loss inside the model so that it is exact across ranks; "
            "return the loss from forward (Hugging Face models do when labels= is passed)."
        )
    return gm
