"""The collectives of ``autosp.comm.ops`` and the gradient sync of ``autosp.comm.grad_sync``.

Every rank builds every rank's data from a seed, so each rank can compute the single-process
result on the concatenated data and compare its own part of it. The checks record mismatches
instead of raising, so that every rank issues the same collectives in the same order whatever
fails, and the parent test reports the mismatches of each check separately. A single spawn of 3
ranks (``_rank_checks``) covers world sizes 2 (a group of ranks 0 and 1), 3, and 1
(``torch.library.opcheck`` in a group of one rank), since a spawn costs seconds per rank.
"""

from __future__ import annotations

import copy
import traceback
from collections import Counter
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from multirank import run_ranks
from torch import nn
from torch.distributed.distributed_c10d import _resolve_process_group

from autosp.comm import ops
from autosp.comm.grad_sync import GradSync

DT = torch.float64
EXACT = dict(rtol=0.0, atol=0.0)  # pure data movement
TIGHT = dict(rtol=1e-12, atol=1e-12)  # sums over ranks, possibly in another order


class _Recorder:
    """Collects assertion failures by check name without changing the control flow."""

    def __init__(self) -> None:
        self.failures: dict[str, list[str]] = {}
        self.check = ""

    def close(self, actual: object, expected: object, what: str, **tol: float) -> None:
        try:
            torch.testing.assert_close(actual, expected, **(tol or EXACT))
        except AssertionError as err:
            self.fail(f"{what}: {err}")

    def true(self, cond: bool, what: str) -> None:
        if not cond:
            self.fail(what)

    def fail(self, message: str) -> None:
        self.failures.setdefault(self.check, []).append(f"rank {dist.get_rank()}: {message}")


def _per_rank(world: int, shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=DT) for _ in range(world)]


# --------------------------------------------------------------------------- per-op checks


def _check_all_to_all(rec: _Recorder, rank: int, world: int, g: str) -> None:
    # Ulysses layout: sequence-sharded (B, L, H, D) -> head-sharded (B, P * L, H / P, D).
    b, blk, hp, d = 2, 3, 2, 4
    xs = _per_rank(world, (b, blk, hp * world, d), seed=1)
    ws = _per_rank(world, (b, blk * world, hp, d), seed=2)
    x = xs[rank].clone().requires_grad_()
    out = ops.all_to_all(x, 2, 1, g)

    full = torch.cat(xs, dim=1).requires_grad_()
    refs = [full[:, :, q * hp : (q + 1) * hp] for q in range(world)]
    rec.close(out, refs[rank], "forward = head slice of the full sequence")

    (out * ws[rank]).sum().backward()
    sum((o * w).sum() for o, w in zip(refs, ws, strict=True)).backward()
    rec.close(x.grad, full.grad[:, rank * blk : (rank + 1) * blk], "backward")
    rec.true(bool(x.grad.abs().min() > 0), "backward gradient has zeros")

    # The backward formula itself: all_to_all with the dims swapped inverts the forward.
    rec.close(ops.all_to_all(out.detach(), 1, 2, g), xs[rank], "swapped dims invert")
    y = torch.arange(2 * world * 3 * 5, dtype=DT).reshape(2 * world, 3, 5)
    there = ops.all_to_all(y, 0, -1, g)
    rec.true(there.shape == (2, 3, 5 * world), f"shape {tuple(there.shape)} for dims (0, -1)")
    rec.close(ops.all_to_all(there, -1, 0, g), y, "negative dims invert")


def _check_all_gather(rec: _Recorder, rank: int, world: int, g: str) -> None:
    for dim, shape in ((1, (3, 2, 4)), (-1, (2, 3)), (0, (2, 5))):
        xs = _per_rank(world, shape, seed=10)
        out_shape = torch.cat(xs, dim=dim).shape
        ws = _per_rank(world, tuple(out_shape), seed=11)
        x = xs[rank].clone().requires_grad_()
        out = ops.all_gather(x, dim, g)

        full = torch.cat(xs, dim=dim).requires_grad_()
        rec.close(out, full.detach(), f"dim {dim}: forward = concatenation")
        # Every rank holds the full value; the loss sums every rank's use of it.
        (out * ws[rank]).sum().backward()
        sum((full * w).sum() for w in ws).backward()
        own = full.grad.narrow(dim, rank * shape[dim], shape[dim])
        rec.close(x.grad, own, f"dim {dim}: backward = reduce-scatter", **TIGHT)
        expected_rs = sum(ws).narrow(dim, rank * shape[dim], shape[dim])
        rec.close(ops.reduce_scatter(ws[rank], dim, g), expected_rs, f"dim {dim}: rs", **TIGHT)


def _check_reduce_scatter(rec: _Recorder, rank: int, world: int, g: str) -> None:
    blk = 2
    xs = _per_rank(world, (3, blk * world, 4), seed=20)
    ws = _per_rank(world, (3, blk, 4), seed=21)
    x = xs[rank].clone().requires_grad_()
    out = ops.reduce_scatter(x, 1, g)

    leaves = [t.clone().requires_grad_() for t in xs]
    total = sum(leaves)
    refs = [total[:, q * blk : (q + 1) * blk] for q in range(world)]
    rec.close(out, refs[rank].detach(), "forward = own block of the sum", **TIGHT)
    (out * ws[rank]).sum().backward()
    sum((o * w).sum() for o, w in zip(refs, ws, strict=True)).backward()
    rec.close(x.grad, leaves[rank].grad, "backward = all-gather")
    rec.close(x.grad, torch.cat(ws, dim=1), "backward = concatenated grads")


def _check_all_reduce(rec: _Recorder, rank: int, world: int, g: str) -> None:
    xs = _per_rank(world, (3, 4), seed=30)
    ws = _per_rank(world, (3, 4), seed=31)
    x = xs[rank].clone().requires_grad_()
    out = ops.all_reduce(x, g)
    rec.close(out, sum(xs), "forward = sum", **TIGHT)
    rec.true(out.data_ptr() != x.data_ptr(), "output aliases the input")
    rec.close(x, xs[rank], "input left unchanged")
    (out * ws[rank]).sum().backward()
    rec.close(x.grad, sum(ws), "backward sums the grads over ranks", **TIGHT)

    # A non-contiguous input.
    xt = xs[rank].t()
    rec.close(ops.all_reduce(xt, g), sum(t.t() for t in xs), "transposed input", **TIGHT)


def _check_all_reduce_loss(rec: _Recorder, rank: int, world: int, g: str) -> None:
    xs = _per_rank(world, (2,), seed=40)
    ws = _per_rank(world, (2,), seed=41)
    x = xs[rank].clone().requires_grad_()
    out = ops.all_reduce_loss(x, g)
    rec.close(out, sum(xs), "forward = sum", **TIGHT)
    (out * ws[rank]).sum().backward()
    rec.close(x.grad, ws[rank], "backward is the identity")

    # As used for a loss: every rank seeds d loss = 1.
    s = xs[rank][0].clone().requires_grad_()
    ops.all_reduce_loss(s, g).backward()
    rec.close(s.grad, torch.tensor(1.0, dtype=DT), "loss.backward() seeds 1 on every rank")


def _check_scale_grad(rec: _Recorder, rank: int, world: int, g: str) -> None:
    (x0,) = _per_rank(1, (3, 4), seed=50 + rank)
    (w,) = _per_rank(1, (3, 4), seed=60 + rank)
    x = x0.clone().requires_grad_()
    out = ops.scale_grad(x, 0.375)
    rec.close(out, x0, "forward is the identity")
    rec.true(out.data_ptr() != x.data_ptr(), "output aliases the input")
    (out * w).sum().backward()
    rec.close(x.grad, w * 0.375, "backward multiplies by the factor")


def _check_count(rec: _Recorder, rank: int, world: int, g: str) -> None:
    x = torch.ones(2 * world, 3, dtype=DT, requires_grad=True)
    with ops.count_collectives() as outer:
        with ops.count_collectives() as inner:
            ops.all_gather(x, 0, g).sum().backward()  # all_gather + reduce_scatter
        ops.all_to_all(x, 0, 1, g)
        ops.all_to_all(x, 0, 1, g)
        ops.all_reduce(x, g).sum().backward()  # all_reduce twice
        ops.scale_grad(x, 2.0).sum().backward()  # not a collective
        with torch.no_grad():
            ops.reduce_scatter(x, 0, g)
    rec.true(dict(inner) == {"all_gather": 1, "reduce_scatter": 1}, f"inner counts {dict(inner)}")
    expected = {"all_gather": 1, "reduce_scatter": 2, "all_to_all": 2, "all_reduce": 2}
    rec.true(dict(outer) == expected, f"outer counts {dict(outer)} != {expected}")
    with ops.count_collectives() as after:
        pass
    rec.true(dict(after) == {}, f"an empty block counted {dict(after)}")


def _check_fake_shapes(rec: _Recorder, rank: int, world: int, g: str) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    shape = (2 * world, 3 * world, 5)
    x = torch.randn(shape, dtype=DT)
    calls: list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = [
        ("all_to_all(0, 1)", lambda t: ops.all_to_all(t, 0, 1, g)),
        ("all_to_all(1, -1)", lambda t: ops.all_to_all(t, 1, -1, g)),
        ("all_gather(1)", lambda t: ops.all_gather(t, 1, g)),
        ("all_gather(-1)", lambda t: ops.all_gather(t, -1, g)),
        ("reduce_scatter(0)", lambda t: ops.reduce_scatter(t, 0, g)),
        ("all_reduce", lambda t: ops.all_reduce(t, g)),
        ("all_reduce_loss", lambda t: ops.all_reduce_loss(t, g)),
        ("scale_grad", lambda t: ops.scale_grad(t, 3.0)),
    ]
    for name, call in calls:
        real = call(x)
        with FakeTensorMode() as mode:
            fake = call(mode.from_tensor(x))
        rec.true(
            fake.shape == real.shape and fake.dtype == real.dtype,
            f"{name}: fake {tuple(fake.shape)} {fake.dtype} != real {tuple(real.shape)}",
        )


def _check_compiled(rec: _Recorder, rank: int, world: int, g: str) -> None:
    torch._dynamo.reset()
    b, blk, hp, d = 1, 2, 2, 3
    xs = _per_rank(world, (b, blk, hp * world, d), seed=70)
    ws = _per_rank(world, (b, blk * world, hp, d), seed=71)

    def a2a_loss(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (ops.all_to_all(torch.sin(x), 2, 1, g) * w).sum()

    compiled = torch.compile(a2a_loss, fullgraph=True, backend="aot_eager")
    x = xs[rank].clone().requires_grad_()
    with ops.count_collectives() as counts:
        loss = compiled(x, ws[rank])
        loss.backward()
    rec.true(dict(counts) == {"all_to_all": 2}, f"compiled a2a ran {dict(counts)}")

    full = torch.cat(xs, dim=1).requires_grad_()
    refs = [torch.sin(full)[:, :, q * hp : (q + 1) * hp] for q in range(world)]
    rec.close(loss.detach(), (refs[rank] * ws[rank]).sum().detach(), "compiled a2a loss", **TIGHT)
    sum((o * w).sum() for o, w in zip(refs, ws, strict=True)).backward()
    rec.true(x.grad is not None and bool(x.grad.abs().min() > 0), "compiled a2a grad has zeros")
    own = full.grad[:, rank * blk : (rank + 1) * blk]
    rec.close(x.grad, own, "compiled a2a backward", **TIGHT)

    # Every op in one compiled graph against the same function run eagerly.
    def mixed(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = ops.all_to_all(x * x, 2, 1, g)  # (b, P * blk, hp, d)
        y = ops.all_gather(y, 2, g)  # (b, P * blk, P * hp, d)
        y = ops.reduce_scatter(y * w, 1, g)  # (b, blk, P * hp, d)
        y = ops.scale_grad(y, 0.5)
        return ops.all_reduce_loss(ops.all_reduce(y.exp(), g).sum(), g)

    (wm,) = _per_rank(1, (b, blk * world, hp * world, d), seed=72 + rank)
    grads, counted = [], []
    for fn in (mixed, torch.compile(mixed, fullgraph=True, backend="aot_eager")):
        xm = (0.3 * xs[rank]).requires_grad_()
        with ops.count_collectives() as counts:
            fn(xm, wm).backward()
        grads.append(xm.grad)
        counted.append(dict(counts))
    rec.true(counted[0] == counted[1], f"eager ran {counted[0]}, compiled ran {counted[1]}")
    rec.true(bool(grads[0].abs().max() > 0), "eager mixed grad is zero")
    rec.true(bool(grads[1].abs().max() > 0), "compiled mixed grad is zero")
    rec.close(grads[1], grads[0], "compiled mixed grad = eager", rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- GradSync


def _linear_grads(model: nn.Module, inp: torch.Tensor) -> list[torch.Tensor]:
    local = copy.deepcopy(model)
    local(inp).square().sum().backward()
    return [p.grad for p in local.parameters()]


def _check_grad_sync(rec: _Recorder, rank: int, world: int, g: str) -> None:
    group = _resolve_process_group(g)
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)  # identical on every rank
    first = _per_rank(world, (5, 4), seed=80)
    second = _per_rank(world, (5, 4), seed=81)
    per_rank_1 = [_linear_grads(model, inp) for inp in first]
    per_rank_2 = [_linear_grads(model, inp) for inp in second]
    sum_1 = [sum(gs) for gs in zip(*per_rank_1, strict=True)]
    sum_2 = [sum(gs) for gs in zip(*per_rank_2, strict=True)]

    sync = GradSync(model, group, bucket_mb=25, channel=group)
    with ops.count_collectives() as counts:
        model(first[rank]).square().sum().backward()
    rec.true(counts["grad_all_reduce"] == 1, f"one bucket expected, counted {dict(counts)}")
    for name, p, expected in zip(("weight", "bias"), model.parameters(), sum_1, strict=True):
        rec.close(p.grad, expected, f"{name}.grad = sum over ranks", **TIGHT)

    # Gradient accumulation: the second backward adds its own sum, the first is not re-summed.
    model(second[rank]).square().sum().backward()
    for name, p, a, b in zip(("weight", "bias"), model.parameters(), sum_1, sum_2, strict=True):
        rec.close(p.grad, a + b, f"accumulated {name}.grad", **TIGHT)

    # After remove(), backward leaves the local gradient alone and communicates nothing.
    sync.remove()
    model.zero_grad(set_to_none=True)
    with ops.count_collectives() as counts:
        model(first[rank]).square().sum().backward()
    rec.true(counts["grad_all_reduce"] == 0, f"removed sync still ran {dict(counts)}")
    rec.close(model.weight.grad, per_rank_1[rank][0], "local grad after remove()")

    # Bucket sizes: weight 12 doubles (96 B), bias 3 doubles (24 B).
    for bucket_bytes, buckets in ((1, 2), (100, 2), (120, 1), (119, 2)):
        sized = copy.deepcopy(model)
        sized.zero_grad(set_to_none=True)
        sync = GradSync(sized, group, bucket_mb=bucket_bytes / 2**20, channel=group)
        with ops.count_collectives() as counts:
            sized(first[rank]).square().sum().backward()
        sync.remove()
        rec.true(
            counts["grad_all_reduce"] == buckets,
            f"{bucket_bytes} B buckets: {counts['grad_all_reduce']} all-reduces, not {buckets}",
        )
        rec.close(sized.weight.grad, sum_1[0], f"{bucket_bytes} B buckets: weight", **TIGHT)
        rec.close(sized.bias.grad, sum_1[1], f"{bucket_bytes} B buckets: bias", **TIGHT)

    # Parameters of different dtypes never share a bucket.
    mixed = nn.Module()
    mixed.a = nn.Parameter(torch.ones(5, 4, dtype=DT))
    mixed.b = nn.Parameter(torch.ones(5, 4, dtype=torch.float32))
    sync = GradSync(mixed, group, bucket_mb=25, channel=group)
    with ops.count_collectives() as counts:
        ((mixed.a * first[rank]).sum() + (mixed.b * first[rank].float()).sum()).backward()
    sync.remove()
    rec.true(counts["grad_all_reduce"] == 2, f"mixed dtypes: {dict(counts)}")
    rec.close(mixed.a.grad, sum(first), "float64 param", **TIGHT)
    rec.close(mixed.b.grad, sum(first).float(), "float32 param", rtol=1e-6, atol=1e-6)

    # Experts: `a` gets a gradient on rank 0 only, `b` on every rank, `c` on none. Every rank
    # sums the same buckets (a mismatch would hang or mix tensors), `a` ends with rank 0's
    # gradient everywhere, `c` keeps grad=None as in one process.
    experts = nn.Module()
    for name in "abc":
        setattr(experts, name, nn.Parameter(torch.ones(5, 4, dtype=DT)))
    sync = GradSync(experts, group, bucket_mb=25, channel=group)
    loss = (experts.b * first[rank]).sum()
    if rank == 0:
        loss = loss + (experts.a * first[0]).sum()
    loss.backward()
    sync.remove()
    rec.close(experts.a.grad, first[0], "a parameter used on rank 0 only", **TIGHT)
    rec.close(experts.b.grad, sum(first), "a parameter used everywhere", **TIGHT)
    rec.true(experts.c.grad is None, "a parameter used nowhere has a gradient")


def _check_written_in_place(rec: _Recorder, rank: int, world: int, g: str) -> None:
    """Outputs are new tensors, never views of a buffer made inside the op: autograd refuses
    an in-place write into such a view (``y[:, 0] = v`` after a gather of a batch of one)."""
    calls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "all_gather dim 1": lambda x: ops.all_gather(x, 1, g),
        "all_gather dim 0": lambda x: ops.all_gather(x, 0, g),
        "reduce_scatter dim 1": lambda x: ops.reduce_scatter(x, 1, g),
        "reduce_scatter dim 0": lambda x: ops.reduce_scatter(x.repeat(world, 1, 1), 0, g),
        "all_to_all": lambda x: ops.all_to_all(x.repeat(1, world, 1), 1, 2, g),
        "all_reduce": lambda x: ops.all_reduce(x, g),
        "scale_grad": lambda x: ops.scale_grad(x, 0.5),
    }
    for what, call in calls.items():
        x = torch.randn(1, 2 * world, 3, dtype=DT, requires_grad=True)
        out = call(x * 1)
        rec.true(out._base is None, f"{what}: the output is a view")
        try:
            out[:, 0] = out[:, 0] * 2
            out.sum().backward()
        except RuntimeError as err:
            rec.fail(f"{what}: in-place write into the output: {err}")


CHECKS: dict[str, Callable[[_Recorder, int, int, str], None]] = {
    "all_to_all": _check_all_to_all,
    "all_gather": _check_all_gather,
    "reduce_scatter": _check_reduce_scatter,
    "all_reduce": _check_all_reduce,
    "all_reduce_loss": _check_all_reduce_loss,
    "scale_grad": _check_scale_grad,
    "count": _check_count,
    "fake_shapes": _check_fake_shapes,
    "compiled": _check_compiled,
    "grad_sync": _check_grad_sync,
    "written_in_place": _check_written_in_place,
}


OPS = ["all_to_all", "all_gather", "reduce_scatter", "all_reduce", "all_reduce_loss", "scale_grad"]


def _opcheck(g: str) -> dict[str, object]:
    """``torch.library.opcheck`` of every op in a 1-rank group, plus one count."""
    x = torch.randn(2, 4, 3, dtype=DT, requires_grad=True)
    cases = {
        "all_to_all": (ops.all_to_all, (x, 1, 0, g)),
        "all_gather": (ops.all_gather, (x, 1, g)),
        "reduce_scatter": (ops.reduce_scatter, (x, 2, g)),
        "all_reduce": (ops.all_reduce, (x, g)),
        "all_reduce_loss": (ops.all_reduce_loss, (x, g)),
        "scale_grad": (ops.scale_grad, (x, 0.5)),
    }
    results: dict[str, object] = {}
    for name, (op, args) in cases.items():
        try:
            results[name] = torch.library.opcheck(op, args)
        except Exception:  # noqa: BLE001 - reported by the test
            results[name] = traceback.format_exc()
    with ops.count_collectives() as counts:
        ops.all_reduce_loss(x, g)
    results["count_all_reduce_loss"] = dict(counts)
    return results


def _rank_checks() -> dict[object, object]:
    """On 3 ranks: every check in a 2-rank group (ranks 0 and 1), then in the 3-rank group,
    then opcheck in a 1-rank group per rank. One spawn for all three world sizes."""
    rank = dist.get_rank()
    pair = dist.new_group([0, 1])
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    results: dict[object, object] = {}
    for world, group in ((2, pair), (3, dist.group.WORLD)):
        if rank >= world:
            continue
        assert dist.get_world_size(group) == world and dist.get_rank(group) == rank
        rec = _Recorder()
        for name, check in CHECKS.items():
            rec.check = name
            check(rec, rank, world, group.group_name)
        results[world] = rec.failures
    results["opcheck"] = _opcheck(singles[rank].group_name)
    return results


@pytest.fixture(scope="module")
def per_rank() -> list[dict[object, object]]:
    return run_ranks(3, _rank_checks)


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("world", [2, 3])
def test_collectives(per_rank: list[dict[object, object]], world: int, check: str) -> None:
    ranks = [r for r in per_rank if world in r]
    assert len(ranks) == world
    messages = [m for r in ranks for m in r[world].get(check, [])]
    assert not messages, "\n".join(messages)


@pytest.mark.parametrize("op", OPS)
def test_opcheck_single_rank_group(per_rank: list[dict[object, object]], op: str) -> None:
    for r in per_rank:
        result = r["opcheck"][op]
        assert isinstance(result, dict), result
        assert set(result.values()) == {"SUCCESS"}, result


def test_count_all_reduce_loss_by_name(per_rank: list[dict[object, object]]) -> None:
    assert per_rank[0]["opcheck"]["count_all_reduce_loss"] == Counter({"all_reduce_loss": 1})
