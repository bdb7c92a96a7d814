"""Attention strategies: how an attention call runs on sequence-sharded inputs.

``ulysses.py`` trades the sequence shard for a head shard around the kernel (all-to-all);
``ring.py`` keeps the query rows and passes key/value blocks around the ring (send/recv);
``hybrid.py`` runs Ulysses inside groups and ring across them. The choice is made per attention
call (``choose_strategy``) and recorded in the plan; keys and values that are not the sequence
(cross-attention) stay whole (``local.py``). ``load_balance.py`` moves a causal ring to
the zigzag layout; ``mask_spec.py`` defines structured masks, which Ulysses computes with
``blockwise.py`` and ring block by block; ``blocks.py`` is the block math both share.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.fx import Node

from autosp.compiler.args import bind_defaults
from autosp.compiler.attention.hybrid import hybrid_attention
from autosp.compiler.attention.local import local_attention
from autosp.compiler.attention.mask_spec import MaskSpec, document_ids
from autosp.compiler.attention.ring import ring_attention
from autosp.compiler.attention.ulysses import ulysses_attention
from autosp.compiler.ops_table import ATTENTION, meta
from autosp.compiler.placement import Shard
from autosp.compiler.propagate import ShardingPass, UnsupportedOp, rule
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
    softcap: float = 0.0,
    sinks: Any = None,
) -> None:
    """The signature of ``F.scaled_dot_product_attention`` (a builtin without one), plus the
    ``softcap`` and ``sinks`` of ``softcapped_attention``."""


def kv_repeat(heads: int, kv_heads: int, world: int) -> int:
    """How often to repeat each key/value head so that every rank gets whole groups under
    Ulysses: the fewest copies making the count divisible by ``world`` (1 if it already is)."""
    return math.lcm(kv_heads, world) // kv_heads


def choose_strategy(requested: str, heads: int, world: int, hybrid_sizes: list[int]) -> str:
    """``ulysses`` when the query heads divide evenly, else ``hybrid`` over the largest Ulysses
    size dividing them, else ``ring``; an explicit request is honoured where it can run."""
    if requested == "ulysses" and heads % world:
        raise AutoSPError(
            f"autosp: attention='ulysses' needs the query heads ({heads}) divisible by the "
            f"sequence-parallel degree {world}. Use attention='ring' or 'auto', or a degree "
            f"that divides {heads}."
        )
    if requested in ("ulysses", "ring"):
        return requested
    if requested == "auto" and heads % world == 0:
        return "ulysses"
    if any(heads % size == 0 for size in hybrid_sizes):
        return "hybrid"
    return "ring"


def _structure(sp: ShardingPass, spec: MaskSpec) -> dict[str, Any]:
    """The arguments of a structured mask for the strategies: window, document ids (computed
    from the positions input) and key validity (the 2-D attention mask input)."""
    placeholders = list(sp.gm.graph.find_nodes(op="placeholder"))
    structure: dict[str, Any] = {"window": spec.window}
    if spec.positions is not None:
        structure["documents"] = sp.call(document_ids, sp.env[placeholders[spec.positions]])
    if spec.padding is not None:
        structure["valid"] = sp.env[placeholders[spec.padding]]
    return structure


def _is_sequence(sp: ShardingPass, node: Node, dim: int) -> bool:
    """Whether dimension ``dim`` of ``node`` is the sequence itself: its size is the sequence
    symbol (not merged, not offset)."""
    return any(d.dim == dim and not d.merged and d.length == 0 for d in sp.seq_dims(node))


def _shard_local(sp: ShardingPass, node: Node, args: dict[str, Any]) -> None:
    """Attention whose keys/values are not the sequence: this rank's query rows attend to the
    whole keys and values (``local_attention``), the mask's rows sliced like the queries."""
    query, key, mask = args["query"], args["key"], args["attn_mask"]
    if args["is_causal"]:
        raise UnsupportedOp("causal attention to keys/values that are not the sequence")
    if mask is not None:
        mask_meta = meta(mask)
        rows = mask_meta.dim() - 2
        if rows >= 0 and _is_sequence(sp, mask, rows):
            mask = sp.shard(mask, Shard(rows), True if mask_meta.dtype == torch.bool else 0.0)
        elif rows < 0 or hint(mask_meta.shape[rows]) == 1:
            mask = sp.replicate(mask)
        else:
            raise UnsupportedOp("a mask whose rows are not the queries")
    seq_dim = meta(query).dim() - 2
    sp.env[node] = sp.call(
        local_attention,
        sp.shard(query, Shard(seq_dim)),
        sp.replicate(key),
        sp.replicate(args["value"]),
        mask,
        args["dropout_p"],
        args["scale"],
        args["enable_gqa"],
        rank=sp.group.rank,
        softcap=args["softcap"],
    )
    sp.placements[node] = Shard(seq_dim)
    length = hint(meta(key).shape[-2])
    sp.plan.attention.append(
        f"{node.name}: local (keys/values of {length} rows are not the sequence; each rank's "
        "queries attend to all of them)"
    )


@rule(*ATTENTION)
def shard_attention(sp: ShardingPass, node: Node) -> None:
    """Replace ``scaled_dot_product_attention`` by a sequence-parallel strategy."""
    args = bind_defaults(sdpa_signature, node)
    if args is None:
        raise UnsupportedOp("the attention call's arguments match no signature")
    query, key, value = args["query"], args["key"], args["value"]
    world = sp.group.world
    q_meta, k_meta = meta(query), meta(key)
    if q_meta.dim() < 3:
        raise AutoSPError(
            f"autosp: attention {node.name} has no head dimension (query shape "
            f"{tuple(q_meta.shape)}); reshape the query to [batch, heads, seq, head_dim]."
        )
    if not _is_sequence(sp, query, q_meta.dim() - 2):
        raise UnsupportedOp("the query rows are not the sequence")
    sinks = args["sinks"]
    if not all(_is_sequence(sp, t, meta(t).dim() - 2) for t in (key, args["value"])):
        if sinks is not None:
            raise UnsupportedOp("attention sinks with keys that are not the sequence")
        _shard_local(sp, node, args)
        return
    heads, kv_heads = hint(q_meta.shape[-3]), hint(k_meta.shape[-3])
    mask, is_causal = args["attn_mask"], args["is_causal"]
    recognised = sp.mask_overrides.get(node.name)
    if isinstance(recognised, MaskSpec) and (args["dropout_p"] or sinks is not None):
        recognised = None  # the blockwise kernels have no dropout or sinks: keep the mask
    structure: dict[str, Any] = {}
    if isinstance(recognised, MaskSpec):
        mask, is_causal = None, recognised.causal
        structure = _structure(sp, recognised)
    elif recognised is not None:
        mask, is_causal = None, recognised == "causal"
    strategy = choose_strategy(sp.attention, heads, world, sorted(sp.group.hybrid))
    if strategy in ("ring", "hybrid") and args["dropout_p"]:
        raise UnsupportedOp(f"{strategy} attention with dropout")
    if mask is not None:
        mask = sp.replicate(mask)
    seq_dim = q_meta.dim() - 2
    q, k, v = (sp.shard(t, Shard(seq_dim)) for t in (query, key, value))
    ring_options = {
        "mask": mask,
        "softcap": args["softcap"],
        "seq_len": sp.seq_len,
        "balance": sp.load_balance,
        "sinks": None if sinks is None else sp.replicate(sinks),
        **structure,
    }
    if strategy == "ring":
        out = sp.call(
            ring_attention, q, k, v, is_causal, args["scale"], group=sp.name, **ring_options
        )
        detail = f"{heads} heads not divisible by {world}" if heads % world else "requested"
    elif strategy == "hybrid":
        size = max(s for s in sp.group.hybrid if heads % s == 0)
        ulysses_group, ring_group = sp.group.hybrid[size]
        out = sp.call(
            hybrid_attention,
            q,
            k,
            v,
            is_causal,
            args["scale"],
            ulysses_group=ulysses_group,
            ring_group=ring_group,
            kv_repeat=kv_repeat(heads, kv_heads, size),
            **ring_options,
        )
        detail = f"{heads} heads: Ulysses over {size} ranks, ring over {world // size}"
    else:
        repeat = kv_repeat(heads, kv_heads, world)
        out = sp.call(
            ulysses_attention,
            q,
            k,
            v,
            mask,
            args["dropout_p"],
            is_causal,
            args["scale"],
            args["enable_gqa"] or repeat * kv_heads != heads,
            seq_len=sp.seq_len,
            rank=sp.group.rank,
            world=world,
            group=sp.name,
            kv_repeat=repeat,
            softcap=args["softcap"],
            sinks=ring_options["sinks"],
            **structure,
        )
        detail = f"{heads} heads, {kv_heads} kv heads"
        if repeat > 1:
            detail += f" (each kv head sent to {repeat} ranks)"
    if args["softcap"]:
        detail += f", soft-cap {args['softcap']:g}"
    if sinks is not None:
        detail += ", sinks"
    sp.env[node] = out
    sp.placements[node] = Shard(seq_dim)
    mask_kind = "causal" if is_causal else ("dense mask" if mask is not None else "no mask")
    if isinstance(recognised, MaskSpec):
        mask_kind = f"structured mask: {recognised.describe()}, computed blockwise"
    if recognised is not None:
        mask_kind += ", recognised from the mask's graph"
    if strategy != "ulysses" and is_causal and mask is None and not structure and sp.load_balance:
        mask_kind += ", zigzag load balancing"
    sp.plan.attention.append(f"{node.name}: {strategy} ({detail}; {mask_kind})")
