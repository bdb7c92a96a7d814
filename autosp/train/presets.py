"""Built-in Llama presets over a byte-level vocabulary, and loading local model folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, LlamaConfig, PretrainedConfig

BYTE_VOCAB = 256
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 264  # 256 bytes + 3 special tokens, padded to a multiple of 8

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "small": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
}


def model_config(model: str) -> PretrainedConfig:
    """Config for a preset name or a local HF model folder (a folder holding config.json)."""
    if model in PRESETS:
        return LlamaConfig(
            vocab_size=VOCAB_SIZE,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            max_position_embeddings=131072,
            attn_implementation="sdpa",
            use_cache=False,
            **PRESETS[model],
        )
    if not (Path(model) / "config.json").is_file():
        raise ValueError(
            f"unknown model {model!r}: expected a preset ({', '.join(PRESETS)}) "
            "or a folder holding config.json"
        )
    config = AutoConfig.from_pretrained(model, attn_implementation="sdpa", use_cache=False)
    if config.vocab_size < BYTE_VOCAB:
        raise ValueError(f"{model}: vocab_size {config.vocab_size} < {BYTE_VOCAB} byte tokens")
    return config
