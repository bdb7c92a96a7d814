"""Property-based fuzzing of autosp against one process, over a small grammar of models.

A ``Spec`` describes one example: a plain-PyTorch language model (``FuzzLM``), its batch and
how it is parallelized. The property, checked by ``evaluate_spec`` on every rank of a gloo
group, is autosp's contract:

* ``exact``: loss rel. err <= LOSS_TOL on every length, every parameter gradient rel. err
  <= GRAD_TOL (``tests.workers.grad_errors``) or, where that fails, its error against an fp64
  single process at most FP32_NOISE times the fp32 single process's own (a gradient that is
  fp32 rounding noise, such as a saturated loss's), gathered logits max err <= LOGITS_TOL of the
  largest logit, the same loss on every rank, and a compiled plan (never a silent eager run);
* ``gathered``: exact, and every op the plan gathered was named in a warning;
* ``refused``: ``autosp.AutoSPError`` raised (the message is recorded);
* ``ran``: dropout with p > 0 (Note [Dropout]);
* anything else is a failure: ``mismatch``, ``crash`` (another exception), ``silent`` (no
  warning for a gathered op, or no compiled plan), ``hang`` (the group timed out or a rank died).

Specs are drawn with hypothesis in the parent process (fixed seed, so a seed is a
reproducible list of examples) and evaluated in batches: one spawned group per degree runs
many examples, since spawning ranks and compiling are the expensive part.

Run longer than the CI slice with ``python -m tests.fuzz --minutes N`` and reproduce one
example with ``python -m tests.fuzz --spec "Spec(...)"`` (``--shrink``: a simpler failing spec).

Note [Dropout]
--------------
Dropout draws differ between the parallel run and the single process (and between ranks), so
values cannot be compared. With p = 0 the dropout op stays in the graph and the example must be
exact. With p > 0 the example must run, give a finite loss and finite gradients, the same loss
on every rank (it is all-reduced), and a loss within DROPOUT_LOSS_TOL of the single process,
or no further from it than DROPOUT_SPREAD times the single process is from itself with other
draws (a loss near 0, such as a tied head predicting its own token, is dominated by what is
dropped): a gross check that the dropped model is the same model, not a statistical test.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from torch import nn

from tests.workers import grad_errors

logger = logging.getLogger(__name__)

VOCAB = 64
MAX_POSITIONS = 64
LOSS_TOL = 1e-5  # fp32 loss: sums reordered across ranks
GRAD_TOL = 1e-4  # fp32 gradients: attention and matmul reductions reordered
LOGITS_TOL = 1e-5  # relative to the largest logit (fp32: layers of reordered sums)
FP32_NOISE = 2.0  # a gradient may be off fp64 by 2x what the fp32 single process is
DROPOUT_LOSS_TOL = 0.5  # Note [Dropout]: a gross bound, dropout changes the loss by a few %
DROPOUT_SPREAD = 3.0  # Note [Dropout]: or within 3x the single process's own spread
BACKEND = "eager"
"""Inner compiler of the rewritten graph: the sharding pass is what is fuzzed, and AOTAutograd
would triple the compile time of every example (``--backend aot_eager`` to include it)."""
COLLECTIVE_TIMEOUT_S = 300  # a collective waiting this long means the ranks diverged

GOOD = ("exact", "gathered", "refused", "ran")
LABELS_IF_NOT_DICT = ("targets", "targets", "targets", "labels")

KNOWN_GAPS: dict[str, str] = {}
"""Spec features (``features(spec)``) whose failures are autosp bugs being fixed now, with the
reason. A failing example with one of these features is reported as known, not failed; remove
an entry when its fix lands and the CI slice still passes."""

MIXERS = (
    "none",
    "conv1d",
    "cumsum",
    "roll",
    "shift",
    "mean_pool",
    "setitem_first",
    "shift_inplace",
    "scale_inplace",
    "dropout",
)
"""Token-mixing ops added to each block's residual stream (``_Mixer``)."""


@dataclass(frozen=True)
class Spec:
    """One fuzz example: model, batch and autosp options. ``repr`` reproduces it."""

    world: int = 2
    attention: str = "auto"  # autosp strategy: auto, ulysses, ring, hybrid
    load_balance: bool = True
    recognise_masks: bool = True
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 8
    layers: int = 1
    attn_impl: str = "sdpa"  # sdpa; written out: eager (additive mask, HF), eager_fill (nanoGPT)
    gqa: str = "enable_gqa"  # enable_gqa (SDPA flag), expand (HF repeat_kv), repeat_interleave
    softcap: float = 0.0  # eager only: scores = c * tanh(scores / c)
    causal: bool = True
    mask: str = "none"  # none (is_causal flag), positions, window, documents, padding
    mask_dtype: str = "bool"  # bool, or float (additive -inf)
    window: int = 3
    pos_emb: str = "none"  # none, learned, rope
    norm: str = "layer"  # layer, rms, rms_manual
    mlp: str = "dense"  # dense, gated (down(silu(gate(x)) * up(x)), bias-free), moe
    tile_mlp: bool = False  # gated: autosp's tiled MLP forced on, 3-token chunks
    recompute: str = "auto"  # autosp's Config.recompute: auto (cheap at these sizes), layers, full
    experts: int = 2
    top_k: int = 1
    moe_impl: str = "loop"  # loop (one Linear per expert), einsum (stacked expert weights)
    aux_loss: bool = False  # MoE load-balancing loss (a mean over all tokens)
    mixer: str = "none"  # one of MIXERS
    dropout: float = 0.0
    tie: bool = False  # lm head shares the embedding weight
    layout: str = "batch_first"  # batch_first ([B, S, D]) or seq_first ([S, B, D])
    shift: str = "slice"  # slice (logits[:, :-1], labels[:, 1:]), pad (HF), none (MLM)
    reduction: str = "mean"  # mean, sum
    output: str = "dict"  # dict {loss, logits}, tuple (loss, logits), tensor (loss)
    label_name: str = "labels"  # labels, targets
    positional: bool = False  # call model(ids, labels, ...) instead of keywords
    steps: tuple[tuple[int, int], ...] = ((1, 13),)  # (batch, length) per training step
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.heads % self.kv_heads:
            problems.append("kv_heads must divide heads")
        written_out = self.attn_impl != "sdpa"
        if written_out and self.gqa == "enable_gqa" and self.kv_heads != self.heads:
            problems.append("eager attention repeats kv heads (gqa expand or repeat_interleave)")
        if self.softcap and not written_out:
            problems.append("softcap needs written-out attention")
        if self.mask == "none" and self.mask_dtype != "bool":
            problems.append("mask 'none' has no dtype")
        if self.tile_mlp and self.mlp != "gated":
            problems.append("tile_mlp needs mlp 'gated'")
        if self.top_k > self.experts:
            problems.append("top_k > experts")
        if self.pos_emb == "rope" and self.head_dim % 2:
            problems.append("rope needs an even head_dim")
        if self.mixer not in MIXERS:
            problems.append(f"mixer must be one of {MIXERS}")
        if self.dropout and self.mixer != "dropout":
            problems.append("dropout > 0 needs mixer 'dropout'")
        if not self.steps or any(not (3 < s <= MAX_POSITIONS and b < s) for b, s in self.steps):
            problems.append(f"steps need 3 < length <= {MAX_POSITIONS}, batch < length")
        if problems:
            raise ValueError(f"invalid Spec: {'; '.join(problems)}: {self!r}")

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


def features(spec: Spec) -> set[str]:
    """``field:value`` for every field that selects a code path (matched against KNOWN_GAPS)."""
    skip = {"seed", "steps", "window", "softcap", "dropout"}
    found = {f"{f.name}:{getattr(spec, f.name)}" for f in dataclasses.fields(spec)}
    found = {f for f in found if f.split(":")[0] not in skip}
    if spec.kv_heads == 1 and spec.heads > 1:
        found.add("mqa")
    elif spec.kv_heads != spec.heads:
        found.add("gqa")
    if spec.dropout:
        found.add("dropout>0")
    return found


# ----------------------------------------------------------------------------- the grammar
PRIMES = (5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


@st.composite
def specs(draw: st.DrawFn, worlds: tuple[int, ...] = (2, 3, 4)) -> Spec:
    """Specs that ``Spec.__post_init__`` accepts, biased towards odd and prime lengths."""
    heads = draw(st.sampled_from((1, 2, 3, 4, 6, 8)))
    kv_heads = draw(st.sampled_from([k for k in range(1, heads + 1) if heads % k == 0]))
    attn_impl = draw(st.sampled_from(("sdpa", "eager", "eager_fill")))
    gqa_kinds = ["expand", "repeat_interleave"] + (["enable_gqa"] if attn_impl == "sdpa" else [])
    output = draw(st.sampled_from(("dict", "tuple", "tensor")))
    mask = draw(st.sampled_from(("none", "positions", "window", "documents", "padding")))
    mixer = draw(st.sampled_from(MIXERS))
    mlp = draw(st.sampled_from(("dense", "gated", "moe")))
    experts = draw(st.integers(2, 4))
    length = st.one_of(st.sampled_from(PRIMES), st.integers(4, 40))
    batch = draw(st.integers(1, 3))
    first = (batch, draw(length))
    # a second step changes the length (the sequence is dynamic) and maybe the batch size
    second = st.tuples(st.sampled_from((batch, batch, 1, 2, 3)), length)
    return Spec(
        world=draw(st.sampled_from(worlds)),
        attention=draw(st.sampled_from(("auto", "ulysses", "ring", "hybrid"))),
        load_balance=draw(st.booleans()),
        recognise_masks=draw(st.booleans()),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from((4, 8, 12, 16))),
        layers=draw(st.integers(1, 2)),
        attn_impl=attn_impl,
        gqa=draw(st.sampled_from(gqa_kinds)),
        softcap=draw(st.sampled_from((0.0, 5.0))) if attn_impl != "sdpa" else 0.0,
        causal=draw(st.booleans()),
        mask=mask,
        mask_dtype=draw(st.sampled_from(("bool", "float"))) if mask != "none" else "bool",
        window=draw(st.integers(1, 12)),
        pos_emb=draw(st.sampled_from(("none", "learned", "rope"))),
        norm=draw(st.sampled_from(("layer", "rms", "rms_manual"))),
        mlp=mlp,
        experts=experts,
        top_k=draw(st.integers(1, experts)),
        moe_impl=draw(st.sampled_from(("loop", "einsum"))),
        aux_loss=draw(st.booleans()) if mlp == "moe" else False,
        tile_mlp=draw(st.booleans()) if mlp == "gated" else False,
        recompute=draw(st.sampled_from(("auto", "auto", "layers", "full"))),
        mixer=mixer,
        dropout=draw(st.sampled_from((0.0, 0.25))) if mixer == "dropout" else 0.0,
        tie=draw(st.booleans()),
        layout=draw(st.sampled_from(("batch_first", "seq_first"))),
        shift=draw(st.sampled_from(("slice", "pad", "none"))),
        reduction=draw(st.sampled_from(("mean", "sum"))),
        output=output,
        # autosp refuses a loss outside a dict or ModelOutput when the batch has labels=
        # (api.SequenceParallel.forward); drawn rarely, the refusal costs a whole compile.
        label_name=draw(st.sampled_from(("labels",) if output == "dict" else LABELS_IF_NOT_DICT)),
        positional=draw(st.booleans()),
        steps=(first, *draw(st.lists(second, max_size=1).filter(lambda s: s != [first]))),
        seed=draw(st.integers(0, 2**16)),
    )


def draw_specs(count: int, seed: int, worlds: tuple[int, ...] = (2, 3, 4)) -> list[Spec]:
    """``count`` specs drawn by hypothesis; the same list for the same arguments.

    The list is one hypothesis example (its elements are drawn independently) and the second
    of the run: hypothesis starts with the simplest example and mutates earlier ones later,
    both of which would spend examples on near-copies.
    """
    drawn: list[list[Spec]] = []

    @settings(
        max_examples=2,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis_seed(seed)
    @given(st.lists(specs(worlds), min_size=count, max_size=count))
    def collect(specs_: list[Spec]) -> None:
        drawn.append(specs_)

    collect()
    return drawn[-1]


# ----------------------------------------------------------------------------- the model
def build_mask(spec: Spec, positions: torch.Tensor, attention_mask: torch.Tensor | None) -> Any:
    """The attention mask built inside the model, as Hugging Face does: from ``arange``,
    ``position_ids`` and ``attention_mask``; None for mask 'none'. Never hides a whole row."""
    if spec.mask == "none":
        return None
    seq = positions.shape[-1]
    idx = torch.arange(seq, device=positions.device)
    q, k = idx.view(-1, 1), idx.view(1, -1)
    allowed = k <= q if spec.causal else torch.ones(seq, seq, dtype=torch.bool)
    allowed = allowed.view(1, 1, seq, seq)
    if spec.mask == "window":
        near = (q - k < spec.window) if spec.causal else ((q - k).abs() < spec.window)
        allowed = allowed & near.view(1, 1, seq, seq)
    elif spec.mask == "documents":
        doc = torch.cumsum((positions == 0).long(), dim=-1)  # [B, S]
        allowed = allowed & (doc.unsqueeze(-1) == doc.unsqueeze(-2)).unsqueeze(1)
    elif spec.mask == "padding":
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    if spec.mask_dtype == "float":
        return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    return allowed


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class _Attention(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        hd = spec.head_dim
        self.q = nn.Linear(spec.dim, spec.heads * hd)
        self.kv = nn.Linear(spec.dim, 2 * spec.kv_heads * hd)
        self.o = nn.Linear(spec.heads * hd, spec.dim)

    def _heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        """[B, S, .] or [S, B, .] to [B, heads, S, head_dim]."""
        if self.spec.layout == "seq_first":
            s, b = t.shape[:2]
            return t.view(s, b, heads, self.spec.head_dim).permute(1, 2, 0, 3)
        b, s = t.shape[:2]
        return t.view(b, s, heads, self.spec.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: Any, rope: Any) -> torch.Tensor:
        spec = self.spec
        q = self._heads(self.q(x), spec.heads)
        k, v = (self._heads(t, spec.kv_heads) for t in self.kv(x).chunk(2, dim=-1))
        if rope is not None:
            q, k = _rotate(q, *rope), _rotate(k, *rope)
        rep = spec.heads // spec.kv_heads
        if rep > 1 and spec.gqa == "expand":
            b, _, s, hd = k.shape
            k, v = (
                t[:, :, None].expand(b, spec.kv_heads, rep, s, hd).reshape(b, spec.heads, s, hd)
                for t in (k, v)
            )
        elif rep > 1 and spec.gqa == "repeat_interleave":
            k, v = (t.repeat_interleave(rep, dim=1) for t in (k, v))
        is_causal = spec.causal and mask is None
        if spec.attn_impl == "sdpa":
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=rep > 1
            )
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(spec.head_dim)
            if spec.softcap:
                scores = torch.tanh(scores / spec.softcap) * spec.softcap
            if is_causal:  # built here: a written-out kernel has no is_causal flag
                s = scores.shape[-1]
                mask = torch.ones(s, s, dtype=torch.bool, device=scores.device).tril()
            if mask is not None and spec.attn_impl == "eager_fill":  # nanoGPT
                hidden = ~mask if mask.dtype == torch.bool else mask < 0
                scores = scores.masked_fill(hidden, float("-inf"))
            elif mask is not None:  # Hugging Face: an additive mask
                if mask.dtype == torch.bool:
                    mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
                scores = scores + mask
            out = torch.softmax(scores, dim=-1) @ v
        if spec.layout == "seq_first":
            b, h, s, hd = out.shape
            return self.o(out.permute(2, 0, 1, 3).reshape(s, b, h * hd))
        b, h, s, hd = out.shape
        return self.o(out.transpose(1, 2).reshape(b, s, h * hd))


class _Mixer(nn.Module):
    """An op that mixes tokens along the sequence (or a pointwise one written in place)."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        self.seq_dim = 0 if spec.layout == "seq_first" else 1
        if spec.mixer == "conv1d":
            self.weight = nn.Parameter(torch.randn(spec.dim, 1, 3) * 0.3)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        kind, sd = self.spec.mixer, self.seq_dim
        if kind == "conv1d":  # depthwise causal conv along the sequence
            channels = x.permute(1, 2, 0) if sd == 0 else x.transpose(1, 2)  # [B, D, S]
            y = F.conv1d(F.pad(channels, (2, 0)), self.weight, groups=x.shape[-1])
            return y.permute(2, 0, 1) if sd == 0 else y.transpose(1, 2)
        if kind == "cumsum":  # running mean of the tokens so far
            seq = x.shape[sd]
            count = torch.arange(1, seq + 1, device=x.device, dtype=x.dtype)
            count = count.view(-1, 1, 1) if sd == 0 else count.view(1, -1, 1)
            return x.cumsum(dim=sd) / count
        if kind == "roll":
            return torch.roll(x, shifts=1, dims=sd)
        if kind == "shift":  # token shift (RWKV): each token sees the previous one
            pad = (0, 0, 0, 0, 1, 0) if sd == 0 else (0, 0, 1, 0)
            return F.pad(x, pad).narrow(sd, 0, x.shape[sd])
        if kind == "mean_pool":
            return x.mean(dim=sd, keepdim=True).expand_as(x)
        if kind == "setitem_first":  # the first token of the sequence gets a marker
            y = x.clone()
            if sd == 0:
                y[0] = y[0] * 2.0
            else:
                y[:, 0] = y[:, 0] * 2.0
            return y
        if kind == "shift_inplace":
            y = x.clone()
            if sd == 0:
                y[1:] += 0.5 * x[:-1]
            else:
                y[:, 1:] += 0.5 * x[:, :-1]
            return y
        if kind == "scale_inplace":
            y = x.clone()
            y.mul_(0.5)
            if valid is not None:  # padding: zero the padded tokens in place
                mask = valid.t() if sd == 0 else valid
                y.masked_fill_(~mask.bool().unsqueeze(-1), 0.0)
            return y
        if kind == "dropout":
            return F.dropout(x, p=self.spec.dropout, training=self.training)
        raise AssertionError(kind)


class _MLP(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        d, hidden = spec.dim, 2 * spec.dim
        if spec.mlp == "dense":
            self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)
            return
        if spec.mlp == "gated":
            self.gate, self.up, self.down = (
                nn.Linear(i, o, bias=False) for i, o in ((d, hidden), (d, hidden), (hidden, d))
            )
            return
        self.router = nn.Linear(d, spec.experts, bias=False)
        if spec.moe_impl == "loop":
            self.experts = nn.ModuleList(
                nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
                for _ in range(spec.experts)
            )
        else:
            self.w_up = nn.Parameter(torch.randn(spec.experts, d, hidden) / math.sqrt(d))
            self.w_down = nn.Parameter(torch.randn(spec.experts, hidden, d) / math.sqrt(hidden))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output and the MoE load-balancing loss (None without one)."""
        spec = self.spec
        if spec.mlp == "dense":
            return self.down(F.gelu(self.up(x))), None
        if spec.mlp == "gated":
            return self.down(F.silu(self.gate(x)) * self.up(x)), None
        probs = torch.softmax(self.router(x), dim=-1)  # [.., E]
        weights, chosen = probs.topk(spec.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(-1, chosen, weights)
        if spec.moe_impl == "loop":
            out = sum(gates[..., e : e + 1] * expert(x) for e, expert in enumerate(self.experts))
        else:
            h = F.gelu(torch.einsum("...d,edf->...ef", x, self.w_up))
            out = (torch.einsum("...ef,efd->...ed", h, self.w_down) * gates.unsqueeze(-1)).sum(-2)
        if not spec.aux_loss:
            return out, None
        flat_probs, flat_gates = probs.reshape(-1, spec.experts), gates.reshape(-1, spec.experts)
        load = (flat_gates > 0).float().mean(dim=0)
        return out, spec.experts * (load * flat_probs.mean(dim=0)).sum()


def _norm(spec: Spec) -> nn.Module:
    if spec.norm == "layer":
        return nn.LayerNorm(spec.dim)
    if spec.norm == "rms":
        return nn.RMSNorm(spec.dim)
    return _ManualRMSNorm(spec.dim)


class _ManualRMSNorm(nn.Module):
    """RMSNorm written out as Hugging Face Llama does."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class _Block(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2 = _norm(spec), _Attention(spec), _norm(spec)
        self.mixer = _Mixer(spec) if spec.mixer != "none" else None
        self.mlp = _MLP(spec)

    def forward(self, x: torch.Tensor, mask: Any, rope: Any, valid: Any) -> tuple[Any, Any]:
        x = x + self.attn(self.norm1(x), mask, rope)
        if self.mixer is not None:
            x = x + self.mixer(x, valid)
        out, aux = self.mlp(self.norm2(x))
        return x + out, aux


class FuzzLM(nn.Module):
    """A language model in plain PyTorch assembled from a ``Spec``; its loss is
    ``F.cross_entropy`` (+ 0.01 x the MoE load-balancing losses)."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(VOCAB, spec.dim)
        if spec.pos_emb == "learned":
            self.pos = nn.Embedding(MAX_POSITIONS, spec.dim)
        if spec.pos_emb == "rope":
            freqs = 1.0 / 10000 ** (torch.arange(0, spec.head_dim, 2).float() / spec.head_dim)
            self.register_buffer("inv_freq", freqs, persistent=False)
        self.blocks = nn.ModuleList(_Block(spec) for _ in range(spec.layers))
        self.norm = _norm(spec)
        self.head = nn.Linear(spec.dim, VOCAB, bias=False)
        if spec.tie:
            self.head.weight = self.embed.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Any:
        spec = self.spec
        seq_first = spec.layout == "seq_first"
        positions = position_ids
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.embed(input_ids.t() if seq_first else input_ids)
        if spec.pos_emb == "learned":
            pos = self.pos(positions)  # [1 or B, S, D]
            x = x + (pos.transpose(0, 1) if seq_first else pos)
        rope = None
        if spec.pos_emb == "rope":
            angles = positions.unsqueeze(-1).float() * self.inv_freq  # [1 or B, S, hd/2]
            angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)  # [1 or B, 1, S, hd]
            rope = (angles.cos(), angles.sin())
        mask = build_mask(spec, positions, attention_mask)
        aux_total = None
        for block in self.blocks:
            x, aux = block(x, mask, rope, attention_mask)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        logits = self.head(self.norm(x))  # [B, S, V] or [S, B, V]
        labels = labels if labels is not None else targets
        if labels is None:
            return {"logits": logits} if spec.output == "dict" else logits
        loss = self._loss(logits, labels)
        if aux_total is not None:
            loss = loss + 0.01 * aux_total
        if spec.output == "dict":
            return {"loss": loss, "logits": logits}
        if spec.output == "tuple":
            return loss, logits
        return loss

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        seq_first = spec.layout == "seq_first"
        if spec.shift == "pad":
            labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
        elif spec.shift == "slice":
            labels = labels[:, 1:]
            logits = logits[:-1] if seq_first else logits[:, :-1]
        if seq_first:
            labels = labels.t()
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            reduction=spec.reduction,
        )


def make_inputs(spec: Spec, b: int, seq: int) -> dict[str, torch.Tensor]:
    """A batch of ``b`` sequences of ``seq`` tokens, the same on every rank: token ids,
    labels with ignored positions, and ``position_ids`` (documents) or ``attention_mask``
    (right padding)."""
    gen = torch.Generator().manual_seed(spec.seed * 1009 + seq * 7 + b)
    ids = torch.randint(0, VOCAB, (b, seq), generator=gen)
    labels = ids.clone()
    labels[torch.rand(b, seq, generator=gen) < 0.2] = -100
    labels[:, 1] = ids[:, 1]  # at least one counted label after any shift
    inputs = {"input_ids": ids, spec.label_name: labels}
    if spec.mask == "documents":
        pos = torch.empty(b, seq, dtype=torch.long)
        for row in range(b):
            cuts = sorted(torch.randperm(seq - 1, generator=gen)[: row + 1].add(1).tolist())
            starts = [0, *cuts]
            for a, z in zip(starts, [*cuts, seq], strict=True):
                pos[row, a:z] = torch.arange(z - a)
        inputs["position_ids"] = pos
    if spec.mask == "padding" or spec.mixer == "scale_inplace":
        valid = torch.ones(b, seq, dtype=torch.long)
        for row in range(b):
            pad = int(torch.randint(0, seq // 3 + 1, (1,), generator=gen))
            if pad:
                valid[row, -pad:] = 0
                labels[row, -pad:] = -100
        inputs["attention_mask"] = valid
    return inputs


def _call(model: nn.Module, spec: Spec, inputs: dict[str, torch.Tensor]) -> Any:
    if not spec.positional:
        return model(**inputs)
    order = ("input_ids", "labels", "targets", "position_ids", "attention_mask")
    return model(*(inputs.get(name) for name in order))


def _loss_logits(spec: Spec, out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if spec.output == "dict":
        return out["loss"], out["logits"]
    if spec.output == "tuple":
        return out
    return out, None


# ----------------------------------------------------------------------------- evaluation
def evaluate_spec(spec: Spec, group: dist.ProcessGroup, backend: str) -> dict[str, Any]:
    """This rank's outcome of one example: ``{"kind", "detail", "gathered"}``."""
    import autosp

    torch._dynamo.reset()  # a fresh cache per example (see fuzz_group for the recompile limit)
    torch.manual_seed(spec.seed)
    model = FuzzLM(spec)
    ref = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parallel = autosp.parallelize(
                model,
                group=group,
                backend=backend,
                attention=spec.attention,
                load_balance=spec.load_balance,
                recognise_masks=spec.recognise_masks,
                tile_mlp=True if spec.tile_mlp else "auto",
                mlp_chunk_tokens=3,
                recompute=spec.recompute,
                return_logits=True,  # compared below; the loss is chunked all the same
            )
            errors = []
            for batch, seq in spec.steps:
                errors.append(_step(spec, batch, seq, model, ref, parallel))
                model.zero_grad(set_to_none=True)
                ref.zero_grad(set_to_none=True)
        except autosp.AutoSPError as err:
            return {"kind": "refused", "detail": str(err).splitlines()[0][:300], "gathered": []}
        except Exception as err:  # noqa: BLE001 - every other exception is a finding
            tb = traceback.format_exc(limit=-4)
            return {"kind": "crash", "detail": f"{type(err).__name__}: {err}"[:600], "tb": tb}
    gathered = sorted({op for plan in parallel.plans for op in plan.gathered_ops})
    named = {op for op in gathered if any(f"autosp: op '{op}'" in str(w.message) for w in caught)}
    problems = [e for e in errors if e]
    if not parallel.plans:
        problems.append("no compiled plan: the model ran without autosp")
    if set(gathered) - named:
        problems.append(f"gathered ops without a warning: {sorted(set(gathered) - named)}")
    if problems:
        kind = "silent" if not parallel.plans or set(gathered) - named else "mismatch"
        return {"kind": kind, "detail": "; ".join(problems)[:600], "gathered": gathered}
    kind = "ran" if spec.dropout else "gathered" if gathered else "exact"
    return {"kind": kind, "detail": "", "gathered": gathered}


def _step(
    spec: Spec, batch: int, seq: int, model: nn.Module, ref: nn.Module, parallel: nn.Module
) -> str:
    """One forward and backward of both models; '' when they agree, else what differs."""
    import autosp

    inputs = make_inputs(spec, batch, seq)
    torch.manual_seed(batch * 1000 + seq)
    ref_loss, ref_logits = _loss_logits(spec, _call(ref, spec, inputs))
    ref_loss.backward()
    torch.manual_seed(batch * 1000 + seq)
    loss, logits = _loss_logits(spec, _call(parallel, spec, inputs))
    loss.backward()
    losses = [torch.zeros(()) for _ in range(dist.get_world_size())]
    dist.all_gather(losses, loss.detach(), group=parallel.group)
    if any(not torch.equal(x, losses[0]) for x in losses):
        return f"step {batch}x{seq}: loss differs across ranks {[x.item() for x in losses]}"
    loss_err = abs(loss.item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-12)
    grads = grad_errors(model, ref)
    if spec.dropout:
        finite = math.isfinite(loss.item()) and all(map(math.isfinite, grads.values()))
        with torch.no_grad():
            torch.manual_seed(batch * 1000 + seq + 1)  # other draws, the same model
            other, _ = _loss_logits(spec, _call(ref, spec, inputs))
        spread = abs(other.item() - ref_loss.item())
        off = abs(loss.item() - ref_loss.item())
        if not finite or (loss_err > DROPOUT_LOSS_TOL and off > DROPOUT_SPREAD * spread):
            what = f"loss {loss.item()} vs {ref_loss.item()} (spread {spread:.3g}), finite {finite}"
            return f"step {batch}x{seq}: dropout: {what}"
        return ""
    found = []
    if not loss_err <= LOSS_TOL:
        found.append(
            f"step {batch}x{seq}: loss {loss.item():.6g} vs {ref_loss.item():.6g} ({loss_err:.2e})"
        )
    bad = {n for n, e in grads.items() if not e <= GRAD_TOL}
    if bad:
        bad -= _within_fp32_noise(spec, inputs, batch * 1000 + seq, model, ref)
        grads = {n: e for n, e in grads.items() if n in bad} or {"": 0.0}
    worst = max(grads.items(), key=lambda kv: kv[1])
    if not worst[1] <= GRAD_TOL:
        bad = sorted(bad, key=grads.get)
        found.append(
            f"step {batch}x{seq}: grad {worst[0]} rel err {worst[1]:.2e} ({len(bad)} bad: {bad})"
        )
    if logits is not None:
        try:
            full = autosp.gather_sequence(logits)
        except autosp.AutoSPError:  # not sequence-sharded: must be the whole logits
            full = logits
        err = math.inf
        if full.shape == ref_logits.shape:
            scale = ref_logits.abs().max().clamp(min=1)
            err = ((full - ref_logits).abs().max() / scale).item()
        if not err <= LOGITS_TOL:
            found.append(f"step {batch}x{seq}: logits rel. max err {err:.2e} ({tuple(full.shape)})")
    return "; ".join(found)


def _within_fp32_noise(
    spec: Spec, inputs: dict[str, Any], seed: int, model: nn.Module, ref: nn.Module
) -> set[str]:
    """The parameters whose gradient is as close to an fp64 single process's as fp32 allows:
    error against it at most FP32_NOISE times the fp32 single process's own."""
    exact = copy.deepcopy(ref).double()
    exact.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, _ = _loss_logits(spec, _call(exact, spec, inputs))
    loss.backward()
    ours, theirs = (grad_errors(m, exact) for m in (model, ref))
    return {n for n, e in ours.items() if e <= FP32_NOISE * theirs[n]}


def fuzz_group(specs_: list[Spec], results_path: str, backend: str, deadline: float) -> None:
    """Evaluate ``specs_`` in order on this group; rank 0 appends one JSON line per example.

    Stops at the first example whose ranks crashed or disagree (the group may be out of step;
    the parent starts a fresh group for the rest), or after ``deadline`` (``time.time()``).
    Collectives run on a subgroup with a timeout so that ranks that diverged fail instead of
    waiting forever.
    """
    # Every FuzzLM shares forward's code object, and each parallelize() brings a new backend:
    # the 9th model in one process would raise FailOnRecompileLimitHit (fullgraph=True; loud,
    # not an eager fallback). evaluate_spec resets Dynamo's cache per example instead.
    rank = dist.get_rank()
    group = dist.new_group(timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    for spec in specs_:
        start = time.monotonic()
        outcome = evaluate_spec(spec, group, backend)
        outcomes: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, (outcome, time.time() > deadline))
        late = any(late for _, late in outcomes)
        outcomes = [outcome for outcome, _ in outcomes]
        merged = _merge(outcomes)
        if rank == 0:
            merged.update(spec=repr(spec), seconds=round(time.monotonic() - start, 1))
            with open(results_path, "a") as f:
                f.write(json.dumps(merged) + "\n")
        if merged["kind"] in ("crash", "disagree") or late:
            return


def _merge(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """One outcome for the group: the first bad rank's, or 'disagree' if kinds differ."""
    kinds = [o["kind"] for o in outcomes]
    for o in outcomes:
        if o["kind"] not in GOOD:
            return dict(o)
    if len(set(kinds)) > 1:
        details = [f"rank {r}: {o['kind']} {o['detail'][:150]}" for r, o in enumerate(outcomes)]
        return {"kind": "disagree", "detail": " | ".join(details), "gathered": []}
    return dict(outcomes[0])


def run_specs(
    specs_: Iterable[Spec],
    backend: str = BACKEND,
    deadline: float = math.inf,
    per_example_s: float = 90,
) -> list[dict[str, Any]]:
    """Outcomes of ``specs_`` (in order per degree), one group per degree, until ``deadline``
    (``time.time()``); a group that dies or hangs records a 'hang' for the example it was on
    and restarts after it."""
    from tests.multirank import RankError, run_ranks

    by_world: dict[int, list[Spec]] = {}
    for spec in specs_:
        by_world.setdefault(spec.world, []).append(spec)
    results: list[dict[str, Any]] = []
    for world, todo in sorted(by_world.items()):
        while todo and time.time() < deadline:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "results.jsonl")
                open(path, "w").close()
                failure = ""
                try:
                    run_ranks(
                        world,
                        fuzz_group,
                        todo,
                        path,
                        backend,
                        deadline,
                        timeout=60 + per_example_s * len(todo),
                    )
                except RankError as err:
                    failure = f"{err.type_name}: {err.message}"[:600]
                with open(path) as f:
                    done = [json.loads(line) for line in f]
            results.extend(done)
            for bad in failures(done):
                logger.info("FAIL %s: %s\n  %s", bad["kind"], bad["detail"], bad["spec"])
            todo = todo[len(done) :]
            if todo and failure:
                results.append({"kind": "hang", "detail": failure, "spec": repr(todo[0])})
                todo = todo[1:]
    return results


SIMPLEST = Spec()
"""What ``shrink`` moves each field towards."""


def _simpler(spec: Spec) -> list[Spec]:
    """Valid specs that differ from ``spec`` in one field, each a step towards SIMPLEST."""
    steps = []
    for f in dataclasses.fields(Spec):
        value, target = getattr(spec, f.name), getattr(SIMPLEST, f.name)
        if f.name == "steps":
            options = [(step,) for step in value] if len(value) > 1 else []
        elif f.name == "kv_heads":
            options = [spec.heads]
        elif f.name == "heads":
            options = [h for h in (1, 2, spec.kv_heads) if h < value]
        else:
            options = [target] if value != target else []
        for option in options:
            if option == value:
                continue
            changes = {f.name: option}
            if f.name == "heads":
                changes["kv_heads"] = min(spec.kv_heads, option)
            try:
                steps.append(dataclasses.replace(spec, **changes))
            except ValueError:
                continue
    return steps


def shrink(spec: Spec, backend: str = BACKEND, rounds: int = 4) -> Spec:
    """A simpler spec that fails the same way (same kind), greedily: each round evaluates every
    one-field simplification at once and keeps the one that fails with the fewest features."""
    kind = run_specs([spec], backend)[0]["kind"]
    for _ in range(rounds):
        candidates = _simpler(spec)
        if not candidates:
            break
        results = {r["spec"]: r["kind"] for r in run_specs(candidates, backend)}
        still = [c for c in candidates if results.get(repr(c)) == kind]
        if not still:
            break
        spec = min(still, key=lambda c: len(features(c) - features(SIMPLEST)))
        logger.info("shrunk to %r", spec)
    return spec


def is_known_gap(spec: Spec) -> bool:
    return bool(features(spec) & KNOWN_GAPS.keys())


def failures(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results that break the contract, with ``known`` set for KNOWN_GAPS features."""
    bad = []
    for result in results:
        if result["kind"] not in GOOD:
            bad.append({**result, "known": is_known_gap(parse_spec(result["spec"]))})
    return bad


def parse_spec(text: str) -> Spec:
    """The ``Spec`` written by its ``repr``."""
    return eval(text, {"__builtins__": {}}, {"Spec": Spec})  # noqa: S307 - a repr we wrote


def summary(results: list[dict[str, Any]]) -> str:
    """Counts by outcome, gathered ops and refusal messages, then every failure in full."""
    lines = [f"{len(results)} examples: {dict(Counter(r['kind'] for r in results))}"]
    ops = Counter(op for r in results for op in r.get("gathered", []))
    if ops:
        lines.append(f"gathered ops: {dict(ops)}")
    refusals = Counter(r["detail"][:120] for r in results if r["kind"] == "refused")
    lines += [f"refused x{n}: {msg}" for msg, n in refusals.most_common()]
    for bad in failures(results):
        known = " (known gap)" if bad["known"] else ""
        lines.append(f"FAIL {bad['kind']}{known}: {bad['detail']}")
        lines.append(f'  repro: python -m tests.fuzz --spec "{bad["spec"]}"')
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="time budget")
    parser.add_argument("--seed", type=int, default=0, help="first hypothesis seed")
    parser.add_argument("--batch", type=int, default=24, help="examples drawn per seed")
    parser.add_argument("--spec", help="run one Spec(...) repr and print its outcome")
    parser.add_argument("--backend", default=BACKEND, choices=("eager", "aot_eager", "inductor"))
    parser.add_argument("--out", help="append every result as a JSON line to this file")
    parser.add_argument("--shrink", action="store_true", help="shrink failing examples")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.spec:
        spec = parse_spec(args.spec)
        results = run_specs([spec], args.backend)
        if results and results[0].get("tb"):
            logger.info(results[0]["tb"])
        logger.info(summary(results))
        if args.shrink and failures(results):
            logger.info("shrunk: %r", shrink(spec, args.backend))
        return int(bool(failures(results)))
    deadline = time.time() + 60 * args.minutes
    results: list[dict[str, Any]] = []
    seed = args.seed
    while time.time() < deadline:
        batch = run_specs(draw_specs(args.batch, seed), args.backend, deadline)
        results += batch
        if args.out:
            with open(args.out, "a") as f:
                f.writelines(json.dumps({**r, "seed": seed}) + "\n" for r in batch)
        logger.info("seed %d: %s", seed, summary(batch))
        seed += 1
    logger.info("TOTAL seeds %d..%d\n%s", args.seed, seed - 1, summary(results))
    for bad in failures(results) if args.shrink else []:
        logger.info("%s shrunk: %r", bad["kind"], shrink(parse_spec(bad["spec"]), args.backend))
    return int(any(not bad["known"] for bad in failures(results)))


if __name__ == "__main__":
    raise SystemExit(main())
