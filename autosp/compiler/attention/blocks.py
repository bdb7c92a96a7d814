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
