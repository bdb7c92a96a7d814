"""Ulysses attention: trade the sequence shard for a head shard around the attention kernel.

Note [Ulysses]
--------------
Each rank holds ``L`` query/key/value rows of all ``H`` heads. One all-to-all per tensor gives
it all ``P*L`` rows of ``H/P`` heads; attention runs unchanged on those heads; one all-to-all
brings the output back to ``L`` rows of all heads::

    q, k, v  [B, H, L, D]  --all_to_all-->  [B, H/P, P*L, D]  --sdpa-->  [B, H/P, P*L, D]
    out      [B, H, L, D]  <--all_to_all--  (4 all-to-alls forward, 4 backward)

Rank ``r`` gets query heads ``[r*H/P, (r+1)*H/P)`` and key/value heads
``[r*Hkv/P, (r+1)*Hkv/P)``, which are exactly the key/value heads those query heads use under
grouped-query attention, so ``enable_gqa`` keeps its meaning. With fewer key/value heads than
ranks (or a count ``P`` does not divide), each is repeated ``lcm(Hkv, P) / Hkv`` times first,
as ALST does: the groups stay aligned and no rank receives a head it does not use.

Padding rows sit at the end of the sequence: causal attention never lets a real query see
them; non-causal attention gets a key mask that hides them.

Attention dropout draws this rank's own masks (Note [Random ops]): the kernels' dropout would
draw the same mask for every rank's heads. It runs in plain math (``softcapped_attention``),
whose probabilities it drops with ``rank_dropout``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from autosp.comm import ops
from autosp.compiler import runtime
from autosp.compiler.attention.blockwise import blockwise_attention
from autosp.compiler.attention.mask_spec import structure_of
from autosp.compiler.attention.reference import softcapped_attention
from autosp.compiler.random_ops import rank_dropout


def _attention_mask(
    mask: torch.Tensor | None,
    seq_len: int,
    padded: int,
    head_start: int,
    heads: int,
    is_causal: bool,
    device: torch.device,
) -> torch.Tensor | None:
    """The whole-sequence mask for this rank's heads, padded to ``padded`` rows and columns
    (``runtime.mask_rows``); without a mask, non-causal attention still hides padding keys."""
    if mask is None and is_causal:
        return None
    if mask is None:
        return (torch.arange(padded, device=device) < seq_len).unsqueeze(0)
    if mask.dim() >= 3 and mask.shape[-3] > 1:
        mask = mask.narrow(-3, head_start, heads)
    return runtime.mask_rows(mask, seq_len, 0, padded, padded)


def ulysses_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    *,
    seq_len: int,
    rank: int,
    world: int,
    group: str,
    kv_repeat: int = 1,
    softcap: float = 0.0,
    sinks: torch.Tensor | None = None,
    window: int = 0,
    documents: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on sequence-sharded ``[..., H, L, D]`` inputs.

    ``kv_repeat`` > 1 repeats each key/value head so that their count divides ``world``
    (fewer key/value heads than ranks); the backward sums the copies' gradients. ``window``,
    ``documents`` and ``valid`` give a structured mask (Note [Structured masks]), computed
    blockwise (Note [Blockwise attention]). ``sinks`` (``[..., H, 1, 1]``, one logit per
    head joined to each softmax row): this rank takes its heads' sinks.
    """
    head_dim, seq_dim = query.dim() - 3, query.dim() - 2
    if kv_repeat > 1:
        key, value = (t.repeat_interleave(kv_repeat, dim=head_dim) for t in (key, value))
    q, k, v = (ops.all_to_all(t, head_dim, seq_dim, group) for t in (query, key, value))
    if structure_of(window, documents, valid) is not None:
        out = blockwise_attention(
            q,
            k,
            v,
            is_causal,
            scale,
            seq_len=seq_len,
            window=window,
            documents=documents,
            valid=valid,
            softcap=softcap,
        )
        return ops.all_to_all(out, seq_dim, head_dim, group)
    heads = q.shape[head_dim]
    padded = q.shape[seq_dim]
    mask = _attention_mask(attn_mask, seq_len, padded, rank * heads, heads, is_causal, q.device)
    kernel = F.scaled_dot_product_attention
    if sinks is not None and sinks.shape[-3] > 1:
        sinks = sinks.narrow(-3, rank * heads, heads)
    if softcap or dropout_p or sinks is not None:
        dropout = functools.partial(rank_dropout, rank=rank)
        kernel = functools.partial(
            softcapped_attention, softcap=softcap, dropout=dropout, sinks=sinks
        )
    out = kernel(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )
    return ops.all_to_all(out, seq_dim, head_dim, group)
