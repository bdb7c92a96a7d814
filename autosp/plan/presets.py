"""Model shapes ``autosp plan`` knows by name, as Hugging Face config fields (no download)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, LlamaConfig, PretrainedConfig, Qwen2Config

from autosp.errors import AutoSPError

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
}

PRESETS: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "llama-3.2-1b": (
        LlamaConfig,
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            rms_norm_eps=1e-5,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
            tie_word_embeddings=True,
        ),
    ),
    "llama-3.1-8b": (
        LlamaConfig,
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            rms_norm_eps=1e-5,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
            tie_word_embeddings=False,
        ),
    ),
    "qwen2.5-7b": (
        Qwen2Config,
        dict(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            rms_norm_eps=1e-6,
            max_position_embeddings=131072,
            rope_theta=1000000.0,
            use_sliding_window=False,
            tie_word_embeddings=False,
        ),
    ),
}
"""The published configs' shape fields (``config.json`` of each model on the Hugging Face
hub), written here so planning needs no download."""


def plan_config(model: str, num_layers: int | None = None) -> PretrainedConfig:
    """The config of a preset (``PRESETS``, or the training presets ``tiny``/``small``) or of
    a local model folder holding ``config.json``; ``num_layers`` overrides the layer count."""
    from autosp.train.presets import PRESETS as TRAIN_PRESETS
    from autosp.train.presets import model_config

    options: dict[str, Any] = {"attn_implementation": "sdpa", "use_cache": False}
    if model in PRESETS:
        kind, fields = PRESETS[model]
        config = kind(**fields, **options)
    elif model in TRAIN_PRESETS:
        config = model_config(model)
    elif (Path(model) / "config.json").is_file():
        config = AutoConfig.from_pretrained(model, **options)
    else:
        names = ", ".join([*PRESETS, *TRAIN_PRESETS])
        raise AutoSPError(
            f"autosp plan: unknown model {model!r}: give a preset ({names}) or a local Hugging "
            "Face model folder holding config.json"
        )
    if num_layers is not None:
        if num_layers < 1:
            raise AutoSPError(f"autosp plan: --num-layers must be at least 1, got {num_layers}")
        config.num_hidden_layers = num_layers
        if types := getattr(config, "layer_types", None):
            config.layer_types = [types[i % len(types)] for i in range(num_layers)]
    return config
