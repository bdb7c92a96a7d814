"""Structured attention masks: what a mask is, as a function of a few ``[B, S]`` inputs.

Note [Structured masks]
-----------------------
Hugging Face builds ``[B, 1, S, S]`` masks that are conjunctions of a few simple rules. A
``MaskSpec`` names them; query ``q`` may attend to key ``k`` of batch row ``b`` when::

    (k <= q             if causal)
    (q - k < window     if window)
    (doc[b, q] == doc[b, k]  if documents: doc = document ids from the positions)
    (valid[b, k]        if padding: valid = the 2-D attention_mask)

``masks.py`` finds the spec of a model's mask by evaluating its subgraph on sampled inputs
and comparing with ``allowed``; the attention strategies then build only the ``[rows, cols]``
blocks of the mask they compute (``block_bias``), never ``S x S``, and skip the blocks that
causality, the window and padding hide (``block_hidden``, from positions alone: no tensor is
read on the host). Positions ``>= seq_len`` are padding: hidden as keys, and as queries they
see every key (no softmax row is empty).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from autosp.compiler.attention.blocks import Block

CHUNK = 1024
"""Query and key rows per block of a structured mask."""


@dataclass(frozen=True, slots=True)
class MaskSpec:
    """A structured mask (Note [Structured masks]); ``positions`` and ``padding`` are the
    indices of the graph inputs holding the positions and the 2-D attention mask."""

    causal: bool
    window: int = 0
    positions: int | None = None
    padding: int | None = None

    def describe(self) -> str:
        parts = ["causal" if self.causal else "bidirectional"]
        if self.window:
            parts.append(f"window {self.window}")
        if self.positions is not None:
            parts.append("documents from positions")
        if self.padding is not None:
            parts.append("key padding")
        return " + ".join(parts)


Structure = tuple[int, "torch.Tensor | None", "torch.Tensor | None"]
"""A structured mask's window, document ids and key validity, as the kernels take them."""


def structure_of(
    window: int, documents: torch.Tensor | None, valid: torch.Tensor | None
) -> Structure | None:
    """The structure these arguments give, or None when they give none (plain causal or
    unmasked attention)."""
    if window or documents is not None or valid is not None:
        return window, documents, valid
    return None


def document_ids(positions: torch.Tensor) -> torch.Tensor:
    """Document index of each token of ``[B, S]`` positions: a new document starts wherever
    the position does not follow the previous one by 1 (as Hugging Face packs sequences)."""
    previous = torch.cat([positions[..., :1] - 1, positions[..., :-1]], dim=-1)
    return (positions - previous != 1).cumsum(-1)


def allowed(
    causal: bool,
    window: int,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    documents: torch.Tensor | None,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """Boolean ``[B or 1, 1, Lq, Lk]``: which keys at positions ``k_pos`` each query at
    ``q_pos`` may attend to (all positions real, ``< S``)."""
    q, k = q_pos.unsqueeze(-1), k_pos.unsqueeze(0)
    ok = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool, device=q_pos.device)
    if causal:
        ok = ok & (k <= q)
    if window:
        ok = ok & (q - k < window)
    ok = ok.view(1, 1, *ok.shape)
    if documents is not None:
        same = documents[:, q_pos].unsqueeze(-1) == documents[:, k_pos].unsqueeze(-2)
        ok = ok & same.unsqueeze(1)
    if valid is not None:
        ok = ok & valid[:, k_pos].bool().view(valid.shape[0], 1, 1, -1)
    return ok


def block_bias(
    causal: bool,
    window: int,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    seq_len: int,
    documents: torch.Tensor | None,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """Additive fp32 bias ``[B or 1, 1, Lq, Lk]`` of one block of (possibly padding)
    positions."""
    q_real, k_real = q_pos < seq_len, k_pos < seq_len
    q_c, k_c = q_pos.clamp(max=seq_len - 1), k_pos.clamp(max=seq_len - 1)
    ok = allowed(causal, window, q_c, k_c, documents, valid) & k_real
    ok = ok | ~q_real.unsqueeze(-1)
    return torch.zeros(ok.shape, device=ok.device).masked_fill(~ok, float("-inf"))


def block_hidden(
    causal: bool, window: int, q: tuple[int, int], k: tuple[int, int], seq_len: int
) -> bool:
    """Whether causality, the window and padding hide every key at positions ``[k0, k1)``
    from every real query at ``[q0, q1)``: decided from positions alone, so that choosing
    the blocks reads no tensor (documents and key validity only mask inside a block)."""
    (q0, q1), (k0, k1) = q, (k[0], min(k[1], seq_len))
    q1 = min(q1, seq_len)
    if q0 >= q1 or k0 >= k1:
        return True  # no real query, or only padding keys
    if causal and k0 > q1 - 1:
        return True  # every key after every query
    return bool(window) and q0 - (k1 - 1) >= window  # every key too far behind


def structured_blocks(
    q_offset: int,
    q_rows: int,
    k_offset: int,
    k_rows: int,
    causal: bool,
    window: int,
    seq_len: int,
    documents: torch.Tensor | None,
    valid: torch.Tensor | None,
    device: torch.device,
    chunk: int = CHUNK,
) -> Iterator[Block]:
    """The ``chunk x chunk`` blocks of ``q_rows`` queries at positions ``q_offset..`` against
    ``k_rows`` keys at ``k_offset..`` that the mask's geometry does not hide (local slices)."""
    for q_start in range(0, q_rows, chunk):
        q_end = min(q_start + chunk, q_rows)
        q_span = (q_offset + q_start, q_offset + q_end)
        for k_start in range(0, k_rows, chunk):
            k_end = min(k_start + chunk, k_rows)
            k_span = (k_offset + k_start, k_offset + k_end)
            if block_hidden(causal, window, q_span, k_span, seq_len):
                continue
            q_pos = torch.arange(*q_span, device=device)
            k_pos = torch.arange(*k_span, device=device)
            bias = block_bias(causal, window, q_pos, k_pos, seq_len, documents, valid)
            yield Block(slice(q_start, q_end), slice(k_start, k_end), False, bias)
