"""Byte-level batches drawn from the built-in corpus (``autosp/data/corpus.txt``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch.distributed.device_mesh import DeviceMesh

from autosp.mesh import data_parallel_rank, split_batch

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus.txt"


def load_corpus(path: Path = CORPUS) -> torch.Tensor:
    """The corpus as a 1-D int64 tensor of byte values."""
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()


def batches(
    seq_len: int, batch_size: int, seed: int, mesh: DeviceMesh | None = None
) -> Iterator[torch.Tensor]:
    """Endless ``(batch_size, seq_len)`` windows at random offsets, for this rank.

    The windows depend only on ``seed``: every rank draws the same global batch of
    ``dp * batch_size`` windows (``dp`` from ``mesh``, 1 without one) and keeps its
    data-parallel group's rows, so the ranks of one sequence-parallel group get the same batch
    and the groups different ones. Labels are the inputs themselves: the model shifts them
    internally. A corpus shorter than ``seq_len`` is tiled.
    """
    dp = data_parallel_rank(mesh)[1] if mesh is not None else 1
    tokens = load_corpus()
    if len(tokens) < seq_len:
        tokens = tokens.repeat(seq_len // len(tokens) + 1)
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(len(tokens) - seq_len + 1, (dp * batch_size,), generator=generator)
        batch = torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
        yield batch if mesh is None else split_batch(batch, mesh)
