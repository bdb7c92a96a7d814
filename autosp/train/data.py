"""Byte-level batches drawn from the built-in corpus (``autosp/data/corpus.txt``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus.txt"


def load_corpus(path: Path = CORPUS) -> torch.Tensor:
    """The corpus as a 1-D int64 tensor of byte values."""
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()


def batches(seq_len: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless ``(batch_size, seq_len)`` windows at random offsets.

    The windows depend only on ``seed``, so every rank draws the same batches. Labels are the
    inputs themselves: the model shifts them internally. A corpus shorter than ``seq_len`` is
    tiled.
    """
    tokens = load_corpus()
    if len(tokens) < seq_len:
        tokens = tokens.repeat(seq_len // len(tokens) + 1)
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(len(tokens) - seq_len + 1, (batch_size,), generator=generator)
        yield torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])
