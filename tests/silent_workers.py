"""Models and rank workers for tests/test_silent_attention.py: attention and random ops that
used to give wrong numbers without a warning (cross-attention, dropout, learned biases, masks
read from non-sequence inputs)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import autosp
from tests.models import VOCAB, PlainBlock
from tests.workers import BACKEND, grad_errors, make_batch, model_parity


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, d = x.shape
    return x.view(b, s, heads, d // heads).transpose(1, 2)


class CrossAttentionLM(nn.Module):
    """Causal self-attention, then cross-attention to keys/values that are not sequence-long:
    ``latents`` learned ones (``latents`` > 0), or the ``memory`` input (an encoder's
    states)."""

    def __init__(self, dim: int = 32, heads: int = 2, latents: int = 5) -> None:
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(64, dim)
        self.block = PlainBlock(dim, heads)
        self.latents = nn.Parameter(torch.randn(latents, dim)) if latents else None
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
    ) -> dict:
        b, s = input_ids.shape
        x = self.block(self.tok(input_ids) + self.pos(torch.arange(s)))
        context = memory if self.latents is None else self.latents.expand(b, -1, -1)
        k, v = (_heads(t, self.heads) for t in self.kv(context).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(_heads(self.q(x), self.heads), k, v)
        x = x + self.proj(out.transpose(1, 2).reshape(b, s, -1))
        logits = self.head(x)
        return {"logits": logits, "loss": _lm_loss(logits, labels)}


class BiasLM(nn.Module):
    """Causal attention with a learned per-head linear distance bias (ALiBi with trained
    slopes): a float mask that requires grad, ``[1, H, S, S]`` or (``dims`` 3) ``[H, S, S]``."""

    def __init__(self, dim: int = 48, heads: int = 6, dims: int = 4) -> None:
        super().__init__()
        self.heads, self.dims = heads, dims
        self.tok = nn.Embedding(VOCAB, dim)
        self.slopes = nn.Parameter(torch.linspace(0.1, 1.0, heads))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        b, s = input_ids.shape
        x = self.tok(input_ids)
        q, k, v = (_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        pos = torch.arange(s)
        distance = (pos.view(-1, 1) - pos.view(1, -1)).float()
        bias = -self.slopes.view(-1, 1, 1) * distance.abs()
        bias = bias.masked_fill(distance < 0, float("-inf"))
        if self.dims == 4:
            bias = bias.unsqueeze(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        logits = self.head(x + self.proj(out.transpose(1, 2).reshape(b, s, -1)))
        return {"logits": logits, "loss": _lm_loss(logits, labels)}


class DropoutLM(nn.Module):
    """Dropout on the embeddings (sharded activations), then a causal block. With ``keep``
    set, the dropout is replaced by that fixed mask (the reference run)."""

    P = 0.5

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(64, dim)
        self.block = PlainBlock(dim, 2)
        self.head = nn.Linear(dim, VOCAB)
        self.keep: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        x = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1]))
        if self.keep is None:
            hidden = F.dropout(x, self.P, self.training)
        else:
            hidden = x * self.keep / (1 - self.P)
        logits = self.head(self.block(hidden))
        return {"logits": logits, "hidden": hidden, "loss": _lm_loss(logits, labels)}


class AttentionDropoutProbe(nn.Module):
    """Attention whose output shows its dropout mask: zero queries give uniform probabilities
    over the keys and the values are one-hot positions, so ``probe[b, i, h, j]`` is nonzero iff
    query ``i`` of head ``h`` kept key ``j``."""

    P = 0.5
    WIDTH = 16  # > every sequence length used

    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(VOCAB, 8 * heads)
        self.head = nn.Linear(heads * self.WIDTH, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        b, s = input_ids.shape
        q = _heads(self.tok(input_ids) * 0.0, self.heads)
        v = F.one_hot(torch.arange(s), self.WIDTH).float().expand(b, self.heads, s, self.WIDTH)
        out = F.scaled_dot_product_attention(q, q, v, dropout_p=self.P)
        probe = out.transpose(1, 2).reshape(b, s, -1)
        logits = self.head(probe)
        return {"logits": logits, "probe": probe, "loss": _lm_loss(logits, labels)}


class PrefixLM(nn.Module):
    """Causal attention, except that every query sees the first ``prefix`` tokens (a 0-d
    tensor input, not sequence-shaped)."""

    def __init__(self, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(VOCAB, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, prefix: torch.Tensor) -> dict:
        b, s = input_ids.shape
        x = self.tok(input_ids)
        q, k, v = (_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        pos = torch.arange(s)
        mask = (pos.view(1, -1) <= pos.view(-1, 1)) | (pos.view(1, -1) < prefix)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        logits = self.head(x + out.transpose(1, 2).reshape(b, s, -1))
        return {"logits": logits, "loss": _lm_loss(logits, labels)}


class KeepOnesLM(PrefixLM):
    """Causal attention to the keys whose ``attention_mask`` is exactly 1: a 2-D integer
    input that may hold other values (2, 3: document ids) which must not count as 'keep'."""

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict:
        b, s = input_ids.shape
        x = self.tok(input_ids)
        q, k, v = (_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        pos = torch.arange(s)
        causal = pos.view(1, -1) <= pos.view(-1, 1)
        mask = causal & (attention_mask == 1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        logits = self.head(x + out.transpose(1, 2).reshape(b, s, -1))
        return {"logits": logits, "loss": _lm_loss(logits, labels)}


def _memory(batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Encoder states of 7 positions (not the decoder's length)."""
    return {"memory": torch.randn(batch, 7, 32, generator=torch.Generator().manual_seed(seq))}


def _prefix(batch: int, seq: int) -> dict[str, torch.Tensor]:
    """A prefix of 1 token (the mask is then causal) at length 13, of 6 tokens otherwise."""
    return {"prefix": torch.tensor(1 if seq == 13 else 6)}


def _documents(batch: int, seq: int) -> dict[str, torch.Tensor]:
    """All ones at length 13 (causal); document ids 1, 2, 3 otherwise."""
    if seq == 13:
        return {"attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    ids = torch.ones(batch, seq, dtype=torch.long)
    ids[:, seq // 3 :] = 2
    ids[:, 2 * seq // 3 :] = 3
    return {"attention_mask": ids}


EXTRA_INPUTS = {"memory": _memory, "prefix": _prefix, "documents": _documents}


def silent_parity(
    factory: str,
    kwargs: dict[str, Any],
    options: dict[str, Any],
    cases: list[tuple[int, int]],
    extra: str | None = None,
) -> list[dict]:
    """``model_parity`` for a model of this module."""
    torch.manual_seed(0)
    model = globals()[factory](**kwargs)
    inputs = EXTRA_INPUTS[extra] if extra else None
    return model_parity(model, cases, {"backend": BACKEND, **options}, inputs)


def _rng_in_step() -> bool:
    """Whether every rank's global generator is in the same state (one draw compared)."""
    draw = torch.rand(4)
    parts = [torch.empty_like(draw) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, draw)
    return all(torch.equal(p, parts[0]) for p in parts)


def dropout_check(batch: int, seq: int, options: dict[str, Any]) -> dict[str, Any]:
    """Dropout on sharded activations: whether the rank blocks' masks are equal, and the
    parallel loss and gradients against one process run with the mask the ranks drew."""
    torch.manual_seed(0)
    model = DropoutLM()
    ref = copy.deepcopy(model)
    parallel = autosp.parallelize(model, backend=BACKEND, **options)
    ids, labels = make_batch(batch, seq, seed=seq)
    out = parallel(input_ids=ids, labels=labels)
    out["loss"].backward()
    keep = autosp.gather_sequence(out["hidden"]).detach() != 0
    rows = seq - 2 * -(-seq // (2 * dist.get_world_size()))  # the last rank's rows
    block = seq - rows
    ref.keep = keep.float()
    expected = ref(input_ids=ids, labels=labels)
    expected["loss"].backward()
    return {
        "blocks_equal": torch.equal(keep[:, :rows], keep[:, block:]),
        "kept": keep.float().mean().item(),
        "loss_rel_err": abs(out["loss"].item() - expected["loss"].item())
        / abs(expected["loss"].item()),
        "grad_rel_err": grad_errors(model, ref),
        "rng_in_step": _rng_in_step(),
        "gathered_ops": sorted({op for p in parallel.plans for op in p.gathered_ops}),
    }


def attention_dropout_check(batch: int, seq: int, heads: int, options: dict[str, Any]) -> dict:
    """Attention dropout: whether the heads' masks are equal (they are independent in one
    process), the fraction kept, and whether the ranks' generators stay in step."""
    torch.manual_seed(0)
    parallel = autosp.parallelize(AttentionDropoutProbe(heads), backend=BACKEND, **options)
    ids, labels = make_batch(batch, seq, seed=seq)
    out = parallel(input_ids=ids, labels=labels)
    out["loss"].backward()
    probe = autosp.gather_sequence(out["probe"]).detach()
    keep = probe.view(batch, seq, heads, -1)[..., :seq] != 0
    return {
        "heads_equal": [torch.equal(keep[:, :, 0], keep[:, :, h]) for h in range(1, heads)],
        "kept": keep.float().mean().item(),
        "rng_in_step": _rng_in_step(),
        "gathered_ops": sorted({op for p in parallel.plans for op in p.gathered_ops}),
        "attention": [line for p in parallel.plans for line in p.attention],
    }
