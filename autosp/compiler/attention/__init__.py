"""Attention strategies: how an attention call runs on sequence-sharded inputs."""

from __future__ import annotations

from typing import Any

from torch.fx import Node

from autosp.compiler.attention.ulysses import ulysses_attention
from autosp.compiler.placement import Replicate, Shard
from autosp.compiler.propagate import ShardingPass, meta
from autosp.compiler.seqdims import hint
from autosp.errors import AutoSPError


def sdpa_signature(
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> None:
    """The signature of ``F.scaled_dot_product_attention`` (a builtin without one)."""


def shard_attention(sp: ShardingPass, node: Node) -> None:
    """Replace ``scaled_dot_product_attention`` by Ulysses attention on sharded q, k, v."""
    from autosp.compiler.rules import bind

    args = bind(sdpa_signature, node).arguments
    query, key, value = args["query"], args["key"], args["value"]
    world = sp.group.world
    q_meta, k_meta = meta(query), meta(key)
    if q_meta.dim() < 3:
        raise AutoSPError(
            f"autosp: attention {node.name} has no head dimension (query shape "
            f"{tuple(q_meta.shape)}); Ulysses attention splits heads across the "
            f"{world} ranks. Reshape the query to [batch, heads, seq, head_dim]."
        )
    heads, kv_heads = hint(q_meta.shape[-3]), hint(k_meta.shape[-3])
    if heads % world or kv_heads % world:
        raise AutoSPError(
            f"autosp: attention {node.name} has {heads} query heads and {kv_heads} key/value "
            f"heads; Ulysses attention needs both divisible by the sequence-parallel degree "
            f"{world}. Use a degree that divides {heads} and {kv_heads} "
            "(ring and hybrid attention for other degrees are not implemented yet)."
        )
    seq_dim = q_meta.dim() - 2
    q, k, v = (sp.shard(t, Shard(seq_dim)) for t in (query, key, value))
    mask, is_causal = args["attn_mask"], args["is_causal"]
    recognised = sp.mask_overrides.get(node.name)
    if recognised is not None:
        mask, is_causal = None, recognised == "causal"
    if mask is not None and not isinstance(sp.placement(mask), Replicate):
        mask = sp.replicate(mask)
    elif mask is not None:
        mask = sp.env[mask]
    out = sp.call(
        ulysses_attention,
        q,
        k,
        v,
        mask,
        args["dropout_p"],
        is_causal,
        args["scale"],
        args["enable_gqa"],
        seq_len=sp.seq_len,
        rank=sp.group.rank,
        world=world,
        group=sp.name,
    )
    sp.env[node] = out
    sp.placements[node] = Shard(seq_dim)
    mask_kind = "causal" if is_causal else ("dense mask" if mask is not None else "no mask")
    if recognised is not None:
        mask_kind += " (recognised from the mask's graph)"
    sp.plan.attention.append(
        f"{node.name}: ulysses, {heads} heads, {kv_heads} kv heads, {mask_kind}"
    )
