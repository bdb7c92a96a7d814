"""Rank workers for tests/test_hardening.py: several models in one process, output forms,
schema-normalised arguments, Hugging Face defaults."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import autosp
from tests.models import VOCAB, PlainGPT
from tests.workers import BACKEND, grad_errors, make_batch


def _loss_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out["loss"]


def compare(model: nn.Module, options: dict[str, Any], batch: int = 2, seq: int = 13) -> dict:
    """Loss and gradient errors of ``model`` parallelized against one process, with the
    autosp warnings and gathered ops."""
    ref = copy.deepcopy(model)
    ids, labels = make_batch(batch, seq, seed=seq)
    expected = _loss_of(ref(input_ids=ids, labels=labels))
    expected.backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parallel = autosp.parallelize(model, backend=BACKEND, **options)
        loss = _loss_of(parallel(input_ids=ids, labels=labels))
        loss.backward()
    return {
        "loss_rel_err": abs(loss.item() - expected.item()) / abs(expected.item()),
        "grad_rel_err": max(grad_errors(model, ref).values()),
        "gathered_ops": sorted({op for p in parallel.plans for op in p.gathered_ops}),
        "warnings": [str(w.message) for w in caught if "autosp" in str(w.message)],
    }


def _hf_llama(hidden: int, use_cache: bool = False) -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=use_cache,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def several_models() -> list[dict]:
    """Models parallelized one after another in one process: head dims 16 and 32 (the
    attention scale changes, so Dynamo makes it a symbolic float), the first model's class
    again, and another architecture."""
    import transformers

    results = []
    for hidden in (64, 128, 64):
        results.append(compare(_hf_llama(hidden), {}))
    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
    )
    torch.manual_seed(0)
    results.append(compare(transformers.Qwen2ForCausalLM(config), {}))
    return results


def recompile_limit() -> str:
    """The message raised when parallelizing a class more often than Dynamo's recompile limit
    allows (each instance compiles the class's ``forward`` again)."""
    ids, labels = make_batch(1, 13, seed=0)
    with torch._dynamo.config.patch(recompile_limit=2):
        for _ in range(3):
            try:
                autosp.parallelize(PlainGPT(), backend=BACKEND)(input_ids=ids, labels=labels)
            except autosp.AutoSPError as err:
                return str(err)
    return "no error"


class TupleGPT(PlainGPT):
    """Returns ``(loss, logits)``."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple:
        out = super().forward(input_ids, labels)
        return out["loss"], out["logits"]


class LossOnlyGPT(PlainGPT):
    """Returns the bare loss tensor."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids, labels)["loss"]


class ClampedGPT(PlainGPT):
    """An activation written with binary ``torch.max`` / ``Tensor.min`` (leaky ReLU capped at
    6), between the blocks."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tok(input_ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
            x = torch.max(x, 0.1 * x).min(torch.full_like(x, 6.0))
        logits = self.head(self.norm(x))
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return {"loss": loss, "logits": logits}


def output_forms() -> dict[str, dict]:
    results = {}
    for cls in (TupleGPT, LossOnlyGPT, ClampedGPT):
        torch.manual_seed(0)
        results[cls.__name__] = compare(cls(), {})
    return results


def hf_default_cache() -> dict:
    """A Hugging Face training step with the default ``use_cache=True``."""
    return compare(_hf_llama(64, use_cache=True), {})
