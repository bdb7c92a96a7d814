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
rank's query rows of it; each step takes the columns of the block held, and skips a block
the mask hides entirely. Each block runs on the CPU flash-attention kernel, which returns the
log-sum-exp and whose backward takes the global output and log-sum-exp, or on plain fp32 math
elsewhere and for soft-capped scores (Gemma-2). The backward recomputes each block from the
saved global ``lse``; the key/value gradients travel around the ring with their block and
arrive back at its owner after ``P`` hops.

Padding rows sit at the end of the sequence: causal attention never shows them to a real query;
otherwise keys at positions ``>= seq_len`` are masked, and padding queries see every key (so no
softmax row is empty).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from autosp.comm.ops import _counts, _group
from autosp.compiler import runtime
from autosp.compiler.attention.load_balance import permute_chunks


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
    return received, dist.batch_isend_irecv(ops)


@dataclass(frozen=True, slots=True)
class Block:
    """One step's work: query rows ``q`` attend to rows ``kv`` of the block held, with an
    additive fp32 ``bias`` (or None), ``diagonal`` marking a causal mask between equal
    positions."""

    q: slice
    kv: slice
    diagonal: bool
    bias: torch.Tensor | None = None


ALL = slice(None)


def _padding_bias(
    rows: int, k_block: int, seq_len: int, device: torch.device
) -> torch.Tensor | None:
    """Additive fp32 bias ``[1, rows]`` (broadcast over queries) hiding the padding keys of
    block ``k_block``; None if it has none."""
    key_pos = k_block * rows + torch.arange(rows, device=device)
    if int(key_pos[-1]) < seq_len:
        return None
    return torch.zeros(1, rows, device=device).masked_fill(key_pos >= seq_len, float("-inf"))


def _mask_bias(mask: torch.Tensor) -> torch.Tensor | None:
    """A boolean (True = attend) or additive mask block as an fp32 bias; None if it hides
    every key from every query (the block is skipped)."""
    if mask.dtype == torch.bool:
        if not bool(mask.any()):
            return None
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))
    bias = mask.float()
    return None if bool(torch.isneginf(bias).all()) else bias


def _contiguous_block(
    rank: int,
    src: int,
    causal: bool,
    rows: int,
    seq_len: int,
    mask: torch.Tensor | None,
    device: torch.device,
) -> Block | None:
    """Contiguous layout: skip the future (causal) and blocks made only of padding keys; mask
    the diagonal (causal), or apply the mask's columns of block ``src`` (which hide padding
    keys), or hide padding keys (causal attention needs no padding bias: padding keys come after
    every real query)."""
    if (causal and src > rank) or src * rows >= seq_len:
        return None
    if mask is not None:
        bias = _mask_bias(mask[..., src * rows : (src + 1) * rows])
        return None if bias is None else Block(ALL, ALL, causal and src == rank, bias)
    if causal:
        return Block(ALL, ALL, src == rank)
    return Block(ALL, ALL, False, _padding_bias(rows, src, seq_len, device))


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
) -> Iterator[tuple[Block | None, list[torch.Tensor]]]:
    """Rotate the key/value block ``kv`` around the ring; at each of the ``P`` steps yield
    the work this rank does on the block it holds (None: nothing) and the block. The next
    block's send/recv runs while the caller computes."""
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    rows = kv[0].shape[-2]
    for step in range(world):
        src = (rank - step) % world
        pending = _exchange(kv, pg) if step < world - 1 else None
        if zigzag:
            yield _zigzag_block(rank, src, rows), kv
        else:
            yield _contiguous_block(rank, src, is_causal, rows, seq_len, mask, kv[0].device), kv
        if pending is not None:
            received, works = pending
            for work in works:
                work.wait()
            kv = received


def _repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.repeat_interleave(heads // t.shape[-3], dim=-3) if t.shape[-3] != heads else t


def _scores(
    q: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None,
    diagonal: bool,
    scale: float,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 masked scores and, with a soft-cap, ``tanh`` of the scaled scores (for backward)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    capped = None
    if softcap:
        capped = torch.tanh(scores / softcap)
        scores = capped * softcap
    if bias is not None:
        scores = scores + bias
    if diagonal:
        scores = scores.masked_fill(_future(scores.shape[-2], q.device), float("-inf"))
    return scores, capped


def _block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block: Block,
    scale: float,
    softcap: float,
    use_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one block: fp32 output and log-sum-exp per query row (``-inf`` for a row
    that sees no key of the block).

    With ``use_kernel`` (and no soft-cap) the CPU flash-attention kernel runs it (``diagonal``
    marks the causal block, whose future keys it hides itself); otherwise plain fp32 math.
    """
    if use_kernel and not softcap:
        mask = None if block.bias is None else block.bias.to(q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, block.diagonal, attn_mask=mask, scale=scale
        )
        lse = lse.float()
        if block.bias is not None:  # the kernel reports 0, not -inf, for a row that sees nothing
            lse = lse.masked_fill(torch.isneginf(block.bias).all(-1), float("-inf"))
        return out.float(), lse
    scores, _ = _scores(q, k, block.bias, block.diagonal, scale, softcap)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
    return probs @ v.float(), lse


def _block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    block: Block,
    scale: float,
    softcap: float,
    use_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the *global* output and log-sum-exp (fp32 results)."""
    if use_kernel and not softcap:
        mask = None if block.bias is None else block.bias.to(q.dtype)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, block.diagonal, attn_mask=mask, scale=scale
        )
        return dq.float(), dk.float(), dv.float()
    qf, kf, vf, doutf = q.float(), k.float(), v.float(), dout.float()
    scores, capped = _scores(q, k, block.bias, block.diagonal, scale, softcap)
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
    delta = (doutf * out.float()).sum(-1, keepdim=True)
    dscores = probs * (doutf @ vf.transpose(-1, -2) - delta) * scale
    if capped is not None:
        dscores = dscores * (1 - capped.square())
    return dscores @ kf, dscores.transpose(-1, -2) @ qf, probs.transpose(-1, -2) @ doutf


def _future(rows: int, device: torch.device) -> torch.Tensor:
    return torch.ones(rows, rows, dtype=torch.bool, device=device).triu(1)


def _merge(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    new_lse = torch.logaddexp(lse, block_lse)
    keep = torch.exp(lse - new_lse).nan_to_num(0.0).unsqueeze(-1)
    take = torch.exp(block_lse - new_lse).nan_to_num(0.0).unsqueeze(-1)
    return keep * out + take * block_out, new_lse


@torch.library.custom_op("autosp::ring_attention", mutates_args=())
def ring_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    softcap: float,
    seq_len: int,
    group: str,
    use_kernel: bool,
    zigzag: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention forward on ``[..., H, L, D]`` blocks: output and fp32 log-sum-exp.
    ``mask``: this rank's query rows of the padded mask, ``[..., L, P*L]``, or None."""
    heads = q.shape[-3]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    for block, kv in _ring_steps([k, v], _group(group), is_causal, seq_len, zigzag, mask):
        if block is None:
            continue
        kh, vh = (_repeat_heads(t[..., block.kv, :], heads) for t in kv)
        result = _block_forward(q[..., block.q, :], kh, vh, block, scale, softcap, use_kernel)
        out[..., block.q, :], lse[..., block.q] = _merge(
            out[..., block.q, :], lse[..., block.q], *result
        )
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
    is_causal: bool,
    scale: float,
    softcap: float,
    seq_len: int,
    group: str,
    use_kernel: bool,
    zigzag: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ring attention; key/value gradients return to their owner."""
    pg = _group(group)
    heads = q.shape[-3]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (k, v)]
    for block, kv in _ring_steps([k, v], pg, is_causal, seq_len, zigzag, mask):
        if block is not None:
            kh, vh = (_repeat_heads(t[..., block.kv, :], heads) for t in kv)
            rows = block.q
            grads = _block_backward(
                grad_out[..., rows, :],
                q[..., rows, :],
                kh,
                vh,
                out[..., rows, :],
                lse[..., rows],
                block,
                scale,
                softcap,
                use_kernel,
            )
            dq[..., rows, :] += grads[0]
            group_size = heads // kv[0].shape[-3]
            for acc, grad in zip(dkv, grads[1:], strict=True):
                acc[..., block.kv, :] += grad.unflatten(-3, (-1, group_size)).sum(-3)
        # The gradient of the block just used follows it to the next rank.
        dkv, works = _exchange(dkv, pg)
        for work in works:
            work.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


@ring_attention_bwd.register_fake
def _(grad_out, q, k, v, *options):  # noqa: ANN001, ANN002, ANN202
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output) -> None:  # noqa: ANN001
    q, k, v, mask, *ctx.options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask)


def _backward(ctx, grad_out: torch.Tensor, grad_lse: torch.Tensor):  # noqa: ANN001, ANN202
    q, k, v, out, lse, mask = ctx.saved_tensors
    dq, dk, dv = ring_attention_bwd(grad_out, q, k, v, out, lse, mask, *ctx.options)
    return dq, dk, dv, None, *(None for _ in ctx.options)


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
    use_kernel: bool | None = None,
    balance: bool = True,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on sequence-sharded ``[..., H, L, D]`` inputs, by
    passing key/value blocks around the ring (Note [Ring attention]). ``mask`` is the whole
    ``[..., S, S]`` mask (heads already this rank's), or None. Causal attention without a mask
    on even blocks is load-balanced unless ``balance`` is False (Note [Load balancing])."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    use_kernel = query.device.type == "cpu" if use_kernel is None else use_kernel
    rows, seq_dim = query.shape[-2], query.dim() - 2
    if mask is not None:
        pg = _group(group)
        rank, world = dist.get_rank(pg), dist.get_world_size(pg)
        mask = runtime.mask_rows(mask, seq_len, rank * rows, rows, world * rows)
    zigzag = balance and is_causal and mask is None and rows % 2 == 0
    if zigzag:
        query, key, value = (permute_chunks(t, seq_dim, group, True) for t in (query, key, value))
    out, _ = ring_attention_fwd(
        query, key, value, mask, is_causal, scale, softcap, seq_len, group, use_kernel, zigzag
    )
    return permute_chunks(out, seq_dim, group, False) if zigzag else out
