"""Local attention: the keys and values are not the sequence, so every rank keeps them whole.

Cross-attention to learned latents or to an encoder's states has sequence-long queries but
keys/values of another length. Each rank attends its own query rows to all keys: exact, with
no communication. The mask's query rows are this rank's; padding query rows see every key.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from autosp.compiler.attention.reference import softcapped_attention
from autosp.compiler.random_ops import rank_dropout


def local_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    scale: float | None,
    enable_gqa: bool,
    *,
    rank: int,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Non-causal ``F.scaled_dot_product_attention`` of this rank's query rows against whole
    keys and values; ``attn_mask`` holds this rank's query rows (or one row for all). Dropout
    draws this rank's own mask (Note [Random ops])."""
    if softcap or dropout_p:
        dropout = functools.partial(rank_dropout, rank=rank)
        kernel = functools.partial(softcapped_attention, softcap=softcap, dropout=dropout)
    else:
        kernel = F.scaled_dot_product_attention
    return kernel(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        scale=scale,
        enable_gqa=enable_gqa,
    )
