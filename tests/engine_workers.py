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


def make_optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    """AdamW at LR, or plain SGD (its update is linear in the gradient: a clipping scale
    error shows as is, where Adam's normalisation would hide it)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=10 * LR)
    return torch.optim.AdamW(params, lr=LR)


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

    def __init__(self, model: torch.nn.Module, clip: float = 0.0, opt: str = "adamw") -> None:
        self.model = copy.deepcopy(model)
        self.opt = make_optimizer(opt, self.model.parameters())
        self.clip = clip
        self.norm = 0.0
        """The gradient norm of the last step (before clipping)."""

    def step(self, micro_batches: list[torch.Tensor]) -> float:
        """One optimizer step on the mean loss of ``micro_batches``; returns that mean."""
        total = 0.0
        for ids in micro_batches:
            loss = self.model(input_ids=ids, labels=ids)["loss"] / len(micro_batches)
            loss.backward()
            total += loss.item()
        max_norm = self.clip or float("inf")  # inf: the norm, and the gradients times 1.0
        self.norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
        self.opt.step()
        self.opt.zero_grad()
        return total

    def params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters()}


def param_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The worst ||p - p_ref|| / ||p_ref|| over the parameters (names must match)."""
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    return max(((got[n] - want[n]).norm() / want[n].norm()).item() for n in want)


def fsdp_steps(sp: int, steps: int, family: str = "llama") -> list[dict[str, Any]]:
    """``steps`` AdamW steps under FSDP2 x autosp; per step the mean loss over dp, the
    gradient norm and the worst relative error of the full (gathered) parameters against one
    process (AdamW's update hardly depends on the gradients' scale: the norm checks it)."""
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
        norm = sharded_grad_norm(sharded)
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        want = ref.step([ids])
        got = get_model_state_dict(sharded, options=full)
        history.append(
            {
                "loss": mean.item() / dist.get_world_size(),
                "ref": want,
                "param_rel_err": param_errors(got, ref.params()),
                "norm": norm,
                "ref_norm": ref.norm,
            }
        )
    return history


def sharded_grad_norm(model: torch.nn.Module) -> float:
    """The global gradient norm from each rank's disjoint DTensor gradient shards."""
    squares = sum((p.grad.to_local().double() ** 2).sum() for p in model.parameters())
    dist.all_reduce(squares)
    return squares.sqrt().item()


def ds_config(
    stage: int, sp: int, clip: float = 0.0, gradient_accumulation_steps: int = 1
) -> dict[str, Any]:
    """A DeepSpeed config for ZeRO ``stage`` with autosp's section (fp32; DeepSpeed's own
    default clips the gradient norm at 1.0, so ``clip`` is always written)."""
    return {
        "train_micro_batch_size_per_gpu": BATCH_PER_GROUP,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "autosp": {"sp_size": sp, "backend": BACKEND},
    }


def _deepspeed_env() -> None:
    """What a launcher sets and DeepSpeed reads: the CPU accelerator and each rank's ids (one
    host, so the local rank is the rank)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    rank, world = dist.get_rank(), dist.get_world_size()
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))


def deepspeed_steps(
    stage: int, sp: int, steps: int, clip: float = 0.0, opt: str = "adamw", accum: int = 1
) -> list[dict]:
    """``steps`` optimizer steps of a DeepSpeed ZeRO ``stage`` engine around autosp, each over
    ``accum`` micro-batches (gradient norm clipped at ``clip`` if positive); per step the mean
    loss over dp and micro-batches and the worst relative error of the full parameters."""
    from autosp.integrations import deepspeed as ds

    _deepspeed_env()
    model = build("llama")
    ref = Reference(model, clip, opt)
    config = ds_config(stage, sp, clip, gradient_accumulation_steps=accum)
    optimizer = make_optimizer(opt, model.parameters())
    engine, _, _, _ = ds.initialize(model=model, optimizer=optimizer, config=config)
    mesh = engine.mpu.mesh
    history = []
    for step in range(steps):
        micro = [global_batch(mesh["dp"].size(), step * accum + k) for k in range(accum)]
        mean = torch.zeros(())
        for ids in micro:
            mine = split_batch(ids, mesh)
            loss = engine(input_ids=mine, labels=mine)["loss"]
            engine.backward(loss)  # scales by 1 / accum
            engine.step()  # steps at the accumulation boundary only
            mean += loss.detach() / accum
        dist.all_reduce(mean)
        want = ref.step(micro)
        got = {n: p.detach() for n, p in engine.module.module.named_parameters()}
        history.append(
            {
                "loss": mean.item() / dist.get_world_size(),
                "ref": want,
                "param_rel_err": param_errors(got, ref.params()),
                "norm": float(engine.get_global_grad_norm()),
                "ref_norm": ref.norm,
            }
        )
    return history


def fsdp_mixed_precision(sp: int) -> dict[str, Any]:
    """One backward under FSDP2 with bf16 parameters and fp32 reduction: the loss and the
    gradient shards' relative errors against the fp32 single process."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from autosp.integrations import fsdp

    mesh = sequence_parallel_mesh(sp)
    model = build("llama")
    ref = copy.deepcopy(model)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    sharded = fsdp.shard(model, mesh, mp_policy=policy, backend=BACKEND)
    ids = global_batch(mesh["dp"].size(), 0)
    mine = split_batch(ids, mesh)
    loss = sharded(input_ids=mine, labels=mine)["loss"]
    loss.backward()
    mean = loss.detach().float()
    dist.all_reduce(mean)
    want = ref(input_ids=ids, labels=ids)["loss"]
    want.backward()
    grads = dict(ref.named_parameters())
    errors, dtypes = {}, set()
    for name, p in sharded.named_parameters():
        got, q = p.grad.full_tensor(), grads[name.removeprefix("module.")].grad
        errors[name] = ((got - q).norm() / q.norm()).item()
        dtypes.add(str(p.grad.dtype))
    return {
        "loss_rel_err": abs(mean.item() / dist.get_world_size() - want.item()) / want.item(),
        "grad_dtypes": sorted(dtypes),
        "worst_grad_rel_err": max(errors.values()),
    }


def fsdp_checkpoint(sp: int) -> dict[str, Any]:
    """Full state dicts across layouts (torch.distributed.checkpoint.state_dict): the sharded
    model's loads into a plain model, a plain model's loads into the sharded one (through
    ``sharded.module``, whose names are the plain model's)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    from autosp.integrations import fsdp

    mesh = sequence_parallel_mesh(sp)
    sharded = fsdp.shard(build("llama", seed=0), mesh, backend=BACKEND)
    full = StateDictOptions(full_state_dict=True)
    plain = build("llama", seed=5)
    plain.load_state_dict(get_model_state_dict(sharded.module, options=full))
    saved = build("llama", seed=0).state_dict()
    to_plain = max((plain.state_dict()[k] - v).abs().max().item() for k, v in saved.items())
    other = build("llama", seed=7)
    set_model_state_dict(sharded.module, other.state_dict(), options=full)
    back = get_model_state_dict(sharded.module, options=full)
    to_sharded = max((back[k] - v).abs().max().item() for k, v in other.state_dict().items())
    ids = global_batch(mesh["dp"].size(), 0)
    mine = split_batch(ids, mesh)
    loss = sharded(input_ids=mine, labels=mine)["loss"].detach()
    dist.all_reduce(loss)
    want = other(input_ids=ids, labels=ids)["loss"].item()
    return {
        "keys_match": sorted(back) == sorted(other.state_dict()),
        "to_plain_max_err": to_plain,
        "to_sharded_max_err": to_sharded,
        "loss_rel_err": abs(loss.item() / dist.get_world_size() - want) / want,
    }


def refusals(cases: list[tuple[str, str]]) -> dict[str, str]:
    """``refused`` for each ``(engine, case)``, by ``"engine/case"``."""
    return {f"{engine}/{case}": refused(engine, case) for engine, case in cases}


def refused(engine: str, case: str) -> str:
    """The AutoSPError text for a combination that cannot work (``engine`` ``"fsdp"`` or
    ``"deepspeed"``); fails if nothing is raised."""
    from torch.distributed.fsdp import fully_shard

    from autosp.errors import AutoSPError

    mesh = sequence_parallel_mesh(2)
    model = build("plain_gpt")
    try:
        if engine == "fsdp":
            from autosp.integrations import fsdp

            if case == "fully_shard_inside":
                fully_shard(model.blocks[0], mesh=mesh["dp", "sp"]._flatten("dp_sp"))
                autosp.parallelize(model, group=mesh["sp"], backend=BACKEND)
            elif case == "fully_shard_by_hand":
                sp_model = autosp.parallelize(model, group=mesh["sp"], backend=BACKEND)
                fully_shard(sp_model, mesh=mesh["dp", "sp"]._flatten("dp_sp"))
                ids = global_batch(2, 0)
                sp_model(input_ids=ids[:1], labels=ids[:1])
            elif case == "sync_grads":
                fsdp.shard(model, mesh, sync_grads=True)
            elif case == "parallelized":
                fsdp.shard(autosp.parallelize(model, group=mesh["sp"]), mesh)
        else:
            from autosp.integrations import deepspeed as ds

            _deepspeed_env()
            config = {"zero_optimization": {"stage": 1}, "autosp": {"sp_size": 2}}
            kwargs = {}
            if case == "no_section":
                del config["autosp"]
            elif case == "sp_not_dividing":
                config["autosp"]["sp_size"] = 3
            elif case == "own_sequence_parallel":
                config["sequence_parallel_size"] = 2
            elif case == "sync_grads":
                config["autosp"]["sync_grads"] = True
            elif case == "stage3":
                config["zero_optimization"]["stage"] = 3
            elif case == "mpu":
                kwargs["mpu"] = object()
            ds.initialize(model=model, config=config, **kwargs)
    except AutoSPError as err:
        return str(err)
    raise AssertionError(f"{engine} {case}: no AutoSPError")
