"""Attention that ``scaled_dot_product_attention`` cannot express, written in plain torch.

``softcapped_attention`` is SDPA plus tanh soft-capping of the scores (Gemma-2):
``scores = softcap * tanh(q @ k^T * scale / softcap)``, and attention sinks (a logit per head
joined to each row's softmax). Recognised written-out attention with a
soft-cap becomes a call to it (``eager_attention.py``); it is exact whether the strategies run it
on head shards or, as a fallback, on the whole sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def softcapped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    softcap: float = 0.0,
    dropout: Callable[[torch.Tensor, float], torch.Tensor] = F.dropout,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` semantics with soft-capped scores (fp32 softmax);
    ``dropout(probs, dropout_p)`` drops attention probabilities. ``sinks`` (broadcast to
    ``[..., heads, 1, 1]``): a learned logit per head that joins every row's softmax and whose
    probability is dropped (attention sinks)."""
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = (t.repeat_interleave(repeat, dim=-3) for t in (key, value))
    scores = (query @ key.transpose(-2, -1)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        rows, cols = scores.shape[-2:]
        future = torch.ones(rows, cols, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    if sinks is not None:
        scores = torch.cat([scores, sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)], -1)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    if dropout_p:
        probs = dropout(probs, dropout_p)
    return probs @ value
