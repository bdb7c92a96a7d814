"""Workers for the data-parallel tests: a ("dp", "sp") mesh of 2 x 2 gloo ranks, each DP group
taking its own sequences of a global batch, against one process on the whole batch."""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.nn.parallel import DistributedDataParallel

import autosp
from autosp.integrations.ddp import prepare_ddp, wrap_ddp
from autosp.mesh import sequence_parallel_mesh, split_batch
from tests.models import VOCAB, build
from tests.workers import grad_errors

BACKEND = "eager"  # the compiler is not under test here
SP = 2
SEQ = 16


def global_batch(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` sequences; each row has 4 ignored labels, at different places, so every row
    (every DP group's batch) has the same number of labelled tokens while the SP ranks of a
    row hold different numbers (Note [Layout of the mesh]: then the DP mean of the groups'
    losses is the loss of the whole batch)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=gen)
    labels = ids.clone()
    for row in range(rows):
        start = 2 + (7 * row) % (SEQ - 6)
        labels[row, start : start + 4] = -100
    return ids, labels


def _parallel(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``model`` on the dp 2 x sp 2 mesh: autosp's own reduction (``native``), from sizes
    (``sizes``), or under DDP (``ddp``)."""
    if mode == "sizes":
        return autosp.parallelize(model, sp_size=SP, backend=BACKEND)
    parallel = autosp.parallelize(model, mesh=sequence_parallel_mesh(SP), backend=BACKEND)
    return wrap_ddp(parallel) if mode == "ddp" else parallel


def _world_mean(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def train_steps(mode: str, family: str, steps: int) -> list[dict[str, Any]]:
    """``steps`` AdamW steps on dp 2 x sp 2 against one process on the 2-sequence batch: per
    step the DP mean of the losses, the gradient errors before the step, the parameter error
    after it, and the collectives of the backward."""
    model = build(family)
    ref = copy.deepcopy(model)
    parallel = _parallel(model, mode)
    mesh = sequence_parallel_mesh(SP)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    history = []
    for _ in range(steps):
        ids, labels = global_batch(2, seed=7)  # one batch: the loss must fall
        loss = parallel(input_ids=split_batch(ids, mesh), labels=split_batch(labels, mesh))["loss"]
        with autosp.count_collectives() as backward:
            loss.backward()
        expected = ref(input_ids=ids, labels=labels)["loss"]
        expected.backward()
        grad_err = max(grad_errors(model, ref).values())
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        param_err = max(
            ((p - q).norm() / q.norm()).item()
            for p, q in zip(model.parameters(), ref.parameters(), strict=True)
        )
        history.append(
            {
                "loss": _world_mean(loss.item()),
                "ref": expected.item(),
                "grad_rel_err": grad_err,
                "param_rel_err": param_err,
                "backward": dict(backward),
            }
        )
    return history


def accumulate(mode: str, deferred: bool) -> dict[str, Any]:
    """Two micro-batches of one sequence per DP group (4 sequences in all), each loss halved,
    then ``clip_grad_norm_``; the first micro-batch under ``no_sync()`` when ``deferred``.
    Returns the gradient errors after clipping, the norms and the backward collectives."""
    model = build("plain_gpt")
    ref = copy.deepcopy(model)
    parallel = _parallel(model, mode)
    mesh = sequence_parallel_mesh(SP)
    ids, labels = global_batch(4, seed=3)
    counts = []
    for micro in range(2):
        rows = slice(2 * micro, 2 * micro + 2)  # micro-batch m: rows 2m (dp 0), 2m + 1 (dp 1)
        local_ids, local_labels = (split_batch(t[rows], mesh) for t in (ids, labels))
        sync = parallel.no_sync() if deferred and micro == 0 else contextlib.nullcontext()
        with sync, autosp.count_collectives() as backward:
            (parallel(input_ids=local_ids, labels=local_labels)["loss"] / 2).backward()
        counts.append(dict(backward))
    ref(input_ids=ids, labels=labels)["loss"].backward()
    max_norm = 0.5
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    return {
        "norm": norm.item(),
        "ref_norm": ref_norm.item(),
        "grad_rel_err": max(grad_errors(model, ref).values()),
        "backward": counts,
    }


def discard_under_no_sync() -> dict[str, Any]:
    """A micro-batch under ``no_sync()`` whose gradients ``zero_grad()`` discards before the
    reducing backward: the gradients are those of the second micro-batch alone; zeroed in
    place instead, the reducing backward raises (the error text)."""
    model = build("plain_gpt")
    ref = copy.deepcopy(model)
    parallel = _parallel(model, "native")
    mesh = sequence_parallel_mesh(SP)
    ids, labels = global_batch(4, seed=3)
    first = [split_batch(t[0:2], mesh) for t in (ids, labels)]
    second = [split_batch(t[2:4], mesh) for t in (ids, labels)]
    found: dict[str, Any] = {}
    for set_to_none in (True, False):
        with parallel.no_sync():
            parallel(input_ids=first[0], labels=first[1])["loss"].backward()
        model.zero_grad(set_to_none=set_to_none)
        try:
            parallel(input_ids=second[0], labels=second[1])["loss"].backward()
        except autosp.AutoSPError as err:
            found["in_place"] = str(err)
        else:
            ref(input_ids=ids[2:4], labels=labels[2:4])["loss"].backward()
            found["grad_rel_err"] = max(grad_errors(model, ref).values())
        model.zero_grad()
    return found


def _roundtrip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


def checkpoints() -> dict[str, Any]:
    """State dicts across layouts after one native and one DDP step: keys and round trips."""
    mesh = sequence_parallel_mesh(SP)
    ids, labels = global_batch(2, seed=5)
    local = {"input_ids": split_batch(ids, mesh), "labels": split_batch(labels, mesh)}
    plain_keys = list(build("plain_gpt").state_dict())
    found: dict[str, Any] = {}

    trained = build("plain_gpt")
    parallel = autosp.parallelize(trained, mesh=mesh, backend=BACKEND)
    parallel(**local)["loss"].backward()
    torch.optim.SGD(trained.parameters(), lr=0.1).step()
    saved = _roundtrip(parallel.state_dict())
    found["sp_keys_plain"] = list(saved) == plain_keys
    plain = build("plain_gpt", seed=1)
    plain.load_state_dict(saved)  # saved under SP, loaded without it
    found["sp_to_plain"] = _same(plain, trained)
    fresh = autosp.parallelize(build("plain_gpt", seed=2), mesh=mesh, backend=BACKEND)
    fresh.load_state_dict(_roundtrip(plain.state_dict()))  # and the reverse
    found["plain_to_sp"] = _same(fresh.module, trained)

    ddp = wrap_ddp(autosp.parallelize(build("plain_gpt", seed=3), mesh=mesh, backend=BACKEND))
    ddp(**local)["loss"].backward()
    ddp_saved = _roundtrip(ddp.state_dict())
    found["ddp_keys"] = list(ddp_saved) == ["module." + k for k in plain_keys]
    found["ddp_module_keys_plain"] = list(ddp.module.state_dict()) == plain_keys
    other = wrap_ddp(autosp.parallelize(build("plain_gpt", seed=4), mesh=mesh, backend=BACKEND))
    other.load_state_dict(ddp_saved)  # DDP(SP) -> DDP(SP), strict
    found["ddp_to_ddp"] = _same(other.module, ddp.module)
    plain_ddp = DistributedDataParallel(build("plain_gpt", seed=5))
    plain_ddp.load_state_dict(ddp_saved)  # DDP(SP) -> DDP(plain model)
    found["ddp_to_plain_ddp"] = _same(plain_ddp.module, ddp.module)
    # torch.distributed.checkpoint's state-dict API sees the plain keys too.
    found["dcp_keys_plain"] = list(get_model_state_dict(ddp)) == plain_keys
    set_model_state_dict(fresh, get_model_state_dict(ddp))  # DDP(SP) -> SP
    found["dcp_ddp_to_sp"] = _same(fresh.module, ddp.module)
    return found


def _message(fn: Any) -> str:
    try:
        fn()
    except autosp.AutoSPError as err:
        return str(err)
    return ""


def errors() -> dict[str, str]:
    """The message of each layout or wrapper order that cannot work ("" if none was raised)."""
    ids, labels = global_batch(1, seed=0)
    mesh = sequence_parallel_mesh(SP)

    def parallel() -> autosp.SequenceParallel:
        return autosp.parallelize(build("plain_gpt"), mesh=mesh, backend=BACKEND)

    def call(model: torch.nn.Module) -> None:
        model(input_ids=ids, labels=labels)["loss"].backward()

    def ddp_over_sp() -> None:
        sp_only = DistributedDataParallel(parallel(), process_group=mesh["sp"].get_group())
        prepare_ddp(sp_only)

    odd = torch.distributed.device_mesh.init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b"))
    return {
        "sp_size": _message(lambda: autosp.parallelize(build("plain_gpt"), sp_size=3)),
        "mesh_sizes": _message(lambda: sequence_parallel_mesh(2, dp=3)),
        "two_layouts": _message(
            lambda: autosp.parallelize(build("plain_gpt"), mesh=mesh, sp_size=2)
        ),
        "mesh_dims": _message(lambda: autosp.parallelize(build("plain_gpt"), mesh=odd)),
        "ddp_inside": _message(
            lambda: autosp.parallelize(DistributedDataParallel(build("plain_gpt")))
        ),
        "plain_ddp_outside": _message(lambda: call(DistributedDataParallel(parallel()))),
        "ddp_over_sp": _message(ddp_over_sp),
        "wrap_plain": _message(lambda: wrap_ddp(build("plain_gpt"))),
    }


def unequal_tokens(mode: str, dp_mean: str) -> dict[str, Any]:
    """One backward on dp 2 x sp 2 where the DP groups' batches hold 11 and 1 labelled tokens
    (after the model's shift), under ``native`` (autosp's reduction), ``ddp``, ``fsdp`` or
    ``sharded`` (parameters gathered in the graph): this rank's loss and the worst relative
    error of the reduced gradients against one process on the batch (``dp_mean="tokens"``:
    the mean over all 12 tokens) or against the mean of the two sequences' own losses
    (``"groups"``)."""
    from autosp.integrations import fsdp, sharded

    model = build("llama")
    ref = copy.deepcopy(model)
    mesh = sequence_parallel_mesh(SP)
    if mode == "fsdp":
        parallel = fsdp.shard(model, mesh, backend=BACKEND, dp_mean=dp_mean)
    elif mode == "sharded":
        parallel = sharded.shard(model, mesh, backend="aot_eager", dp_mean=dp_mean)
    else:
        parallel = autosp.parallelize(model, mesh=mesh, backend=BACKEND, dp_mean=dp_mean)
        parallel = wrap_ddp(parallel) if mode == "ddp" else parallel
    ids, labels = global_batch(2, seed=7)
    labels[1, 2:] = -100  # sequence 1: one label left after the model's shift
    loss = parallel(input_ids=split_batch(ids, mesh), labels=split_batch(labels, mesh))["loss"]
    loss.backward()
    if dp_mean == "tokens":
        expected = ref(input_ids=ids, labels=labels)["loss"]
    else:
        expected = (
            sum(ref(input_ids=ids[i : i + 1], labels=labels[i : i + 1])["loss"] for i in (0, 1)) / 2
        )
    expected.backward()
    if mode == "fsdp":
        grads = {
            n.removeprefix("module."): p.grad.full_tensor() for n, p in parallel.named_parameters()
        }
    elif mode == "sharded":
        for p in parallel.parameters():  # the gradients, gathered like the parameters
            p.data = p.grad
        grads = sharded.full_state_dict(parallel)
    else:
        grads = {n: p.grad for n, p in model.named_parameters()}
    return {
        "loss": loss.item(),
        "ref": expected.item(),
        "grad_rel_err": max(
            ((grads[n] - q.grad).norm() / q.grad.norm()).item() for n, q in ref.named_parameters()
        ),
    }
