"""Hybrid attention: Ulysses inside groups of ``u`` ranks, ring attention across the groups.

Note [Hybrid]
-------------
With ``P = u * R`` ranks and query heads divisible by ``u`` but not by ``P`` (6 heads at
``P = 4``: ``u = 2``, ``R = 2``), ranks ``g*u .. g*u + u - 1`` form Ulysses group ``g``; their
``u`` contiguous blocks form super-block ``g``. An all-to-all inside the group gives each rank
all ``u*L`` rows of super-block ``g`` for ``H/u`` heads; ranks holding the same heads (same
position ``j`` in their Ulysses group) form ring ``j`` and run ring attention over the
``R`` super-blocks; an all-to-all brings the output back::

    P = 4, u = 2     Ulysses groups {0, 1} {2, 3}      rings {0, 2} {1, 3}
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from autosp.comm import ops
from autosp.comm.ops import _group
from autosp.compiler.attention.ring import ring_attention


def hybrid_groups(group: dist.ProcessGroup, ulysses_size: int) -> tuple[str, str]:
    """Create this rank's Ulysses group and ring of size ``ulysses_size`` inside ``group``;
    return their names. Members synchronise among themselves only."""
    ranks = dist.get_process_group_ranks(group)
    position = ranks.index(dist.get_rank())
    start = position - position % ulysses_size
    ulysses = ranks[start : start + ulysses_size]
    ring = ranks[position % ulysses_size :: ulysses_size]
    return tuple(  # type: ignore[return-value]
        dist.new_group(members, use_local_synchronization=True).group_name
        for members in (ulysses, ring)
    )


def hybrid_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    is_causal: bool,
    scale: float | None,
    *,
    seq_len: int,
    ulysses_group: str,
    ring_group: str,
    mask: torch.Tensor | None = None,
    softcap: float = 0.0,
    kv_repeat: int = 1,
    balance: bool = True,
    window: int = 0,
    documents: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention on sequence-sharded ``[..., H, L, D]`` inputs (Note [Hybrid]); ``mask`` is
    the whole ``[..., S, S]`` mask, or None; ``window``, ``documents``, ``valid`` a structured
    mask (Note [Structured masks]); ``sinks`` one logit per head (``[..., H, 1, 1]``)."""
    head_dim, seq_dim = query.dim() - 3, query.dim() - 2
    if kv_repeat > 1:
        key, value = (t.repeat_interleave(kv_repeat, dim=head_dim) for t in (key, value))
    q, k, v = (ops.all_to_all(t, head_dim, seq_dim, ulysses_group) for t in (query, key, value))
    heads, position = q.shape[head_dim], dist.get_rank(_group(ulysses_group))
    if mask is not None and mask.dim() >= 3 and mask.shape[-3] > 1:
        mask = mask.narrow(-3, position * heads, heads)
    if sinks is not None and sinks.shape[-3] > 1:
        sinks = sinks.narrow(-3, position * heads, heads)
    out = ring_attention(
        q,
        k,
        v,
        is_causal,
        scale,
        seq_len=seq_len,
        group=ring_group,
        mask=mask,
        softcap=softcap,
        balance=balance,
        window=window,
        documents=documents,
        valid=valid,
        sinks=sinks,
    )
    return ops.all_to_all(out, seq_dim, head_dim, ulysses_group)
