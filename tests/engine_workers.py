"""Rank functions of tests/test_engines.py: FSDP2 and DeepSpeed ZeRO around autosp on a
``dp x sp`` mesh, each against one process training on the concatenated batch."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.distributed as dist

import autosp
from autosp.mesh import sequence_parallel_mesh, split_batch
from tests.models import VOCAB, build

BACKEND = "eager"
"""autosp's inner compiler here: the engines' reductions are under test, not the graph."""
LR = 1e-2
BATCH_PER_GROUP = 1
SEQ = 16


def global_batch(dp: int, step: int) -> torch.Tensor:
    """``dp * BATCH_PER_GROUP`` token rows, all labels valid: every data-parallel group has
    as many tokens as the others, so the mean of the groups' losses is the loss of one
    process on the concatenated batch."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (dp * BATCH_PER_GROUP, SEQ), generator=gen)


class Reference:
    """One process, the whole batch, the same AdamW."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = copy.deepcopy(model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR)

    def step(self, ids: torch.Tensor) -> float:
        loss = self.model(input_ids=ids, labels=ids)["loss"]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        return loss.item()

    def params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters()}


def param_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The worst ||p - p_ref|| / ||p_ref|| over the parameters (names must match)."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    return max(((got[n] - want[n]).norm() / want[n].norm()).item() for n in want)


def fsdp_steps(sp: int, steps: int, family: str = "plain_gpt") -> list[dict[str, Any]]:
    """``steps`` AdamW steps under FSDP2 x autosp; per step the mean loss over dp and the
    worst relative error of the full (gathered) parameters against one process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from autosp.integrations import fsdp

    mesh = sequence_parallel_mesh(sp)
    model = build(family)
    ref = Reference(model)
    sharded = fsdp.shard(model, mesh, backend=BACKEND)
    opt = torch.optim.AdamW(sharded.parameters(), lr=LR)
    full = StateDictOptions(full_state_dict=True)
    history = []
    for step in range(steps):
        ids = global_batch(mesh["dp"].size(), step)
        mine = split_batch(ids, mesh)
        loss = sharded(input_ids=mine, labels=mine)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        want = ref.step(ids)
        got = get_model_state_dict(sharded, options=full)
        history.append(
            {
                "loss": mean.item() / dist.get_world_size(),
                "ref": want,
                "param_rel_err": param_errors(got, ref.params()),
            }
        )
    return history


def debug_fsdp(sp: int) -> dict:
    from autosp.integrations import fsdp

    mesh = sequence_parallel_mesh(sp)
    model = build("plain_gpt")
    ref = copy.deepcopy(model)
    sharded = fsdp.shard(model, mesh, backend=BACKEND)
    ids = global_batch(mesh["dp"].size(), 0)
    mine = split_batch(ids, mesh)
    sharded(input_ids=mine, labels=mine)["loss"].backward()
    ref(input_ids=ids, labels=ids)["loss"].backward()
    out = {}
    for (n, p), q in zip(sharded.named_parameters(), ref.parameters()):
        g = p.grad.full_tensor()
        out[n] = (((g - q.grad).norm() / q.grad.norm().clamp(min=1e-12)).item(), (g.norm()/q.grad.norm()).item())
    return out
