"""Ring attention: keep the query rows, pass key/value blocks around the ring.

Note [Ring attention]
---------------------
Rank ``r`` holds query, key and value rows ``[r*L, (r+1)*L)`` of every head. In ``P`` steps each
rank attends its queries to every key/value block: at step ``t`` it holds block
``(r - t) mod P``, starts sending it to ``r + 1`` (and receiving the next from ``r - 1``), and
meanwhile computes attention on it. Partial results merge exactly through their
log-sum-exp ``lse``, in fp32 (derivation: https://arxiv.org/abs/2112.05682, section 3)::

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

Causal attention skips blocks from the future and applies the causal mask inside the diagonal
block; on even blocks it runs in the zigzag layout, where every rank does equal work
(Note [Load balancing]). A dense mask (sliding windows, documents, padding) arrives as this
rank's query rows of it; each step takes the columns of the block held (a block it hides
entirely is computed too: which blocks run is decided from positions alone, never by reading
a tensor on the host). A structured mask skips the blocks its geometry hides (Note
[Structured masks]). Each block runs on a fused kernel that returns the log-sum-exp and whose
backward takes the global output and log-sum-exp, or on fp32 math for soft-capped scores
(Gemma-2) (Note [Block kernels]). The backward recomputes each block from the saved global
``lse``; the key/value gradients travel around the ring with their block and arrive back at
its owner after ``P`` hops.

Note [Sinks in the ring]
------------------------
A sink is one more logit per head in every softmax row, with a zero value. After the last
block, ``total = log(exp(lse) + exp(sink))`` and ``out *= exp(lse - total)``. With ``total``
saved as the log-sum-exp, the usual backward (probabilities ``exp(s - total)``, ``delta =
rowsum(dO * O)``) is already the gradient of the joined softmax; the sink's is
``-sum(exp(sink - total) * delta)`` over this rank's rows (a partial sum, like any parameter's).

Padding rows sit at the end of the sequence: causal attention never shows them to a real query;
otherwise keys at positions ``>= seq_len`` are masked, and padding queries see every key (so no
softmax row is empty).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from autosp.comm.faults import collective
from autosp.comm.ops import _counts, _group
from autosp.compiler import runtime
from autosp.compiler.attention.blocks import (
    ALL,
    MATH_ROWS,
    Block,
    _math_scores,
    accumulate_backward,
    accumulate_forward,
    repeat_heads,
)
from autosp.compiler.attention.load_balance import permute_chunks
from autosp.compiler.attention.mask_spec import Structure, structure_of, structured_blocks

RING = "a ring send/receive"


def _exchange(
    tensors: list[torch.Tensor], pg: dist.ProcessGroup
) -> tuple[list[torch.Tensor], list]:
    """Start sending ``tensors`` to the next rank and receiving as many from the previous."""
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    nxt = dist.get_global_rank(pg, (rank + 1) % world)
    prv = dist.get_global_rank(pg, (rank - 1) % world)
    tensors = [t.contiguous() for t in tensors]
    received = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, nxt, pg) for t in tensors]
    ops += [dist.P2POp(dist.irecv, t, prv, pg) for t in received]
    _counts["ring_send_recv"] += 1
    with collective(RING, pg):
        return received, dist.batch_isend_irecv(ops)


def _padding_bias(
    rows: int, k_block: int, seq_len: int, device: torch.device
) -> torch.Tensor | None:
    """Additive fp32 bias ``[1, rows]`` (broadcast over queries) hiding the padding keys of
    block ``k_block``; None if it has none."""
    if (k_block + 1) * rows <= seq_len:
        return None
    key_pos = k_block * rows + torch.arange(rows, device=device)
    return torch.zeros(1, rows, device=device).masked_fill(key_pos >= seq_len, float("-inf"))


def _mask_bias(mask: torch.Tensor) -> torch.Tensor:
    """A boolean (True = attend) or additive mask block as an fp32 bias. A block the mask
    hides entirely is still computed (it adds nothing): skipping it would read the mask on
    the host, a synchronisation per block."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.float()


def _contiguous_blocks(
    rank: int,
    src: int,
    causal: bool,
    rows: int,
    seq_len: int,
    mask: torch.Tensor | None,
    structure: Structure | None,
    device: torch.device,
) -> list[Block]:
    """Contiguous layout: skip the future (causal) and blocks made only of padding keys; mask
    the diagonal (causal), or apply the mask's columns of block ``src`` (which hide padding
    keys), or the structured mask's blocks that it does not hide (Note [Structured masks]), or
    hide padding keys (causal attention needs no padding bias: padding keys come after every
    real query)."""
    if (causal and src > rank) or src * rows >= seq_len:
        return []
    if structure is not None:
        window, documents, valid = structure
        args = (causal, window, seq_len, documents, valid, device)
        return list(structured_blocks(rank * rows, rows, src * rows, rows, *args))
    if mask is not None:
        bias = _mask_bias(mask[..., src * rows : (src + 1) * rows])
        return [Block(ALL, ALL, causal and src == rank, bias)]
    if causal:
        return [Block(ALL, ALL, src == rank)]
    return [Block(ALL, ALL, False, _padding_bias(rows, src, seq_len, device))]


def _zigzag_block(rank: int, src: int, rows: int) -> Block:
    """Zigzag layout (causal only, Note [Load balancing]): rank ``r`` holds chunks ``r`` and
    ``2P-1-r``. From an earlier rank's block every query sees its head chunk; from a later
    one only the tail queries see it, wholly; the own block is causal."""
    half = rows // 2
    if src == rank:
        return Block(ALL, ALL, True)
    if src < rank:
        return Block(ALL, slice(0, half), False)
    return Block(slice(half, rows), ALL, False)


def _ring_steps(
    kv: list[torch.Tensor],
    pg: dist.ProcessGroup,
    is_causal: bool,
    seq_len: int,
    zigzag: bool,
    mask: torch.Tensor | None,
    structure: Structure | None,
) -> Iterator[tuple[list[Block], list[torch.Tensor]]]:
    """Rotate the key/value block ``kv`` around the ring; at each of the ``P`` steps yield
    the work this rank does on the block it holds (possibly none) and the block. The next
    block's send/recv runs while the caller computes."""
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    rows = kv[0].shape[-2]
    for step in range(world):
        src = (rank - step) % world
        pending = _exchange(kv, pg) if step < world - 1 else None
        if zigzag:
            yield [_zigzag_block(rank, src, rows)], kv
        else:
            blocks = _contiguous_blocks(
                rank, src, is_causal, rows, seq_len, mask, structure, kv[0].device
            )
            yield blocks, kv
        if pending is not None:
            received, works = pending
            with collective(RING, pg):
                for work in works:
                    work.wait()
            kv = received


@torch.library.custom_op("autosp::ring_attention", mutates_args=())
def ring_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    documents: torch.Tensor | None,
    valid: torch.Tensor | None,
    sinks: torch.Tensor | None,
    is_causal: bool,
    window: int,
    scale: float,
    softcap: float,
    seq_len: int,
    group: str,
    use_kernel: bool,
    zigzag: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention forward on ``[..., H, L, D]`` blocks: output and fp32 log-sum-exp.
    ``mask``: this rank's query rows of the padded mask, ``[..., L, P*L]``, or None;
    or a structured mask by ``window``, ``documents`` and ``valid``; ``sinks``
    (Note [Sinks in the ring]) or None."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    structure = structure_of(window, documents, valid)
    steps = _ring_steps([k, v], _group(group), is_causal, seq_len, zigzag, mask, structure)
    for blocks, kv in steps:
        for block in blocks:
            accumulate_forward(out, lse, q, kv, block, scale, softcap, use_kernel)
    if sinks is not None:
        total = torch.logaddexp(lse, sinks.float().squeeze(-1))
        out *= torch.exp(lse - total).unsqueeze(-1)
        lse = total
    return out.to(q.dtype), lse


@ring_attention_fwd.register_fake
def _(q, k, v, mask, *options):  # noqa: ANN001, ANN002, ANN202
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("autosp::ring_attention_backward", mutates_args=())
def ring_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask: torch.Tensor | None,
    documents: torch.Tensor | None,
    valid: torch.Tensor | None,
    sinks: torch.Tensor | None,
    is_causal: bool,
    window: int,
    scale: float,
    softcap: float,
    seq_len: int,
    group: str,
    use_kernel: bool,
    zigzag: bool,
    *,
    mask_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ring attention; key/value gradients return to their owner. With
    ``mask_grad``, also the (float) mask's gradient, else an empty tensor in its place; the
    sinks' gradient from this rank's rows (an empty tensor without sinks)."""
    pg = _group(group)
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (k, v)]
    dmask = q.new_empty(0)
    if mask_grad and mask is not None:
        dmask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    structure = structure_of(window, documents, valid)
    steps = _ring_steps([k, v], pg, is_causal, seq_len, zigzag, mask, structure)
    for step, (blocks, kv) in enumerate(steps):
        for block in blocks:
            accumulate_backward(
                dq, dkv, grad_out, q, kv, out, lse, block, scale, softcap, use_kernel
            )
            if dmask.numel():
                rows = kv[0].shape[-2]
                cols = dmask.narrow(-1, (rank - step) % world * rows, rows)
                _add_bias_grad(cols, grad_out, q, kv, out, lse, block, scale, softcap)
        # The gradient of the block just used follows it to the next rank.
        dkv, works = _exchange(dkv, pg)
        with collective(RING, pg):
            for work in works:
                work.wait()
    dmask = dmask.to(mask.dtype) if dmask.numel() else dmask
    dsinks = q.new_empty(0)
    if sinks is not None:
        delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)
        probs = torch.exp(sinks.float() - lse.unsqueeze(-1))
        dsinks = (-probs * delta).sum_to_size(sinks.shape).to(sinks.dtype)
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), dmask, dsinks


def _add_bias_grad(
    acc: torch.Tensor,
    grad_out: torch.Tensor,
    q: torch.Tensor,
    kv: list[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    block: Block,
    scale: float,
    softcap: float,
) -> None:
    """Add the gradient of a whole-block mask ``block``'s bias to ``acc`` (fp32, the mask's
    shape), in place: the scores' gradient ``P * (dO @ V^T - rowsum(dO * O))`` (the bias is
    added after scaling and soft-capping) from the global ``out`` and ``lse``, summed over
    the dimensions the mask broadcasts; ``MATH_ROWS`` query rows at a time."""
    k, v = (repeat_heads(t, q.shape[-3]) for t in kv)
    for first in range(0, q.shape[-2], MATH_ROWS):
        rows = slice(first, first + MATH_ROWS)
        qr = q[..., rows, :]
        scores, _ = _math_scores(qr, k, block.bias, block.diagonal, first, scale, softcap)
        probs = torch.exp(scores - lse[..., rows].unsqueeze(-1)).nan_to_num(0.0)
        dout = grad_out[..., rows, :].float()
        delta = (dout * out[..., rows, :].float()).sum(-1, keepdim=True)
        grad = probs * (dout @ v.float().transpose(-1, -2) - delta)
        target = acc if acc.shape[-2] == 1 else acc[..., rows, :]
        target += grad.sum_to_size(target.shape)


@ring_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, mask, documents, valid, sinks, *options, mask_grad=False):  # noqa: ANN001, ANN002, ANN202
    dmask = mask.new_empty(mask.shape) if mask_grad and mask is not None else q.new_empty(0)
    dsinks = q.new_empty(0) if sinks is None else sinks.new_empty(sinks.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask, dsinks


def _setup(ctx, inputs, output) -> None:  # noqa: ANN001
    q, k, v, mask, documents, valid, sinks, *ctx.options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, documents, valid, sinks)


def _backward(ctx, grad_out: torch.Tensor, grad_lse: torch.Tensor):  # noqa: ANN001, ANN202
    q, k, v, out, lse, *masks = ctx.saved_tensors
    mask_grad = ctx.needs_input_grad[3]
    dq, dk, dv, dmask, dsinks = ring_attention_bwd(
        grad_out, q, k, v, out, lse, *masks, *ctx.options, mask_grad=mask_grad
    )
    dsinks = dsinks if ctx.needs_input_grad[6] else None
    return (
        dq,
        dk,
        dv,
        dmask if mask_grad else None,
        None,
        None,
        dsinks,
        *(None for _ in ctx.options),
    )


ring_attention_fwd.register_autograd(_backward, setup_context=_setup)


def ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    is_causal: bool,
    scale: float | None,
    *,
    seq_len: int,
    group: str,
    mask: torch.Tensor | None = None,
    softcap: float = 0.0,
    window: int = 0,
    documents: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    use_kernel: bool = True,
    balance: bool = True,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on sequence-sharded ``[..., H, L, D]`` inputs, by
    passing key/value blocks around the ring (Note [Ring attention]). ``mask`` is the whole
    ``[..., S, S]`` mask (heads already this rank's), or None; ``window``, ``documents`` and
    ``valid`` a structured mask (Note [Structured masks]); ``sinks`` one logit per head
    (``[..., H, 1, 1]``) joined to every softmax row (Note [Sinks in the ring]). Causal
    attention without a mask on even blocks is load-balanced unless ``balance`` is False
    (Note [Load balancing])."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    rows, seq_dim = query.shape[-2], query.dim() - 2
    if mask is not None:
        pg = _group(group)
        rank, world = dist.get_rank(pg), dist.get_world_size(pg)
        if mask.dim() < query.dim():  # the kernels take 4-D masks; SDPA broadcasts any
            mask = mask.view((1,) * (query.dim() - mask.dim()) + tuple(mask.shape))
        mask = runtime.mask_rows(mask, seq_len, rank * rows, rows, world * rows)
    structured = structure_of(window, documents, valid) is not None
    zigzag = balance and is_causal and mask is None and not structured and rows % 2 == 0
    if zigzag:
        query, key, value = (permute_chunks(t, seq_dim, group, True) for t in (query, key, value))
    out, _ = ring_attention_fwd(
        query,
        key,
        value,
        mask,
        documents,
        valid,
        sinks,
        is_causal,
        window,
        scale,
        softcap,
        seq_len,
        group,
        use_kernel,
        zigzag,
    )
    return permute_chunks(out, seq_dim, group, False) if zigzag else out
