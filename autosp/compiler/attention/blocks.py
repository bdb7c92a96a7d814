"""One block of attention, the unit that ring and blockwise attention compute.

A block is query rows against key/value rows with an additive bias. Its forward returns an
fp32 output and log-sum-exp per row, merged exactly with other blocks' (``merge``); its
backward takes the *global* output and log-sum-exp of those rows, so blocks never need each
other (https://arxiv.org/abs/2112.05682, section 3). Blocks run on the CPU flash-attention
kernel, which returns the log-sum-exp, or in plain fp32 math (other devices, soft-capping).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
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


def block_forward(
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


def block_backward(
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


def merge(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    new_lse = torch.logaddexp(lse, block_lse)
    keep = torch.exp(lse - new_lse).nan_to_num(0.0).unsqueeze(-1)
    take = torch.exp(block_lse - new_lse).nan_to_num(0.0).unsqueeze(-1)
    return keep * out + take * block_out, new_lse


def accumulate_forward(
    out: torch.Tensor,
    lse: torch.Tensor,
    q: torch.Tensor,
    kv: list[torch.Tensor],
    block: Block,
    scale: float,
    softcap: float,
    use_kernel: bool,
) -> None:
    """Attend ``block`` of queries ``q`` to key/value rows ``kv`` and merge the result into the
    fp32 ``out`` and ``lse`` of those query rows, in place."""
    k, v = (repeat_heads(t[..., block.kv, :], q.shape[-3]) for t in kv)
    result = block_forward(q[..., block.q, :], k, v, block, scale, softcap, use_kernel)
    out[..., block.q, :], lse[..., block.q] = merge(
        out[..., block.q, :], lse[..., block.q], *result
    )


def accumulate_backward(
    dq: torch.Tensor,
    dkv: list[torch.Tensor],
    grad_out: torch.Tensor,
    q: torch.Tensor,
    kv: list[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    block: Block,
    scale: float,
    softcap: float,
    use_kernel: bool,
) -> None:
    """Add ``block``'s gradients to the fp32 ``dq`` and ``dkv`` (key/value gradients summed
    over the query heads sharing a key/value head), in place."""
    heads, rows = q.shape[-3], block.q
    k, v = (repeat_heads(t[..., block.kv, :], heads) for t in kv)
    grads = block_backward(
        grad_out[..., rows, :],
        q[..., rows, :],
        k,
        v,
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
