"""The row chunks that autosp's token-looping ops (chunked loss, tiled MLP) walk: their size
and the loop's slices.

Note [Chunk loops on fake tensors]
----------------------------------
``linear_cross_entropy`` and ``tiled_mlp`` loop over chunks of rows, and every full chunk
allocates and frees the same buffers: the live bytes at the start of each iteration are the
same, so each full chunk reaches the same peak. ``autosp plan`` runs these ops' implementations
on fake tensors (Note [Planning by tracing]), where there are no values to compute and a
million-token plan would dispatch tens of thousands of chunks. On fake tensors the loop
therefore visits the first chunk and the last (the only one that can be shorter): the same
peak and the same output shapes, in two iterations. Real tensors visit every chunk.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake


def rows_per_chunk(chunk_tokens: int | None, row_bytes: int, chunk_bytes: int) -> int:
    """Rows per chunk: ``chunk_tokens`` when given, else as many rows of ``row_bytes`` as make
    ``chunk_bytes`` (at least one)."""
    return chunk_tokens or max(1, chunk_bytes // row_bytes)


def row_chunks(rows: int, chunk: int, like: torch.Tensor) -> list[slice]:
    """The slices of ``rows`` rows, ``chunk`` at a time; on fake ``like`` only the first and
    the last (Note [Chunk loops on fake tensors])."""
    starts = range(0, rows, chunk)
    if is_fake(like) and len(starts) > 2:
        starts = starts[:: len(starts) - 1]
    return [slice(start, start + chunk) for start in starts]
