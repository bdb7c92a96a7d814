"""Blockwise attention over the whole sequence with a structured mask, for Ulysses.

Note [Blockwise attention]
--------------------------
After Ulysses' all-to-all a rank holds the whole (padded) sequence for its heads. With a
structured mask (Note [Structured masks]) it computes attention in ``CHUNK x CHUNK`` blocks:
each block's mask is built from positions, document ids and key validity, blocks the mask hides
are skipped (the future, outside a window, other documents), and the blocks of a query chunk
merge through their log-sum-exp (``blocks.py``). Memory is ``O(CHUNK^2)`` per head instead of
``O(S^2)``; the backward recomputes each block from the global log-sum-exp.
"""

from __future__ import annotations

import torch

from autosp.compiler.attention.blocks import accumulate_backward, accumulate_forward
from autosp.compiler.attention.mask_spec import CHUNK, structured_blocks


@torch.library.custom_op("autosp::blockwise_attention", mutates_args=())
def blockwise_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    documents: torch.Tensor | None,
    valid: torch.Tensor | None,
    is_causal: bool,
    window: int,
    scale: float,
    softcap: float,
    seq_len: int,
    chunk: int,
    use_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``[..., H, S, D]`` inputs under a structured mask: output and fp32
    log-sum-exp."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    rows = q.shape[-2]
    blocks = structured_blocks(
        0, rows, 0, rows, is_causal, window, seq_len, documents, valid, q.device, chunk
    )
    for block in blocks:
        accumulate_forward(out, lse, q, [k, v], block, scale, softcap, use_kernel)
    return out.to(q.dtype), lse


@blockwise_attention_fwd.register_fake
def _(q, k, v, *options):  # noqa: ANN001, ANN002, ANN202
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("autosp::blockwise_attention_backward", mutates_args=())
def blockwise_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    documents: torch.Tensor | None,
    valid: torch.Tensor | None,
    is_causal: bool,
    window: int,
    scale: float,
    softcap: float,
    seq_len: int,
    chunk: int,
    use_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of blockwise attention, block by block from the global log-sum-exp."""
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (k, v)]
    rows = q.shape[-2]
    blocks = structured_blocks(
        0, rows, 0, rows, is_causal, window, seq_len, documents, valid, q.device, chunk
    )
    for block in blocks:
        accumulate_backward(
            dq, dkv, grad_out, q, [k, v], out, lse, block, scale, softcap, use_kernel
        )
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


@blockwise_attention_bwd.register_fake
def _(grad_out, q, k, v, *options):  # noqa: ANN001, ANN002, ANN202
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output) -> None:  # noqa: ANN001
    q, k, v, documents, valid, *ctx.options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, documents, valid)


def _backward(ctx, grad_out: torch.Tensor, grad_lse: torch.Tensor):  # noqa: ANN001, ANN202
    q, k, v, out, lse, *masks = ctx.saved_tensors
    dq, dk, dv = blockwise_attention_bwd(grad_out, q, k, v, out, lse, *masks, *ctx.options)
    return dq, dk, dv, None, None, *(None for _ in ctx.options)


blockwise_attention_fwd.register_autograd(_backward, setup_context=_setup)


def blockwise_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    is_causal: bool,
    scale: float | None,
    *,
    seq_len: int,
    window: int = 0,
    documents: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    softcap: float = 0.0,
    chunk: int = CHUNK,
    use_kernel: bool = True,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` of whole-sequence ``[..., H, S, D]`` inputs under a
    structured mask (Note [Blockwise attention])."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out, _ = blockwise_attention_fwd(
        query,
        key,
        value,
        documents,
        valid,
        is_causal,
        window,
        scale,
        softcap,
        seq_len,
        chunk,
        use_kernel,
    )
    return out
