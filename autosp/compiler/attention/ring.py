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
block. Each block runs on the CPU flash-attention kernel, which returns the log-sum-exp and
whose backward takes the global output and log-sum-exp, or on plain fp32 math elsewhere. The
backward recomputes each block from the saved global ``lse``; the key/value gradients travel
around the ring with their block and arrive back at its owner after ``P`` hops.

Padding rows sit at the end of the sequence: causal attention never shows them to a real query;
non-causal attention masks keys at positions ``>= seq_len``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from autosp.comm.ops import _counts, _group


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


def _padding_bias(
    rows: int, k_block: int, seq_len: int, device: torch.device
) -> torch.Tensor | None:
    """Additive fp32 bias ``[1, rows]`` (broadcast over queries) hiding the padding keys of
    block ``k_block``; None if it has none."""
    key_pos = k_block * rows + torch.arange(rows, device=device)
    if int(key_pos[-1]) < seq_len:
        return None
    return torch.zeros(1, rows, device=device).masked_fill(key_pos >= seq_len, float("-inf"))


def _skip(q_block: int, k_block: int, causal: bool, rows: int, seq_len: int) -> bool:
    """Blocks nobody needs: the future (causal) and blocks made only of padding keys."""
    return (causal and k_block > q_block) or k_block * rows >= seq_len


def _block_bias(
    q_block: int, k_block: int, causal: bool, rows: int, seq_len: int, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """The padding bias and whether this is the causal diagonal block.

    Causal attention needs no padding bias: padding keys come after every real query.
    """
    if causal:
        return None, q_block == k_block
    return _padding_bias(rows, k_block, seq_len, device), False


def _ring_steps(
    kv: list[torch.Tensor], pg: dist.ProcessGroup, is_causal: bool, seq_len: int
) -> Iterator[tuple[bool, torch.Tensor | None, bool, list[torch.Tensor]]]:
    """Rotate the key/value block ``kv`` around the ring; at each of the ``P`` steps yield
    (whether this rank attends to the block it holds, its padding bias, whether it is the
    causal diagonal, the block). The next block's send/recv runs while the caller computes."""
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    rows = kv[0].shape[-2]
    for step in range(world):
        src = (rank - step) % world
        pending = _exchange(kv, pg) if step < world - 1 else None
        if _skip(rank, src, is_causal, rows, seq_len):
            yield False, None, False, kv
        else:
            yield True, *_block_bias(rank, src, is_causal, rows, seq_len, kv[0].device), kv
        if pending is not None:
            received, works = pending
            for work in works:
                work.wait()
            kv = received


def _repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.repeat_interleave(heads // t.shape[-3], dim=-3) if t.shape[-3] != heads else t


def _block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    diagonal: bool,
    scale: float,
    use_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one block: fp32 output and log-sum-exp per query row.

    With ``use_kernel`` the CPU flash-attention kernel runs it (``diagonal`` marks the causal
    block, whose future keys it hides itself); otherwise plain fp32 math.
    """
    if use_kernel:
        mask = None if bias is None else bias.to(q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, diagonal, attn_mask=mask, scale=scale
        )
        return out.float(), lse.float()
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    if diagonal:
        scores = scores.masked_fill(_future(scores.shape[-2], q.device), float("-inf"))
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
    bias: torch.Tensor | None,
    diagonal: bool,
    scale: float,
    use_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the *global* output and log-sum-exp (fp32 results)."""
    if use_kernel:
        mask = None if bias is None else bias.to(q.dtype)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, diagonal, attn_mask=mask, scale=scale
        )
        return dq.float(), dk.float(), dv.float()
    qf, kf, vf, doutf = q.float(), k.float(), v.float(), dout.float()
    scores = (qf @ kf.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    if diagonal:
        scores = scores.masked_fill(_future(scores.shape[-2], q.device), float("-inf"))
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
    delta = (doutf * out.float()).sum(-1, keepdim=True)
    dscores = probs * (doutf @ vf.transpose(-1, -2) - delta) * scale
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
    is_causal: bool,
    scale: float,
    seq_len: int,
    group: str,
    use_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring attention forward on ``[..., H, L, D]`` blocks: output and fp32 log-sum-exp."""
    heads = q.shape[-3]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    for needed, bias, diagonal, kv in _ring_steps([k, v], _group(group), is_causal, seq_len):
        if needed:
            kh, vh = (_repeat_heads(t, heads) for t in kv)
            block = _block_forward(q, kh, vh, bias, diagonal, scale, use_kernel)
            out, lse = _merge(out, lse, *block)
    return out.to(q.dtype), lse


@ring_attention_fwd.register_fake
def _(q, k, v, is_causal, scale, seq_len, group, use_kernel):  # noqa: ANN001, ANN202
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("autosp::ring_attention_backward", mutates_args=())
def ring_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    is_causal: bool,
    scale: float,
    seq_len: int,
    group: str,
    use_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ring attention; key/value gradients return to their owner."""
    pg = _group(group)
    heads = q.shape[-3]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (k, v)]
    for needed, bias, diagonal, kv in _ring_steps([k, v], pg, is_causal, seq_len):
        if needed:
            kh, vh = (_repeat_heads(t, heads) for t in kv)
            grads = _block_backward(
                grad_out, q, kh, vh, out, lse, bias, diagonal, scale, use_kernel
            )
            dq += grads[0]
            group_size = heads // kv[0].shape[-3]
            dk, dv = (g.unflatten(-3, (-1, group_size)).sum(-3) for g in grads[1:])
            dkv = [dkv[0] + dk, dkv[1] + dv]
        # The gradient of the block just used follows it to the next rank.
        dkv, works = _exchange(dkv, pg)
        for work in works:
            work.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


@ring_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, is_causal, scale, seq_len, group, use_kernel):  # noqa: ANN001, ANN202
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output) -> None:  # noqa: ANN001
    q, k, v, ctx.is_causal, ctx.scale, ctx.seq_len, ctx.group, ctx.use_kernel = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)


def _backward(ctx, grad_out: torch.Tensor, grad_lse: torch.Tensor):  # noqa: ANN001, ANN202
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = ring_attention_bwd(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        ctx.is_causal,
        ctx.scale,
        ctx.seq_len,
        ctx.group,
        ctx.use_kernel,
    )
    return dq, dk, dv, None, None, None, None, None


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
    use_kernel: bool | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on sequence-sharded ``[..., H, L, D]`` inputs, by
    passing key/value blocks around the ring (Note [Ring attention])."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    use_kernel = query.device.type == "cpu" if use_kernel is None else use_kernel
    out, _ = ring_attention_fwd(query, key, value, is_causal, scale, seq_len, group, use_kernel)
    return out
