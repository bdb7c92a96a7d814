"""Structured masks: their definition, and blockwise attention against full attention."""

from __future__ import annotations

import pytest
import torch

from autosp.compiler.attention.blockwise import blockwise_attention
from autosp.compiler.attention.mask_spec import allowed, block_bias, block_hidden, document_ids
from autosp.compiler.attention.reference import softcapped_attention

TOL = 1e-5


def test_document_ids_restart_where_positions_do() -> None:
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13]])
    expected = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0] * 9])
    assert torch.equal(document_ids(positions), expected)


def test_allowed_combines_the_rules() -> None:
    pos = torch.arange(5)
    docs = torch.tensor([[0, 0, 1, 1, 1]])
    valid = torch.tensor([[1, 1, 1, 0, 1]])
    got = allowed(True, 2, pos, pos, docs, valid)[0, 0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],  # new document
            [0, 0, 1, 0, 0],  # key 3 is padding
            [0, 0, 0, 0, 1],  # window 2: keys 3, 4; 3 is padding
        ]
    )
    assert torch.equal(got, expected)


def test_block_hidden_from_positions_alone() -> None:
    # causal: keys 8.. are all in the future for queries 4..7
    assert block_hidden(True, 0, (4, 8), (8, 12), 12)
    assert not block_hidden(True, 0, (4, 8), (7, 12), 12)
    # window 2: keys 0..1 are too far behind queries 4..7, key 3 is not
    assert block_hidden(True, 2, (4, 8), (0, 2), 12)
    assert not block_hidden(True, 2, (4, 8), (0, 4), 12)
    # only padding keys (>= seq_len), or only padding queries
    assert block_hidden(False, 0, (0, 4), (6, 8), 6)
    assert block_hidden(False, 0, (6, 8), (0, 4), 6)


def test_block_bias_pads() -> None:
    # positions >= seq_len: padding keys hidden, padding queries see every key
    bias = block_bias(False, 0, torch.arange(4, 8), torch.arange(4, 8), 6, None, None)
    assert torch.equal(
        torch.isneginf(bias[0, 0]), torch.tensor([[0, 0, 1, 1]] * 2 + [[0] * 4] * 2).bool()
    )


def _spec_mask(kind: str, seq: int, batch: int) -> dict:
    gen = torch.Generator().manual_seed(seq)
    positions = torch.arange(seq).repeat(batch, 1)
    positions[0, seq // 3 :] = torch.arange(seq - seq // 3)
    valid = (torch.rand(batch, seq, generator=gen) > 0.3).long()
    valid[:, 0] = 1
    return {
        "window": {"window": 3},
        "documents": {"documents": document_ids(positions)},
        "padding": {"valid": valid},
        "all": {"window": 4, "documents": document_ids(positions), "valid": valid},
    }[kind]


@pytest.mark.parametrize("use_kernel", [True, False], ids=["cpu_flash_kernel", "fp32_math"])
@pytest.mark.parametrize(
    ("kind", "causal", "softcap", "seq", "chunk"),
    [
        ("window", True, 0.0, 21, 4),
        ("documents", True, 0.0, 19, 8),
        ("padding", False, 0.0, 17, 5),
        ("all", True, 0.0, 23, 6),
        ("documents", False, 1.5, 18, 4),
    ],
)
def test_blockwise_matches_full_attention(
    kind: str, causal: bool, softcap: float, seq: int, chunk: int, use_kernel: bool
) -> None:
    """Blockwise attention on a padded sequence equals full attention with the dense mask."""
    gen = torch.Generator().manual_seed(0)
    batch, padded = 2, seq + 3
    q = torch.randn(batch, 4, padded, 8, generator=gen, requires_grad=True)
    k = torch.randn(batch, 2, padded, 8, generator=gen, requires_grad=True)
    v = torch.randn(batch, 2, padded, 8, generator=gen, requires_grad=True)
    dout = torch.randn(batch, 4, padded, 8, generator=gen)
    structure = _spec_mask(kind, seq, batch)
    out = blockwise_attention(
        q,
        k,
        v,
        causal,
        None,
        seq_len=seq,
        softcap=softcap,
        chunk=chunk,
        use_kernel=use_kernel,
        **structure,
    )
    (out[..., :seq, :] * dout[..., :seq, :]).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    pos = torch.arange(seq)
    mask = allowed(
        causal,
        structure.get("window", 0),
        pos,
        pos,
        structure.get("documents"),
        structure.get("valid"),
    )
    real = [t[..., :seq, :] for t in (q, k, v)]
    ref = softcapped_attention(*real, attn_mask=mask, enable_gqa=True, softcap=softcap)
    (ref * dout[..., :seq, :]).sum().backward()
    assert (out[..., :seq, :] - ref).abs().max() <= TOL
    for got, t in zip(grads, (q, k, v), strict=True):
        assert (got - t.grad).abs().max() <= TOL
