"""One block of attention, the unit that ring and blockwise attention compute.

A block is query rows against key/value rows with an additive bias. Its forward returns an
fp32 output and log-sum-exp per row, merged exactly with other blocks' (``merge``); its
backward takes the *global* output and log-sum-exp of those rows, so blocks never need each
other (https://arxiv.org/abs/2112.05682, section 3).

Note [Block kernels]
--------------------
A block runs on a fused kernel that returns the log-sum-exp, chosen by ``choose_kernel``:

- ``"cpu_flash"``: ``aten._scaled_dot_product_flash_attention_for_cpu`` (any dtype, bias);
- ``"flash"``: ``aten._scaled_dot_product_flash_attention`` on CUDA (fp16/bf16, no bias,
  head dim a multiple of 8 up to 256);
- ``"efficient"``: ``aten._scaled_dot_product_efficient_attention`` on CUDA (a bias, fp32,
  other head dims). Its log-sum-exp has rows padded to a multiple of 32 and its bias must be
  ``[B, H, Lq, Lk]`` in the query dtype with rows aligned to 16 elements (``_kernel_bias``);
- ``"math"``: plain fp32 math, for soft-capped scores (Gemma-2), other devices, or when asked
  (``use_kernel=False``); it takes at most ``MATH_ROWS`` query rows at a time, so no
  ``[B, H, L, L]`` fp32 scores are ever built.

The kernels' backward ops take the global output (in the query dtype) and log-sum-exp; with no
dropout their random-number state is never read. A row that sees no key of the block gets
output 0 and log-sum-exp ``-inf`` whatever the kernel reports. Nothing here reads a tensor on
the host: which blocks run is decided from positions alone (no synchronisation per block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

aten = torch.ops.aten

MATH_ROWS = 1024
"""Query rows per step of the fp32 math path."""

LSE_ALIGN = 32
"""The efficient kernel pads its log-sum-exp rows to a multiple of this."""

BIAS_ALIGN = 16
"""The efficient kernel wants bias rows whose stride is a multiple of this."""


@dataclass(frozen=True, slots=True)
class Block:
    """One step's work: query rows ``q`` attend to rows ``kv`` of the block held, with an
    additive fp32 ``bias`` (or None), ``diagonal`` marking a causal mask between equal
    positions (query row ``i`` sees key rows ``<= i`` of the block)."""

    q: slice
    kv: slice
    diagonal: bool
    bias: torch.Tensor | None = None


ALL = slice(None)


def repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.repeat_interleave(heads // t.shape[-3], dim=-3) if t.shape[-3] != heads else t


def choose_kernel(
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    has_bias: bool,
    softcap: float,
    use_kernel: bool,
) -> str:
    """The kernel that computes a block of queries on ``device`` (Note [Block kernels])."""
    if not use_kernel or softcap:
        return "math"
    if device.type == "cpu":
        return "cpu_flash"
    if device.type != "cuda":
        return "math"
    half = dtype in (torch.float16, torch.bfloat16)
    if not has_bias and half and head_dim % 8 == 0 and head_dim <= 256:
        return "flash"
    return "efficient"


def _kernel_for(q: torch.Tensor, block: Block, softcap: float, use_kernel: bool) -> str:
    return choose_kernel(
        q.device, q.dtype, q.shape[-1], block.bias is not None, softcap, use_kernel
    )


def _kernel_bias(bias: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``bias`` as the efficient kernel takes it: query dtype, ``[B, H, Lq, Lk]`` (broadcast
    dimensions expanded, not copied), rows padded to ``BIAS_ALIGN`` elements."""
    cols = bias.shape[-1]
    padded = F.pad(bias.to(q.dtype), (0, -cols % BIAS_ALIGN))[..., :cols]
    return padded.expand(*q.shape[:-1], k.shape[-2])


def _no_rng(q: torch.Tensor) -> torch.Tensor:
    """Random-number state for a backward op without dropout (never read)."""
    return torch.empty((), dtype=torch.int64, device=q.device)


def _hide_empty_rows(
    out: torch.Tensor, lse: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output 0 and log-sum-exp ``-inf`` for rows that ``bias`` hides entirely (kernels
    report 0 or NaN there)."""
    if bias is None:
        return out, lse
    empty = torch.isneginf(bias).all(-1)
    return out.masked_fill(empty.unsqueeze(-1), 0.0), lse.masked_fill(empty, float("-inf"))


def _kernel_forward(
    kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: Block, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused kernel's output (fp32) and log-sum-exp (fp32, ``[..., Lq]``)."""
    if kernel == "cpu_flash":
        mask = None if block.bias is None else block.bias.to(q.dtype)
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, block.diagonal, attn_mask=mask, scale=scale
        )
    elif kernel == "flash":
        out, lse, *_ = aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, block.diagonal, False, scale=scale
        )
    elif kernel == "efficient":
        bias = None if block.bias is None else _kernel_bias(block.bias, q, k)
        out, lse, *_ = aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, block.diagonal, scale=scale
        )
        lse = lse[..., : q.shape[-2]]
    else:
        raise ValueError(f"autosp: unknown attention kernel {kernel!r}")
    return _hide_empty_rows(out.float(), lse.float(), block.bias)


def _kernel_backward(
    kernel: str,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    block: Block,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused kernel's gradients of one block from the global ``out`` and ``lse``."""
    lse = lse.float().contiguous()
    if kernel == "cpu_flash":
        mask = None if block.bias is None else block.bias.to(q.dtype)
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, block.diagonal, attn_mask=mask, scale=scale
        )
    if kernel == "flash":
        rows, cols = q.shape[-2], k.shape[-2]
        return aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, None, None, rows, cols, 0.0, block.diagonal,
            _no_rng(q), _no_rng(q), scale=scale,
        )  # fmt: skip
    if kernel == "efficient":
        bias = None if block.bias is None else _kernel_bias(block.bias, q, k)
        lse = F.pad(lse, (0, -q.shape[-2] % LSE_ALIGN), value=float("inf"))
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, bias, out, lse, _no_rng(q), _no_rng(q), 0.0,
            [True, True, True, False], block.diagonal, scale=scale,
        )  # fmt: skip
        return dq, dk, dv
    raise ValueError(f"autosp: unknown attention kernel {kernel!r}")


def _math_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    bias: torch.Tensor | None,
    diagonal: bool,
    first: int,
    scale: float,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 masked scores of query rows ``first..`` (``q``) of a block and, with a soft-cap,
    ``tanh`` of the scaled scores (for backward)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    capped = None
    if softcap:
        capped = torch.tanh(scores / softcap)
        scores = capped * softcap
    if bias is not None:
        rows = bias if bias.shape[-2] == 1 else bias[..., first : first + q.shape[-2], :]
        scores = scores + rows
    if diagonal:
        row = first + torch.arange(q.shape[-2], device=q.device).unsqueeze(-1)
        future = torch.arange(k.shape[-2], device=q.device) > row
        scores = scores.masked_fill(future, float("-inf"))
    return scores, capped


def _row_chunks(rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + MATH_ROWS, rows)) for a in range(0, rows, MATH_ROWS)]


def _math_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: Block, scale: float, softcap: float
) -> tuple[torch.Tensor, torch.Tensor]:
    outs, lses = [], []
    for a, b in _row_chunks(q.shape[-2]):
        scores, _ = _math_scores(q[..., a:b, :], k, block.bias, block.diagonal, a, scale, softcap)
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)
        outs.append(probs @ v.float())
        lses.append(lse)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def _math_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    block: Block,
    scale: float,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kf, vf = k.float(), v.float()
    dqs, dk, dv = [], torch.zeros_like(kf), torch.zeros_like(vf)
    for a, b in _row_chunks(q.shape[-2]):
        rows = slice(a, b)
        qf, doutf = q[..., rows, :].float(), dout[..., rows, :].float()
        scores, capped = _math_scores(qf, k, block.bias, block.diagonal, a, scale, softcap)
        probs = torch.exp(scores - lse[..., rows].unsqueeze(-1)).nan_to_num(0.0)
        delta = (doutf * out[..., rows, :].float()).sum(-1, keepdim=True)
        dscores = probs * (doutf @ vf.transpose(-1, -2) - delta) * scale
        if capped is not None:
            dscores = dscores * (1 - capped.square())
        dqs.append(dscores @ kf)
        dk = dk + dscores.transpose(-1, -2) @ qf
        dv = dv + probs.transpose(-1, -2) @ doutf
    return torch.cat(dqs, dim=-2), dk, dv


def block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block: Block,
    scale: float,
    softcap: float,
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one block: fp32 output and log-sum-exp per query row (``-inf`` for a row
    that sees no key of the block), on ``kernel`` (Note [Block kernels])."""
    if kernel == "math":
        return _math_forward(q, k, v, block, scale, softcap)
    return _kernel_forward(kernel, q, k, v, block, scale)


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
    kernel: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the *global* output and log-sum-exp (fp32 results)."""
    if kernel == "math":
        return _math_backward(dout, q, k, v, out, lse, block, scale, softcap)
    grads = _kernel_backward(kernel, dout, q, k, v, out, lse, block, scale)
    return grads[0].float(), grads[1].float(), grads[2].float()


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
    kernel = _kernel_for(q, block, softcap, use_kernel)
    result = block_forward(q[..., block.q, :], k, v, block, scale, softcap, kernel)
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
        _kernel_for(q, block, softcap, use_kernel),
    )
    dq[..., rows, :] += grads[0]
    group_size = heads // kv[0].shape[-3]
    for acc, grad in zip(dkv, grads[1:], strict=True):
        acc[..., block.kv, :] += grad.unflatten(-3, (-1, group_size)).sum(-3)
