"""Rank functions of tests/test_sharded.py: parameters sharded over ``dp x sp`` and gathered in
autosp's graph, against one process training on the concatenated batch."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist

import autosp
from autosp.comm.ops import count_collectives
from autosp.errors import AutoSPError
from autosp.integrations import sharded
from autosp.mesh import sequence_parallel_mesh, split_batch
from tests.engine_workers import LR, Reference, global_batch, param_errors
from tests.models import build

BACKEND = "aot_eager"
"""An AOTAutograd backend: its partitioner is what gathers the parameters again."""


def sharded_steps(sp: int, steps: int, family: str, clip: float) -> list[dict[str, Any]]:
    """``steps`` clipped AdamW steps; per step the mean loss over dp, the global gradient norm
    before clipping, the worst relative error of the full parameters against one process,
    and (first step) the collectives by op and the number of sharded parameters."""
    mesh = sequence_parallel_mesh(sp)
    model = build(family)
    ref = Reference(model, clip=clip)
    tensors = len(list(model.parameters()))
    model = sharded.shard(model, mesh, backend=BACKEND)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    history = []
    for step in range(steps):
        ids = global_batch(mesh["dp"].size(), step)
        mine = split_batch(ids, mesh)
        with count_collectives() as forward:
            loss = model(input_ids=mine, labels=mine)["loss"]
        with count_collectives() as backward:
            loss.backward()
        norm = sharded.clip_grad_norm_(model, clip).item()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        want = ref.step([ids])
        full = sharded.full_state_dict(model)  # a tied parameter under each of its names
        history.append(
            {
                "loss": mean.item() / dist.get_world_size(),
                "ref": want,
                "param_rel_err": param_errors({k: full[k] for k in ref.params()}, ref.params()),
                "norm": norm,
                "ref_norm": ref.norm,
                "forward": dict(forward),
                "backward": dict(backward),
                "tensors": tensors,
                "shards": len(list(model.parameters())),
            }
        )
    return history


def sharded_bf16(sp: int) -> dict[str, Any]:
    """One backward with bf16 gathers: the loss and the full gradients' relative errors
    against the fp32 single process, and the shards' gradient dtypes."""
    mesh = sequence_parallel_mesh(sp)
    model = build("llama")
    ref = copy.deepcopy(model)
    model = sharded.shard(model, mesh, param_dtype=torch.bfloat16, backend=BACKEND)
    ids = global_batch(mesh["dp"].size(), 0)
    mine = split_batch(ids, mesh)
    loss = model(input_ids=mine, labels=mine)["loss"]
    loss.backward()
    mean = loss.detach().float()
    dist.all_reduce(mean)
    want = ref(input_ids=ids, labels=ids)["loss"]
    want.backward()
    for p in model.parameters():  # the gradients, gathered like the parameters
        p.data = p.grad
    grads = sharded.full_state_dict(model)
    errors = {
        name: ((grads[name] - p.grad).norm() / p.grad.norm()).item()
        for name, p in ref.named_parameters()
    }
    return {
        "loss_rel_err": abs(mean.item() / dist.get_world_size() - want.item()) / want.item(),
        "grad_dtypes": sorted({str(p.grad.dtype) for p in model.parameters()}),
        "worst_grad_rel_err": max(errors.values()),
    }


def sharded_checkpoint(sp: int) -> dict[str, Any]:
    """Full state dicts across layouts: the sharded model's loads into a plain model, a plain
    model's loads into the sharded one, which then computes the plain model's loss."""
    mesh = sequence_parallel_mesh(sp)
    model = sharded.shard(build("llama", seed=0), mesh, backend=BACKEND)
    plain = build("llama", seed=5)
    plain.load_state_dict(sharded.full_state_dict(model))
    saved = build("llama", seed=0).state_dict()
    to_plain = max((plain.state_dict()[k] - v).abs().max().item() for k, v in saved.items())
    other = build("llama", seed=7)
    sharded.load_full_state_dict(model, other.state_dict())
    back = sharded.full_state_dict(model)
    to_sharded = max((back[k] - v).abs().max().item() for k, v in other.state_dict().items())
    ids = global_batch(mesh["dp"].size(), 0)
    mine = split_batch(ids, mesh)
    loss = model(input_ids=mine, labels=mine)["loss"].detach()
    dist.all_reduce(loss)
    want = other(input_ids=ids, labels=ids)["loss"].item()
    try:
        sharded.load_full_state_dict(model, {})
        mismatch = ""
    except AutoSPError as err:
        mismatch = str(err)
    return {
        "keys_match": sorted(back) == sorted(other.state_dict()),
        "to_plain_max_err": to_plain,
        "to_sharded_max_err": to_sharded,
        "loss_rel_err": abs(loss.item() / dist.get_world_size() - want) / want,
        "mismatch": mismatch,
    }


def sharded_refusals(sp: int) -> dict[str, str]:
    """The AutoSPError text of each combination shard() refuses."""
    mesh = sequence_parallel_mesh(sp)
    cases = {
        "sp_only_mesh": lambda: sharded.shard(build("llama"), mesh["sp"]),
        "parallelized": lambda: sharded.shard(autosp.parallelize(build("llama"), group=mesh), mesh),
        "sync_grads": lambda: sharded.shard(build("llama"), mesh, sync_grads=True),
        "twice": lambda: sharded.shard(sharded.shard(build("llama"), mesh).module, mesh),
        "not_sharded": lambda: sharded.clip_grad_norm_(
            autosp.parallelize(build("llama"), group=mesh), 1.0
        ),
    }
    texts = {}
    for name, make in cases.items():
        try:
            make()
            texts[name] = ""
        except AutoSPError as err:
            texts[name] = str(err)
    return texts
