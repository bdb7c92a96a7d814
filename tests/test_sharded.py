"""Parameters sharded over a dp 2 x sp 2 mesh (4 gloo ranks) and gathered in autosp's graph:
parameters after clipped AdamW steps equal one process's on the concatenated batch, every
gather is repeated in the backward (no parameter saved whole), bf16 gathers, state dicts
across layouts, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from autosp.compiler.regather import GATHER, regathered
from tests.multirank import run_ranks
from tests.sharded_workers import sharded_bf16, sharded_checkpoint, sharded_refusals, sharded_steps
from tests.test_engines import BF16_TOL, FP32_NOISE, LOSS_TOL, PARAM_TOL, STATE_TOL, check_history

WORLD, SP = 4, 2
CLIP = 0.5  # below the first steps' gradient norm (~2-3): clipping scales every step


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_clipped_adamw_steps_match_single_process(family: str) -> None:
    """Three steps; gemma ties its embedding and head (one shard, read twice) and adds 1 to
    its norm weights (ops on the gathered parameter before its use)."""
    per_rank = run_ranks(WORLD, sharded_steps, SP, 3, family, CLIP)
    check_history(per_rank, 3, PARAM_TOL)
    first = per_rank[0][0]
    assert first["ref_norm"] > CLIP  # clipping ran
    reads = first["tensors"] + (family == "gemma")  # the tied weight is read twice
    assert first["shards"] == first["tensors"]
    # Each read's backward reduce-scatters its gradient into the shard ...
    assert first["backward"]["reduce_scatter"] == reads, first
    # ... and every parameter the backward needs is gathered again, not saved: the 2 x 7
    # linear weights and 2 x 2 + 1 norm weights (the embedding's backward needs no weight;
    # the chunked loss makes the head's gradient in the forward).
    assert first["backward"]["all_gather"] == 19, first
    # One gather per read in the forward (the tied weight's two reads share one).
    assert first["forward"]["all_gather"] == first["tensors"], first


def test_bf16_gathers() -> None:
    for result in run_ranks(WORLD, sharded_bf16, SP):
        assert result["grad_dtypes"] == ["torch.float32"]  # the shards' own dtype
        assert result["loss_rel_err"] <= BF16_TOL, result
        # bf16 really ran (fp32 gives ~1e-6); a reduction off by the degree would give >= 0.5.
        assert FP32_NOISE < result["worst_grad_rel_err"] <= BF16_TOL, result


def test_state_dict_round_trip() -> None:
    for result in run_ranks(WORLD, sharded_checkpoint, SP):
        assert result["keys_match"]
        assert result["to_plain_max_err"] <= STATE_TOL
        assert result["to_sharded_max_err"] <= STATE_TOL
        assert result["loss_rel_err"] <= LOSS_TOL, result
        assert "missing ['lm_head.weight'" in result["mismatch"], result["mismatch"]


def test_refusals() -> None:
    texts = run_ranks(WORLD, sharded_refusals, SP)[0]
    assert "needs the ('dp', 'sp') mesh" in texts["sp_only_mesh"]
    assert "already wrapped. Pass the plain model" in texts["parallelized"]
    assert "sync_grads=True cannot be used with sharded parameters" in texts["sync_grads"]
    assert "needs a model without parametrizations" in texts["twice"]
    assert "are not sharded by autosp.integrations.sharded.shard()" in texts["not_sharded"]


def test_only_inputs_read_by_nothing_but_a_gather_are_gathered_again() -> None:
    """The pass's proof: a gathered input that another op reads, or that a chain writes, is
    left to the partitioner (its gather saved, as any collective)."""
    graph = fx.Graph()
    shard, tokens, read, written = (graph.placeholder(n) for n in ("shard", "x", "read", "w"))
    cast = graph.call_method("to", (shard, torch.bfloat16))
    full = graph.call_method("narrow", (graph.call_function(GATHER, (cast, 0, "g")), 0, 0, 3))
    used = graph.call_function(torch.matmul, (tokens, full))
    also = graph.call_function(torch.add, (read, tokens))  # `read` has another reader
    other = graph.call_function(GATHER, (read, 0, "g"))
    scaled = graph.call_method("mul_", (written, 2.0))  # a write into `w` before its gather
    third = graph.call_function(GATHER, (scaled, 0, "g"))
    graph.output((used, also, other, third))
    tagged = regathered(fx.GraphModule(torch.nn.Module(), graph))
    assert [n.name for n in tagged] == ["to", "all_gather_default", "narrow"]
