"""Tiny random-init models for the parity tests: Hugging Face families and a plain GPT."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 96


def _hf(config_cls: str, model_cls: str, **kwargs: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        options = {"attn_implementation": "sdpa", **kwargs}
        config = getattr(transformers, config_cls)(vocab_size=VOCAB, use_cache=False, **options)
        return getattr(transformers, model_cls)(config)

    return build


def _nonzero_biases(model: nn.Module) -> nn.Module:
    """``model`` with its zero-initialised biases drawn at random, so that a bias dropped from
    the computation changes the loss (GptOss's expert biases start at zero)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and not p.any():
                p.normal_(0.0, 0.1)
    return model


COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)

HF_FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "llama": _hf(
        "LlamaConfig", "LlamaForCausalLM", num_attention_heads=4, num_key_value_heads=2, **COMMON
    ),
    "qwen2": _hf(
        "Qwen2Config", "Qwen2ForCausalLM", num_attention_heads=4, num_key_value_heads=2, **COMMON
    ),
    "mistral": _hf(
        "MistralConfig",
        "MistralForCausalLM",
        num_attention_heads=4,
        num_key_value_heads=4,
        sliding_window=None,
        **COMMON,
    ),
    "gemma": _hf(
        "GemmaConfig",
        "GemmaForCausalLM",
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        **COMMON,
    ),
    "gpt2": _hf(
        "GPT2Config",
        "GPT2LMHeadModel",
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    ),
}


class PlainAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int | None = None) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, (heads + 2 * self.kv_heads) * self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        sizes = [self.heads * self.head_dim] + [self.kv_heads * self.head_dim] * 2
        q, k, v = self.qkv(x).split(sizes, dim=-1)
        q = q.view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = (t.view(b, s, self.kv_heads, self.head_dim).transpose(1, 2) for t in (k, v))
        gqa = self.kv_heads != self.heads
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.proj(out.transpose(1, 2).reshape(b, s, d))


class PlainBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int | None = None) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = PlainAttention(dim, heads, kv_heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class PlainGPT(nn.Module):
    """A GPT written in plain PyTorch: learned positions, its own shifted loss."""

    def __init__(
        self,
        vocab: int = VOCAB,
        dim: int = 64,
        heads: int = 4,
        layers: int = 2,
        kv_heads: int | None = None,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(512, dim)
        self.blocks = nn.ModuleList(PlainBlock(dim, heads, kv_heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(dim))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tok(input_ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            )
        return out


FAMILIES: dict[str, Callable[[], nn.Module]] = {**HF_FAMILIES, "plain_gpt": PlainGPT}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FAMILIES[name]()


class NoAttentionLM(nn.Module):
    """Embeddings and an MLP: nothing to parallelise along the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, 32)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.head(torch.tanh(self.tok(input_ids)))
        return {"logits": logits, "loss": F.cross_entropy(logits.flatten(0, 1), labels.flatten())}


class NoLossGPT(PlainGPT):
    """Accepts labels but never computes a loss."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        return {"logits": super().forward(input_ids)["logits"]}


class SeqFirstGPT(nn.Module):
    """A plain model whose activations are [sequence, batch, hidden] (sequence first)."""

    def __init__(self, vocab: int = VOCAB, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        x = self.tok(input_ids.t())  # [S, B, D]
        s, b, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (
            t.reshape(s, b, self.heads, d // self.heads).permute(1, 2, 0, 3) for t in (q, k, v)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, S, hd]
        x = x + self.proj(out.permute(2, 0, 1, 3).reshape(s, b, d))
        logits = self.head(x)  # [S, B, V]
        shifted = F.pad(labels, (0, 1), value=-100)[:, 1:].t()  # [S, B]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1))
        return {"logits": logits.transpose(0, 1), "loss": loss}


def _packed_positions(batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Three documents packed in each sequence: positions restart at each document."""
    cuts = [0, seq // 3, 2 * seq // 3, seq]
    pos = torch.cat([torch.arange(b - a) for a, b in zip(cuts, cuts[1:], strict=False)])
    return {"position_ids": pos.expand(batch, seq).contiguous()}


def _padding_mask(batch: int, seq: int) -> dict[str, torch.Tensor]:
    """The last three tokens of every sequence are padding."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[:, -3:] = 0
    return {"attention_mask": mask}


NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0)

EXTRA: dict[str, tuple[Callable[[], nn.Module], Callable[..., dict] | None]] = {
    # Architectures beyond the core list, each with something of its own.
    "olmo2": (
        _hf(
            "Olmo2Config",
            "Olmo2ForCausalLM",
            num_attention_heads=4,
            num_key_value_heads=2,
            **COMMON,
        ),
        None,
    ),
    "qwen3": (
        _hf(
            "Qwen3Config",
            "Qwen3ForCausalLM",
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            **COMMON,
        ),
        None,
    ),
    "granite": (
        _hf(
            "GraniteConfig",
            "GraniteForCausalLM",
            num_attention_heads=4,
            num_key_value_heads=2,
            **COMMON,
        ),
        None,
    ),
    "phi3": (
        _hf(
            "Phi3Config",
            "Phi3ForCausalLM",
            num_attention_heads=4,
            num_key_value_heads=4,
            pad_token_id=0,
            **COMMON,
        ),
        None,
    ),
    "gpt_neox_partial_rotary": (
        _hf(
            "GPTNeoXConfig",
            "GPTNeoXForCausalLM",
            num_attention_heads=4,
            rotary_pct=0.25,
            **NO_DROPOUT,
            **COMMON,
        ),
        None,
    ),
    # Masks: a sliding window shorter than the sequence, packed documents, a padding mask in a
    # bidirectional encoder with a masked-LM loss; a sequence-first plain model.
    "mistral_sliding_window": (
        _hf(
            "MistralConfig",
            "MistralForCausalLM",
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=4,
            **COMMON,
        ),
        None,
    ),
    # A window longer than the lengths a mask is first probed at (5, 8), shorter than the
    # sequence: it must not be taken for a causal mask.
    "mistral_window_10": (
        _hf(
            "MistralConfig",
            "MistralForCausalLM",
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=10,
            **COMMON,
        ),
        None,
    ),
    # 6 heads (head_dim 16) with a window: hybrid at SP=4 with a structured mask.
    "mistral_window_6_heads": (
        _hf(
            "MistralConfig",
            "MistralForCausalLM",
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            **COMMON,
        ),
        None,
    ),
    "llama_packed": (HF_FAMILIES["llama"], _packed_positions),
    "bert_padding": (
        _hf(
            "BertConfig",
            "BertForMaskedLM",
            num_attention_heads=4,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **COMMON,
        ),
        _padding_mask,
    ),
    "sequence_first": (SeqFirstGPT, None),
    # ALiBi position biases (Falcon with alibi=True): a per-head float bias on the scores.
    "falcon_alibi": (
        _hf(
            "FalconConfig",
            "FalconForCausalLM",
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            alibi=True,
            multi_query=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        ),
        None,
    ),
    # Attention written out (Hugging Face "eager"), with tanh soft-capping and alternating
    # sliding windows (Gemma-2).
    "llama_eager": (
        _hf(
            "LlamaConfig",
            "LlamaForCausalLM",
            num_attention_heads=4,
            num_key_value_heads=2,
            attn_implementation="eager",
            **COMMON,
        ),
        None,
    ),
    "gemma2_softcap": (
        _hf(
            "Gemma2Config",
            "Gemma2ForCausalLM",
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            attn_implementation="eager",
            **COMMON,
        ),
        None,
    ),
}


class PooledGPT(PlainGPT):
    """Adds a loss on the max over the sequence: a reduction autosp has no sharded rule for."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        out = super().forward(input_ids, labels)
        pooled = out["logits"].amax(dim=1)
        out["loss"] = out["loss"] + pooled.square().mean()
        return out


MOE_COMMON = dict(
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    router_aux_loss_coef=0.1,
)

MOE_FAMILIES: dict[str, Callable[..., nn.Module]] = {
    # Mixture-of-experts families (4 experts, top-2). Each builder takes ``aux``: whether the
    # router's load-balancing loss is added to the loss (``output_router_logits``).
    "mixtral": lambda aux: _hf(
        "MixtralConfig",
        "MixtralForCausalLM",
        num_local_experts=4,
        num_experts_per_tok=2,
        output_router_logits=aux,
        **MOE_COMMON,
    )(),
    "qwen3_moe": lambda aux: _hf(
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        head_dim=16,
        output_router_logits=aux,
        **MOE_COMMON,
    )(),
    # A shared expert with a sigmoid gate beside the routed ones.
    "qwen2_moe": lambda aux: _hf(
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        output_router_logits=aux,
        **MOE_COMMON,
    )(),
    "olmoe": lambda aux: _hf(
        "OlmoeConfig",
        "OlmoeForCausalLM",
        num_experts=4,
        num_experts_per_tok=2,
        output_router_logits=aux,
        eos_token_id=0,
        pad_token_id=1,
        **MOE_COMMON,
    )(),
    # Attention sinks (a learned logit per head joined to the softmax), written-out attention,
    # a router with a bias, experts with biases; full attention in both layers.
    "gpt_oss": lambda aux: _hf(
        "GptOssConfig",
        "GptOssForCausalLM",
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=16,
        layer_types=["full_attention", "full_attention"],
        attn_implementation="eager",
        output_router_logits=aux,
        **MOE_COMMON,
    )(),
}


class SinkAttention(PlainAttention):
    """Causal attention with sinks, written out as some recent open models do: a learned
    logit per head joins each row's softmax and its probability is dropped."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__(dim, heads)
        self.sinks = nn.Parameter(torch.randn(heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, s, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        future = torch.full((s, s), float("-inf"), device=x.device).triu(1)
        scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5 + future
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, s, -1)
        logits = torch.cat([scores, sinks], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = F.softmax(logits, dim=-1)[..., :-1]
        return self.proj((probs @ v).transpose(1, 2).reshape(b, s, d))


class SinkGPT(PlainGPT):
    """``PlainGPT`` whose attention has sinks."""

    def __init__(self) -> None:
        super().__init__()
        for block in self.blocks:
            block.attn = SinkAttention(64, 4)


class ScanMixer(nn.Module):
    """A causal linear-attention token mixer: a running sum of key-value outer products
    along the sequence (a scan), read by each query."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.elu(self.qkv(x)).chunk(3, dim=-1)
        q, k = q + 1, k + 1
        state = torch.cumsum(k.unsqueeze(-1) * v.unsqueeze(-2), dim=1)
        norm = torch.cumsum(k, dim=1)
        out = (q.unsqueeze(-2) @ state).squeeze(-2) / (q * norm).sum(-1, keepdim=True)
        return self.proj(out)


class ScanGPT(PlainGPT):
    """``PlainGPT`` whose first block mixes tokens with a linear-attention scan."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks[0].attn = ScanMixer(64)


MIXER_FAMILIES: dict[str, Callable[[], nn.Module]] = {
    # Attention sinks: written out (GptOss, with experts) and in a plain model.
    "gpt_oss": lambda: _nonzero_biases(MOE_FAMILIES["gpt_oss"](False)),
    "sink_gpt": SinkGPT,
    # Hybrid token mixers: short causal convolutions (LFM2) and a linear-attention scan.
    "lfm2": _hf(
        "Lfm2Config",
        "Lfm2ForCausalLM",
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["conv", "full_attention"],
        **COMMON,
    ),
    "scan_gpt": ScanGPT,
}
