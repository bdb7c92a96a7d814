"""The language-model head and its cross-entropy, over chunks of tokens.

Note [Chunked loss]
-------------------
``F.cross_entropy(F.linear(h, W).float().view(-1, V), labels)`` builds ``[tokens, vocab]``
logits, an fp32 copy and, in the backward, their gradient: the largest activations of a
long-context step (``tokens / P x 128k`` floats for Llama 3). ``chunk_loss_pass`` finds that
chain in the captured graph (a ``linear`` without bias, then only views, slices of rows
(``logits[:, :-1]``), an upcast to fp32 and a soft-cap ``c * tanh(z / c)``, then
``cross_entropy`` with integer labels and a mean or sum reduction) and replaces it by
``linear_cross_entropy``, whose op runs ``chunk`` rows at a time: each chunk's logits are
made, give their loss terms and, when a gradient will be needed, their gradients with respect
to ``h`` and ``W`` at once, and are freed. So no logits exist beyond one
chunk, and the backward only scales the saved gradients by the loss's incoming gradient (a
scalar for a mean or a sum): no matmul is recomputed, as Liger-Kernel's fused linear
cross-entropy does. The weight's gradient is accumulated over chunks in fp32.

Per element the math is the single-process one: logits in the weight's dtype, upcast to fp32,
soft-capped in fp32, log-sum-exp, label smoothing as ``F.cross_entropy`` defines it, labels
equal to ``ignore_index`` contribute nothing. Sharded, the rule gives each rank its rows and
reduces sum and count over ranks as Note [Exact loss] says.

The logits the model returns beside the loss are dropped (``None`` in their place) unless
``Config.return_logits``: returning them would keep them whole. When they are returned they are
computed by the model's own ``linear``, outside the loss, and carry their own gradient.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from autosp.compiler.args import arguments, bind_defaults
from autosp.compiler.context import CompileContext
from autosp.compiler.loss import global_mean
from autosp.compiler.ops_table import meta, op_name
from autosp.compiler.placement import Partial, Replicate, Shard
from autosp.compiler.propagate import ShardingPass, UnsupportedOp, rule
from autosp.compiler.row_chunks import row_chunks, rows_per_chunk

CHUNK_BYTES = 64 * 2**20
"""Default size of one chunk's fp32 logits."""

VIEWS = frozenset({"view", "reshape", "contiguous", "flatten"})


def _chunk_terms(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    grads: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk: the sum of its token losses (fp64) and, if ``grads``, the gradient of that
    sum with respect to its logits, in the weight's dtype."""
    logits = F.linear(hidden, weight).float()
    capped = logits
    if softcap:
        tanh = torch.tanh(logits / softcap)
        capped = softcap * tanh
    # log_softmax, as F.cross_entropy computes it: the same digits, even for a loss near 0.
    log_probs = torch.log_softmax(capped, dim=-1)
    valid = target != ignore_index
    index = torch.where(valid, target, 0).unsqueeze(-1)
    losses = -log_probs.gather(-1, index).squeeze(-1)
    if label_smoothing:
        uniform = -log_probs.mean(-1)
        losses = (1 - label_smoothing) * losses + label_smoothing * uniform
    total = torch.where(valid, losses, 0.0).double().sum()
    if not grads:
        return total, None
    grad = log_probs.exp_()
    grad.scatter_add_(-1, index, torch.full_like(index, label_smoothing - 1, dtype=grad.dtype))
    if label_smoothing:
        grad -= label_smoothing / grad.shape[-1]
    grad *= valid.unsqueeze(-1)
    if softcap:
        grad *= 1 - tanh * tanh
    return total, grad.to(weight.dtype)


@torch.library.custom_op("autosp::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    chunk: int,
    grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum of token losses in fp64, d sum / d hidden, d sum / d weight)`` over ``[N, H]``
    rows of ``hidden``, ``chunk`` rows at a time (Note [Chunked loss], Note [Chunk loops on fake
    tensors]); the gradients are empty when not ``grads``."""
    total = hidden.new_zeros((), dtype=torch.float64)
    grad_hidden = torch.empty_like(hidden) if grads else hidden.new_empty(0)
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads else weight.new_empty(0)
    for part in row_chunks(hidden.shape[0], chunk, hidden):
        rows = hidden[part]
        loss, grad = _chunk_terms(
            rows, weight, target[part], ignore_index, label_smoothing, softcap, grads
        )
        total += loss
        if grad is not None:
            torch.mm(grad, weight, out=grad_hidden[part])
            grad_weight += torch.mm(grad.t(), rows)
    return total, grad_hidden, grad_weight.to(weight.dtype)


@linear_cross_entropy_op.register_fake
def _(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    chunk: int,
    grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    total = hidden.new_empty((), dtype=torch.float64)
    if not grads:
        return total, hidden.new_empty(0), weight.new_empty(0)
    return total, torch.empty_like(hidden), torch.empty_like(weight)


def _setup(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    ctx.grads = inputs[-1]
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(output[1], output[2])


def _backward(ctx: Any, grad_total: torch.Tensor, *_: Any) -> tuple[Any, ...]:
    if not ctx.grads:
        raise RuntimeError(
            "autosp: the chunked loss was compiled without gradients (grad mode was off when "
            "it was traced) but a backward reached it"
        )
    grad_hidden, grad_weight = ctx.saved_tensors
    scale = grad_total.to(grad_hidden.dtype)
    return grad_hidden * scale, grad_weight * scale, None, None, None, None, None, None


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    reduction: str,
    chunk: int,
    grads: bool,
) -> torch.Tensor:
    """The single-process meaning of the chain ``chunk_loss_pass`` replaces: the cross-entropy
    of ``[N, H]`` hidden rows through ``weight`` (fp32 logits), reduced by ``reduction``."""
    total, _, _ = linear_cross_entropy_op(
        hidden, weight, target, ignore_index, label_smoothing, softcap, chunk, grads
    )
    if reduction == "sum":
        return total.float()
    return (total / (target != ignore_index).sum()).float()


def sharded_mean(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    chunk: int,
    grads: bool,
    group: str,
    scale: int = 1,
) -> torch.Tensor:
    """The token-mean loss of the whole sequence from this rank's rows (Note [Exact loss],
    Note [Token mean over data-parallel groups])."""
    total, _, _ = linear_cross_entropy_op(
        hidden, weight, target, ignore_index, label_smoothing, softcap, chunk, grads
    )
    return global_mean(total, (target != ignore_index).sum(), group, torch.float32, scale)


@rule("linear_cross_entropy")
def shard_linear_cross_entropy(sp: ShardingPass, node: Node) -> None:
    """Each rank runs its rows; a mean reduces sum and count over ranks."""
    args = bind_defaults(linear_cross_entropy, node)
    assert args is not None
    hidden, target = args["hidden"], args["target"]
    placement = sp.placement(hidden)
    if not isinstance(placement, Shard) or placement.dim != 0:
        raise UnsupportedOp("the hidden rows are not sharded along the sequence")
    if not isinstance(sp.placement(args["weight"]), Replicate):
        raise UnsupportedOp("the head's weight is not replicated")
    if not any(d.dim == 0 and d.length == placement.length for d in sp.seq_dims(target)):
        raise UnsupportedOp("the labels are not aligned with the hidden rows")
    local_target = sp.shard(target, placement, pad_value=args["ignore_index"])
    local = {
        "hidden": sp.env[hidden],
        "weight": sp.env[args["weight"]],
        "target": local_target,
        **{k: args[k] for k in ("ignore_index", "label_smoothing", "softcap", "chunk", "grads")},
    }
    if args["reduction"] == "mean":
        group, scale = sp.mean_group()
        sp.env[node] = sp.call(sharded_mean, **local, group=group, scale=scale)
        sp.placements[node] = Replicate(loss_grad=True)
    else:  # this rank's term of the sum
        sp.env[node] = sp.call(linear_cross_entropy, **local, reduction="sum")
        sp.placements[node] = Partial()
    sp.plan.loss.append(
        f"{node.name}: chunked linear + cross_entropy (reduction={args['reduction']}, "
        f"{args['chunk']} tokens per chunk) over sharded tokens"
    )


# --------------------------------------------------------------------------- the pass


def _softcap(node: Node) -> tuple[Node, float, list[Node]] | None:
    """``c * tanh(x / c)`` ending at ``node``: ``(x, c, [tanh, div])``."""
    if op_name(node) not in ("mul", "mul_") or node.op != "call_function":
        return None
    tanh, cap = node.args[:2] if len(node.args) == 2 else (None, None)
    if isinstance(cap, Node):
        tanh, cap = cap, tanh
    if not (isinstance(tanh, Node) and op_name(tanh) == "tanh" and isinstance(cap, float)):
        return None
    div = tanh.args[0]
    if not (
        isinstance(div, Node)
        and div.target in (operator.truediv, torch.div)
        and len(div.args) == 2
        and div.args[1] == cap
        and not div.kwargs
    ):
        return None
    return div.args[0], cap, [tanh, div]


def _upcast(node: Node) -> Node | None:
    """``x.float()`` or ``x.to(torch.float32)`` ending at ``node``: ``x``."""
    if node.op != "call_method" or not node.args:
        return None
    if node.target == "float" and len(node.args) == 1:
        return node.args[0]
    if node.target == "to" and meta(node).dtype == torch.float32:
        found = arguments(node) or {}
        if all(not isinstance(v, Node) for k, v in found.items() if k != "input"):
            return node.args[0]
    return None


def _row_slice(node: Node) -> Any:
    """The index of ``logits[:, :-1]`` (slices of the dims before the last), else None."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    value = meta(node.args[0])
    if not isinstance(value, torch.Tensor):
        return None  # an element of a tuple (an autograd.Function's outputs), not rows
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    ndim = value.dim()
    if not all(isinstance(i, slice) for i in index) or len(index) > ndim:
        return None
    if any(isinstance(v, Node) for i in index for v in (i.start, i.stop, i.step)):
        return None
    if len(index) == ndim and index[-1] != slice(None):
        return None
    return node.args[1]


def _head(logits: Node) -> tuple[Node, list[Node], list[Any], float, bool] | None:
    """The ``linear`` whose output reaches the loss's input ``logits`` through views, slices
    of rows, an upcast and a soft-cap: ``(linear, chain from logits up to it, the row slices
    from the linear outwards, soft-cap, upcast)``."""
    chain: list[Node] = []
    slices: list[Any] = []
    softcap, upcast, node = 0.0, False, logits
    while isinstance(node, Node):
        chain.append(node)
        if node.op == "call_function" and node.target in (F.linear, torch._C._nn.linear):
            bias = node.kwargs.get("bias", node.args[2] if len(node.args) > 2 else None)
            if bias is not None or len(node.args) < 2:
                return None
            return node, chain, slices[::-1], softcap, upcast
        if node.op == "call_method" and node.target in VIEWS:
            node = node.args[0]
        elif (index := _row_slice(node)) is not None:
            slices.append(index)
            node = node.args[0]
        elif (source := _upcast(node)) is not None:
            node, upcast = source, True
        elif not softcap and (capped := _softcap(node)) is not None:
            node, softcap, inner = capped
            chain.extend(inner)
        else:
            return None
    return None


def chunk_loss_pass(gm: GraphModule, ctx: CompileContext) -> GraphModule:
    """Replace each ``linear -> cross_entropy`` chain by ``linear_cross_entropy``
    (Note [Chunked loss]); the logits it made are dropped from the outputs unless
    ``Config.return_logits``."""
    if not ctx.config.chunk_loss:
        return gm
    graph = gm.graph
    (output,) = graph.find_nodes(op="output")
    for node in list(graph.nodes):
        if op_name(node) != "cross_entropy" or node.op != "call_function":
            continue
        args = bind_defaults(F.cross_entropy, node)
        if (
            args is None
            or args["weight"] is not None
            or args["size_average"] is not None
            or args["reduce"] is not None
            or args["reduction"] not in ("mean", "sum")
            or not isinstance(args["input"], Node)
            or meta(args["target"]).is_floating_point()
            or meta(args["input"]).dim() != 2
        ):
            continue
        found = _head(args["input"])
        if found is None:
            continue
        linear, chain, slices, softcap, upcast = found
        if not upcast and meta(linear).dtype != torch.float32:
            continue  # the loss runs in low precision: keep the model's own math
        chain_set = set(chain)
        users = {u for n in chain for u in n.users} - chain_set - {node, output}
        if users:
            continue  # the logits have another use inside the graph: they exist whole anyway
        hidden, weight = linear.args[0], linear.args[1]
        width = meta(hidden).shape[-1]
        vocab = meta(weight).shape[0]
        with graph.inserting_before(node):
            for index in slices:
                hidden_meta = meta(hidden)
                hidden = graph.call_function(operator.getitem, (hidden, index))
                hidden.meta["example_value"] = hidden_meta[index]
            flat = graph.call_method("reshape", (hidden, -1, width))
            flat.meta["example_value"] = meta(hidden).reshape(-1, width)
            chunked = graph.call_function(
                linear_cross_entropy,
                (flat, weight, args["target"]),
                {
                    "ignore_index": args["ignore_index"],
                    "label_smoothing": args["label_smoothing"],
                    "softcap": softcap,
                    "reduction": args["reduction"],
                    "chunk": rows_per_chunk(ctx.config.loss_chunk_tokens, 4 * vocab, CHUNK_BYTES),
                    "grads": meta(node).requires_grad,
                },
            )
        chunked.meta["example_value"] = meta(node)
        node.replace_all_uses_with(chunked)
        graph.erase_node(node)
        if not ctx.config.return_logits:
            output.args = (_without(output.args[0], chain_set),)
        for dead in chain:
            if not dead.users:
                graph.erase_node(dead)
    gm.recompile()
    return gm


def _without(value: Any, nodes: set[Node]) -> Any:
    """``value`` (an output structure) with ``nodes`` replaced by None."""
    if isinstance(value, Node):
        return None if value in nodes else value
    if isinstance(value, (list, tuple)):
        return type(value)(_without(v, nodes) for v in value)
    if isinstance(value, dict):
        return {k: _without(v, nodes) for k, v in value.items()}
    return value
