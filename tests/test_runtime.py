"""Placement conversions of ``autosp.compiler.runtime`` and sequence detection of ``seqdims``."""

from __future__ import annotations

import itertools

import pytest
import sympy
import torch
import torch.distributed as dist
from multirank import run_ranks

from autosp.compiler import runtime
from autosp.compiler.seqdims import SeqDim, classify, hint, seq_dims

# --------------------------------------------------------------------------- references


def _padded_rows(rows: torch.Tensor, dim: int, total: int, pad_value: float | bool) -> torch.Tensor:
    """``rows`` extended along ``dim`` to ``total`` rows of ``pad_value``, built by copying."""
    shape = list(rows.shape)
    shape[dim] = total
    out = torch.full(shape, pad_value, dtype=rows.dtype)
    out.narrow(dim, 0, rows.shape[dim]).copy_(rows)
    return out


def _full(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    return torch.randn(shape, generator=gen).to(dtype)


# Configurations: (seq_len S, length offset, world P); S + length rows, block = 2 ceil(S / 2P).
LENGTHS = [
    (8, 0, 2),  # divisible
    (8, -1, 2),  # x[:, :-1] of a divisible length
    (9, 0, 2),
    (9, -1, 3),  # 8 rows in blocks of 4
    (7, 0, 3),
    (10, -2, 4),
    (2, 0, 3),  # fewer tokens than ranks: one rank holds only padding
    (4, -1, 4),
]


# --------------------------------------------------------------------------- scalar helpers


@pytest.mark.parametrize(("seq_len", "world"), itertools.product(range(1, 13), range(1, 6)))
def test_block_len_and_valid_rows(seq_len: int, world: int) -> None:
    block = runtime.block_len(seq_len, world)
    assert block % 2 == 0
    assert block * world >= seq_len > (block - 2) * world
    for length in (0, -1, -2):
        if seq_len + length < 0:
            continue
        rows = [runtime.valid_rows(seq_len, length, r, world) for r in range(world)]
        assert sum(rows) == seq_len + length
        assert all(0 <= n <= block for n in rows)
        # Valid rows come first: full blocks, at most one partial one, then empty ones.
        assert rows == sorted(rows, reverse=True)
        assert sum(0 < n < block for n in rows) <= 1


def test_pad_dim() -> None:
    x = torch.arange(12.0).reshape(3, 4)
    out = runtime.pad_dim(x, 0, 5, value=-1.5)
    assert out.shape == (5, 4)
    assert torch.equal(out[:3], x) and torch.equal(out[3:], torch.full((2, 4), -1.5))
    leaf = x.clone().requires_grad_()
    out = runtime.pad_dim(leaf, -1, 6)  # no value: copies of the last row (finite like x)
    assert torch.equal(out, torch.cat([x, x[:, 3:].expand(3, 2)], dim=1))
    out.sum().backward()  # padding rows pass no gradient to the row they copy
    assert torch.equal(leaf.grad, torch.ones(3, 4))
    assert torch.equal(runtime.pad_dim(x, 1, 4), x)  # width 0
    mask = torch.zeros(2, 3, dtype=torch.bool)
    padded = runtime.pad_dim(mask, 1, 5, value=True)
    assert padded.dtype == torch.bool
    assert torch.equal(padded, torch.tensor([[False] * 3 + [True] * 2] * 2))


# --------------------------------------------------------------------------- shard


@pytest.mark.parametrize(("seq_len", "length", "world"), LENGTHS)
@pytest.mark.parametrize("dim", [0, 1, -2])
@pytest.mark.parametrize(
    ("dtype", "pad_value"), [(torch.float32, 0.0), (torch.float32, -7.25), (torch.bool, True)]
)
def test_shard_plain(
    seq_len: int, length: int, world: int, dim: int, dtype: torch.dtype, pad_value: float
) -> None:
    rows = seq_len + length
    block = runtime.block_len(seq_len, world)
    shape = [3, 2, 5]
    shape[dim] = rows
    x = _full(tuple(shape), dtype, seed=rows * 31 + world)
    shards = [
        runtime.shard(x, dim, seq_len, r, world, length=length, pad_value=pad_value)
        for r in range(world)
    ]
    for r, s in enumerate(shards):
        assert s.shape[dim] == block and s.dtype == dtype
        assert runtime.full_size(s, dim, seq_len, world, 0, length) == rows
        # Exactly the valid rows are data, the rest is pad_value.
        valid = runtime.valid_rows(seq_len, length, r, world)
        data = x.narrow(dim, min(r * block, rows), valid)
        assert torch.equal(s.narrow(dim, 0, valid), data)
        tail = s.narrow(dim, valid, block - valid)
        assert torch.equal(tail, torch.full_like(tail, pad_value))
    assert torch.equal(torch.cat(shards, dim=dim), _padded_rows(x, dim, block * world, pad_value))


@pytest.mark.parametrize(("seq_len", "length", "world"), LENGTHS)
@pytest.mark.parametrize(("outer", "inner"), [(1, 1), (2, 3), (3, 4)])
@pytest.mark.parametrize("pad_value", [0.0, float("-inf")])
def test_shard_merged(
    seq_len: int, length: int, world: int, outer: int, inner: int, pad_value: float
) -> None:
    # A (B, outer * (S + length) * inner, D) value: e.g. heads merged with tokens and head dim.
    rows = seq_len + length
    block = runtime.block_len(seq_len, world)
    x = _full((2, outer * rows * inner, 3), torch.float32, seed=rows * 7 + inner)
    unmerged = x.unflatten(1, (outer, rows, inner))
    shards = [
        runtime.shard(x, 1, seq_len, r, world, inner=inner, length=length, pad_value=pad_value)
        for r in range(world)
    ]
    for s in shards:
        assert s.shape == (2, outer * block * inner, 3)
        assert runtime.full_size(s, 1, seq_len, world, inner, length) == x.shape[1]
    blocks = [s.unflatten(1, (outer, block, inner)) for s in shards]
    expected = _padded_rows(unmerged, 2, block * world, pad_value)
    assert torch.equal(torch.cat(blocks, dim=2), expected)


def test_shard_merged_last_dim() -> None:
    # The merged dimension is the last one: (B, S * inner) rows of a flattened (S, inner) value.
    # S = 5, P = 2: blocks of 4 tokens, 3 of them padding on rank 1.
    x = torch.arange(2 * 5 * 3).reshape(2, 15)
    shards = [runtime.shard(x, 1, 5, r, 2, inner=3, pad_value=-1) for r in range(2)]
    assert torch.equal(shards[0], x[:, :12])
    assert torch.equal(shards[1], torch.cat([x[:, 12:], torch.full((2, 9), -1)], dim=1))


def test_shard_merged_negative_dim() -> None:
    x = torch.arange(2 * 5 * 3).reshape(2, 15)
    assert torch.equal(
        runtime.shard(x, -1, 5, 0, 2, inner=3), runtime.shard(x, 1, 5, 0, 2, inner=3)
    )


# --------------------------------------------------------------------------- gather


def _gather_checks(world: int, group: str) -> int:
    rank = dist.get_rank()
    checked = 0
    for seq_len, length in itertools.product((6, 7, 8, 2), (0, -1)):
        rows = seq_len + length
        block = runtime.block_len(seq_len, world)
        for dim, inner, outer in ((1, 0, 1), (0, 0, 1), (-1, 0, 1), (1, 2, 3), (1, 1, 1)):
            if inner:
                shape = (2, outer * rows * inner, 3)
            else:
                shape = [2, 4, 3]
                shape[dim] = rows
            x = _full(tuple(shape), torch.float64, seed=seq_len * 10 - length)
            mine = runtime.shard(
                x, dim, seq_len, rank, world, inner=inner, length=length, pad_value=float("nan")
            )
            full = runtime.gather(mine, dim, seq_len, world, group, inner=inner, length=length)
            where = f"world={world} S={seq_len} length={length} dim={dim} inner={inner}"
            assert not full.isnan().any(), f"{where}: padding leaked into the gathered value"
            torch.testing.assert_close(full, x, rtol=0, atol=0, msg=where)
            size = runtime.full_size(mine, dim, seq_len, world, inner, length)
            assert size == x.shape[dim], f"{where}: full_size {size} != {x.shape[dim]}"
            # The rows that shard() filled with NaN are exactly the rows past valid_rows.
            if inner:
                tokens, tdim = mine.unflatten(dim, (-1, block, inner)), dim + 1
            else:
                tokens, tdim = mine, dim
            pad_rows = tokens.isnan().movedim(tdim, 0).flatten(1).all(-1)
            expected = torch.arange(block) >= runtime.valid_rows(seq_len, length, rank, world)
            assert torch.equal(pad_rows, expected), f"{where}: padding rows {pad_rows.tolist()}"
            checked += 1
    return checked


def _gather_worlds() -> dict[int, int]:
    """On 3 ranks: the checks in a group of ranks 0 and 1, then in all 3 (one spawn)."""
    rank = dist.get_rank()
    pair = dist.new_group([0, 1])
    done = {}
    for world, group in ((2, pair), (3, dist.group.WORLD)):
        if rank < world:
            assert dist.get_world_size(group) == world and dist.get_rank(group) == rank
            done[world] = _gather_checks(world, group.group_name)
    return done


@pytest.fixture(scope="module")
def gathered() -> list[dict[int, int]]:
    return run_ranks(3, _gather_worlds)


@pytest.mark.parametrize("world", [2, 3])
def test_gather_inverts_shard(gathered: list[dict[int, int]], world: int) -> None:
    assert [r[world] for r in gathered if world in r] == [40] * world


# --------------------------------------------------------------------------- seqdims


@pytest.fixture(scope="module")
def shape_env() -> tuple[torch.SymInt, torch.SymInt, frozenset[sympy.Symbol]]:
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()
    syms = []
    for name, value in (("seq", 10), ("other", 6)):
        sym = env.create_symbol(value, source=ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
        syms.append(env.create_symintnode(sym, hint=value))
    s, t = syms
    return s, t, frozenset({s.node.expr})


def test_classify(shape_env: tuple[torch.SymInt, torch.SymInt, frozenset[sympy.Symbol]]) -> None:
    s, t, syms = shape_env
    plain, merged = SeqDim(-1, False, 0), SeqDim(-1, True, 0)
    cases = {
        "s": (s, plain),
        "s - 1": (s - 1, SeqDim(-1, False, -1)),
        "s - 2": (s - 2, SeqDim(-1, False, -2)),
        "2 * s": (2 * s, merged),
        "s * 3": (s * 3, SeqDim(-1, True, 0)),
        "4 * (s - 1)": (4 * (s - 1), SeqDim(-1, True, -1)),
        "3 * s - 3": (3 * s - 3, SeqDim(-1, True, -1)),
        "s * t": (s * t, merged),  # merged with another dynamic dimension
        "s + 1": (s + 1, None),
        "2 * s + 1": (2 * s + 1, None),
        "s * s": (s * s, None),
        "s + t": (s + t, None),
        "t": (t, None),
        "2 * t": (2 * t, None),
        "10 (constant)": (10, None),
        "0 (constant)": (0, None),
    }
    wrong = {
        name: (str(size), classify(size, syms), want)
        for name, (size, want) in cases.items()
        if classify(size, syms) != want
    }
    assert not wrong
    # Without the sequence symbol nothing is the sequence.
    assert classify(s, frozenset()) is None
    assert classify(2 * s, frozenset()) is None


def test_hint(shape_env: tuple[torch.SymInt, torch.SymInt, frozenset[sympy.Symbol]]) -> None:
    s, t, _ = shape_env
    assert hint(s) == 10 and hint(s - 1) == 9 and hint(2 * s * t) == 120 and hint(7) == 7


def test_seq_dims_of_traced_values() -> None:
    recorded: list[torch.Tensor] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        (outputs,) = gm.graph.output_node().args
        recorded.extend(node.meta["example_value"] for node in outputs)
        return gm.forward

    def f(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        shifted = torch.relu(x[:, :-1])  # (3, s - 1, 4)
        merged = torch.relu(x.reshape(-1, 4))  # (3 * s, 4)
        heads = torch.relu(x.reshape(3, -1, 2, 2).transpose(1, 2))  # (3, 2, s, 2)
        flat = torch.relu(shifted.reshape(3, -1))  # (3, 4 * (s - 1))
        summed = torch.relu(x.sum(1))  # (3, 4)
        return shifted, merged, heads, flat, summed

    torch._dynamo.reset()
    x = torch.randn(3, 9, 4)
    torch._dynamo.mark_dynamic(x, 1)
    torch.compile(f, backend=record, fullgraph=True)(x)
    torch._dynamo.reset()

    names = ["shifted", "merged", "heads", "flat", "summed"]
    assert len(recorded) == len(names)
    sizes = [d for value in recorded for d in value.shape if isinstance(d, torch.SymInt)]
    syms = frozenset().union(*(d.node.expr.free_symbols for d in sizes))
    assert len(syms) == 1, syms  # only the sequence length is dynamic
    got = {name: seq_dims(value, syms) for name, value in zip(names, recorded, strict=True)}
    assert got == {
        "shifted": [SeqDim(1, False, -1)],
        "merged": [SeqDim(0, True, 0)],
        "heads": [SeqDim(2, False, 0)],
        "flat": [SeqDim(1, True, -1)],
        "summed": [],
    }
