"""The transformer MLP over chunks of tokens.

Note [Tiled MLP]
----------------
A gated MLP ``down(act(gate(x)) * up(x))`` (Llama, Qwen, Mistral: SiLU; Gemma: tanh GELU)
makes four ``[tokens, intermediate]`` activations per layer, three to four times the width of
the hidden state, and the backward needs two of them saved (or recomputed from two saved matmul
outputs). At long context they are the largest activations of a layer after the logits.
``tile_mlp_pass`` finds the chain in the captured graph and replaces it by one op,
``autosp::tiled_mlp``, which runs ``chunk`` token rows at a time, as ALST's TiledMLP does
(arXiv 2506.13996)::

    forward                      saved            backward, per chunk of rows
    x --[chunk]--> y[chunk]      x (and the       g = x W_g^T, u = x W_u^T, a = act(g), h = a u
    (intermediates freed per     weights)         dW_d += dy^T h;  dh = dy W_d
     chunk)                                       dg = act'(g) (dh u);  du = dh a
                                                  dW_g += dg^T x;  dW_u += du^T x
                                                  dx = dg W_g + du W_u

So only the op's input is saved; no ``[tokens, intermediate]`` tensor exists beyond one chunk,
in the forward or the backward. The price is the gate and up matmuls once more in the backward
(two of the MLP's six matmul-sized products of a training step). Per element the math is the
model's: the same ``linear``, activation and product in the model's dtype, the activation's
derivative by the ATen kernel autograd uses (``silu_backward``, ``gelu_backward``,
``threshold_backward``); only the weight gradients are summed over chunks, in fp32 for low
precision weights (as Note [Chunked loss] does).

The op is opaque to the partitioner: Note [Sequence-aware recomputation] marks it saved (it is
an ``autosp`` op), so its output is kept and its inside is never recomputed by the graph as
well; under ``recompute="full"`` it is recomputed where the backward reads its output (the
last layer's, for the final norm), never for its own backward, which reads only its input.
Its rows are independent, so under sequence parallelism each rank runs its own rows.

When: ``Config.tile_mlp`` ``True`` / ``False`` forces it; ``"auto"`` tiles an MLP in a call
where one ``[tokens per rank, intermediate]`` activation exceeds ``AUTO_BYTES``. That is decided
per call, as the recomputation policy is (Note [Recomputation by length]): ``find_mlps_pass``
records the gated MLPs of the traced graph once, and ``tile_mlp_pass`` rewrites those the call
being compiled tiles (``CompileContext.tiled_mlps``, chosen by ``MlpTiling.tiled``), so a short
first call (a warm-up, the planner's compiling step) leaves long calls tiled; a length that
tiles other MLPs than the traced graph gets its own graph (``backend.Runner``).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from torch.utils.checkpoint import CheckpointPolicy

from autosp.compiler.context import CompileContext
from autosp.compiler.ops_table import meta, op_name
from autosp.compiler.placement import Replicate, Shard
from autosp.compiler.propagate import ShardingPass, UnsupportedOp, rule
from autosp.compiler.row_chunks import row_chunks, rows_per_chunk
from autosp.compiler.seqdims import seq_dims

AUTO_BYTES = 256 * 2**20
"""``tile_mlp="auto"`` tiles an MLP whose ``[tokens per rank, intermediate]`` activation is
larger than this. Below it, what tiling saves (about two such tensors per layer) is small next
to the weights and optimizer state, and the recomputed matmuls would cost time for little
memory; Llama-3-8B (intermediate 14,336, bf16) passes it at about 9,400 tokens per rank, where
its 32 layers would save some 16 GiB of MLP activations untiled."""

CHUNK_BYTES = 64 * 2**20
"""Default size of one chunk's ``[chunk, intermediate]`` activation: large enough for
efficient matmuls (2,340 rows for Llama-3-8B in bf16), small enough that the backward's
half-dozen chunk temporaries stay far below one layer's untiled activations."""

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
"""Activations the op knows, with their autograd derivative kernels."""

MODULE_KEY = "autosp_mlp_module"
"""Node meta: the path of the module a tiled MLP came from, for ``model.plans``."""


def _approximate(activation: str) -> str:
    return "tanh" if activation == "gelu_tanh" else "none"


def _activate(gate: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(gate)
    if activation == "relu":
        return F.relu(gate)
    return F.gelu(gate, approximate=_approximate(activation))


def _activate_backward(
    grad: torch.Tensor, gate: torch.Tensor, activated: torch.Tensor, activation: str
) -> torch.Tensor:
    """d act(gate) / d gate times ``grad``, by the kernel autograd itself calls."""
    aten = torch.ops.aten
    if activation == "silu":
        return aten.silu_backward(grad, gate)
    if activation == "relu":
        return aten.threshold_backward(grad, activated, 0)
    return aten.gelu_backward(grad, gate, approximate=_approximate(activation))


def _accumulate(total: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """``total += left @ right``; the product is rounded to the operands' dtype first when
    ``total`` is wider, as one matmul of the model would round it."""
    if total.dtype == left.dtype:
        total.addmm_(left, right)
    else:
        total += torch.mm(left, right)


@torch.library.custom_op("autosp::tiled_mlp", mutates_args=())
def tiled_mlp(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    activation: str,
    chunk: int,
) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` over ``[..., hidden]`` ``x``, ``chunk`` rows at a time
    (Note [Tiled MLP])."""
    rows = x.reshape(-1, x.shape[-1])
    out = rows.new_empty(rows.shape[0], down_weight.shape[0])
    for block in row_chunks(rows.shape[0], chunk, rows):
        part = rows[block]
        inner = _activate(F.linear(part, gate_weight), activation) * F.linear(part, up_weight)
        out[block] = F.linear(inner, down_weight)
    return out.view(*x.shape[:-1], down_weight.shape[0])


@tiled_mlp.register_fake
def _(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    activation: str,
    chunk: int,
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], down_weight.shape[0])


@torch.library.custom_op("autosp::tiled_mlp_backward", mutates_args=())
def tiled_mlp_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    activation: str,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``tiled_mlp`` with respect to ``x`` and the three weights, each chunk
    recomputed from its rows of ``x`` (Note [Tiled MLP])."""
    rows = x.reshape(-1, x.shape[-1])
    grads = grad.reshape(-1, down_weight.shape[0])
    grad_x = torch.empty_like(rows)
    wide = torch.promote_types(gate_weight.dtype, torch.float32)
    grad_gate, grad_up, grad_down = (
        torch.zeros_like(w, dtype=wide) for w in (gate_weight, up_weight, down_weight)
    )
    for block in row_chunks(rows.shape[0], chunk, rows):
        part, grad_part = rows[block], grads[block]
        gate = F.linear(part, gate_weight)
        up = F.linear(part, up_weight)
        activated = _activate(gate, activation)
        _accumulate(grad_down, grad_part.t(), activated * up)
        grad_inner = torch.mm(grad_part, down_weight)
        grad_up_part = grad_inner * activated
        grad_gate_part = _activate_backward(grad_inner * up, gate, activated, activation)
        del gate, up, activated, grad_inner
        _accumulate(grad_gate, grad_gate_part.t(), part)
        _accumulate(grad_up, grad_up_part.t(), part)
        grad_x[block] = torch.mm(grad_gate_part, gate_weight) + torch.mm(grad_up_part, up_weight)
    return (
        grad_x.view_as(x),
        grad_gate.to(gate_weight.dtype),
        grad_up.to(up_weight.dtype),
        grad_down.to(down_weight.dtype),
    )


@tiled_mlp_backward.register_fake
def _(
    grad: torch.Tensor,
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    activation: str,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(t.new_empty(t.shape) for t in (x, gate_weight, up_weight, down_weight))


def _setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, gate_weight, up_weight, down_weight, ctx.activation, ctx.chunk = inputs
    ctx.save_for_backward(x, gate_weight, up_weight, down_weight)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    grads = tiled_mlp_backward(grad, *ctx.saved_tensors, ctx.activation, ctx.chunk)
    needed = ctx.needs_input_grad
    return *(g if needed[i] else None for i, g in enumerate(grads)), None, None


tiled_mlp.register_autograd(_backward, setup_context=_setup)


@rule("tiled_mlp.default")
def shard_tiled_mlp(sp: ShardingPass, node: Node) -> None:
    """Rows are independent: each rank runs the MLP on its own rows."""
    x, *weights = node.args[:4]
    placement = sp.placement(x)
    if not isinstance(placement, Shard):
        raise UnsupportedOp("the tokens are not sharded")
    if placement.dim == meta(x).dim() - 1 and not placement.merged:
        raise UnsupportedOp("the sequence is the hidden dimension")
    if not all(isinstance(sp.placement(w), Replicate) for w in weights):
        raise UnsupportedOp("a sharded weight")
    sp.emit_local(node, placement)
    sp.plan.mlp.append(
        f"{node.meta.get(MODULE_KEY) or node.name}: tiled MLP ({node.args[4]}, "
        f"{node.args[5]} tokens per chunk) over sharded tokens"
    )


# --------------------------------------------------------------------------- the pass


def _activation(node: Node) -> tuple[Node, str] | None:
    """``act(g)`` for an activation the op knows: ``(g, name)``."""
    if node.op != "call_function" or len(node.args) != 1 or not isinstance(node.args[0], Node):
        return None
    name = op_name(node)
    kwargs = dict(node.kwargs)
    if name in ("silu", "relu") and not kwargs.pop("inplace", False) and not kwargs:
        return node.args[0], name
    if name == "gelu" and set(kwargs) <= {"approximate"}:
        approximate = kwargs.get("approximate", "none")
        if approximate in ("none", "tanh"):
            return node.args[0], "gelu" if approximate == "none" else "gelu_tanh"
    return None


def _linear(node: Any) -> tuple[Node, Node] | None:
    """A bias-free ``linear(x, W)``: ``(x, W)``."""
    if not (
        isinstance(node, Node)
        and node.op == "call_function"
        and node.target in (F.linear, torch._C._nn.linear)
        and len(node.args) in (2, 3)
        and not node.kwargs
        and (len(node.args) == 2 or node.args[2] is None)
    ):
        return None
    x, weight = node.args[:2]
    if not all(isinstance(meta(n), torch.Tensor) for n in (x, weight)) or meta(weight).dim() != 2:
        return None
    return x, weight


def _gated_mlp(down: Node) -> tuple[Node, Node, Node, Node, str, list[Node]] | None:
    """``down(act(gate(x)) * up(x))`` ending at ``down``:
    ``(x, gate weight, up weight, down weight, activation, inner nodes)``."""
    found = _linear(down)
    if found is None:
        return None
    product, down_weight = found
    if not (
        product.op == "call_function"
        and product.target in (operator.mul, torch.mul)
        and len(product.args) == 2
        and not product.kwargs
        and all(isinstance(a, Node) for a in product.args)
    ):
        return None
    for activated, up in (product.args, product.args[::-1]):
        act = _activation(activated)
        if act is None or _linear(up) is None or _linear(act[0]) is None:
            continue
        (x, up_weight), (gate_x, gate_weight) = _linear(up), _linear(act[0])
        inner = [act[0], activated, up, product]
        if gate_x is not x or meta(activated).shape != meta(up).shape:
            continue
        if any(len(n.users) != 1 for n in inner):
            continue  # an activation is used elsewhere: it exists whole anyway
        return x, gate_weight, up_weight, down_weight, act[1], inner
    return None


def _module_path(nodes: list[Node]) -> str | None:
    """The innermost module whose call made all of ``nodes`` (``model.layers.0.mlp``)."""
    stacks = [list((n.meta.get("nn_module_stack") or {}).values()) for n in nodes]
    common = None
    for entries in zip(*stacks, strict=False):  # stacks may differ in depth
        if any(e[0] != entries[0][0] for e in entries):
            break
        common = entries[0][0]
    if common is None:
        return None
    return common.partition(".")[2] if common.startswith("L[") else common


@dataclass(frozen=True, slots=True)
class MlpTiling:
    """The gated MLPs of a traced graph that ``Config.tile_mlp`` may tile, and which a call
    tiles (Note [Tiled MLP])."""

    setting: bool | str
    """``Config.tile_mlp``: ``True`` or ``"auto"``."""
    row_bytes: dict[str, int]
    """Per MLP (its ``down`` node's name): the bytes of one token's intermediate activation."""

    def tiled_above(self, name: str) -> int:
        """The most tokens per rank of a call that runs MLP ``name`` untiled."""
        return 0 if self.setting is True else AUTO_BYTES // self.row_bytes[name]

    def tiled(self, tokens_per_rank: int) -> frozenset[str]:
        """The MLPs a call with ``tokens_per_rank`` tokens on each rank runs tiled."""
        return frozenset(n for n in self.row_bytes if tokens_per_rank > self.tiled_above(n))


def find_mlps_pass(gm: GraphModule, ctx: CompileContext) -> GraphModule:
    """Record the gated MLPs on the token path that ``Config.tile_mlp`` may tile
    (``ctx.mlps``); ``tile_mlp_pass`` rewrites them per call."""
    if ctx.config.tile_mlp is False:
        return gm
    row_bytes = {}
    for down in gm.graph.nodes:
        found = _gated_mlp(down)
        if found is None:
            continue
        x, gate_weight, up_weight, down_weight, _, inner = found
        value = meta(x)
        dtypes = {meta(n).dtype for n in (x, gate_weight, up_weight, down_weight, *inner, down)}
        if len(dtypes) != 1 or not seq_dims(value, ctx.seq_syms):
            continue  # mixed precision (autocast), or not on the token path (routed experts)
        row_bytes[down.name] = meta(gate_weight).shape[0] * value.element_size()
    ctx.mlps = MlpTiling(ctx.config.tile_mlp, row_bytes)
    return gm


def tile_mlp_pass(gm: GraphModule, ctx: CompileContext) -> GraphModule:
    """Replace each gated MLP of ``ctx.tiled_mlps`` by ``tiled_mlp`` (Note [Tiled MLP]), in a
    copy of ``gm`` (the traced graph stays whole for the calls that tile other MLPs)."""
    if not ctx.tiled_mlps:
        return gm
    gm = GraphModule(gm, copy.deepcopy(gm.graph))  # node names, and so the mask plan, kept
    graph = gm.graph
    for down in list(graph.nodes):
        if down.name not in ctx.tiled_mlps:
            continue
        x, gate_weight, up_weight, down_weight, activation, inner = _gated_mlp(down)
        value = meta(x)
        intermediate = meta(gate_weight).shape[0]
        chunk = rows_per_chunk(
            ctx.config.mlp_chunk_tokens, value.element_size() * intermediate, CHUNK_BYTES
        )
        with graph.inserting_before(down):
            tiled = graph.call_function(
                torch.ops.autosp.tiled_mlp.default,
                (x, gate_weight, up_weight, down_weight, activation, chunk),
            )
        tiled.meta.update({k: v for k, v in down.meta.items() if k != "recompute"})
        tiled.meta[MODULE_KEY] = _module_path([inner[0], inner[2], down])
        if "recompute" in down.meta:  # a region the model checkpointed: keep the op saved
            tiled.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        down.replace_all_uses_with(tiled)
        graph.erase_node(down)
        for dead in reversed(inner):
            graph.erase_node(dead)
    gm.recompile()
    return gm
