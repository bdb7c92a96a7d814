"""Placements: how a value of the single-process program is held by the ranks of the group.

Note [Placements and padding]
-----------------------------
The token sequence of length ``S`` is split into ``P`` contiguous blocks of
``L = 2 * ceil(S / 2P)`` tokens; rank ``r`` holds tokens ``[r*L, (r+1)*L)``. The last blocks are
padded so that every rank holds exactly ``L`` rows::

    S = 10, P = 3, L = 4      rank:    0         1         2
                              rows: [0 1 2 3][4 5 6 7][8 9 p p]    (p = padding)

``L`` is even so that a load-balanced causal ring (Note [Load balancing]) can split each block
into two halves; that costs at most ``2P - 1`` padding rows in all.

* ``Shard(dim)``: the local tensor is the full tensor's rows ``[r*L, (r+1)*L)`` along ``dim``,
  padded past the logical length. ``inner`` > 0 marks a dimension in which the sequence is
  merged with others, ``(outer, S, inner)`` flattened (e.g. ``logits.view(-1, V)``).
  ``length`` is the logical length relative to ``S``: ``-1`` after ``x[:, :-1]`` (that row
  becomes padding on the last rank that holds it).
* ``Replicate()``: every rank holds the same full value.
* ``Partial()``: the full value is the sum over ranks.
* ``Local(bag, dim)``: rows along ``dim`` are items made from this rank's tokens (padding rows
  included) in an order and number of this rank's own, e.g. its tokens sorted by expert
  (Note [Token bags] in ``routing.py``). No slice of the global value: it is never gathered,
  only brought back to its tokens' rows. ``dim`` None: a value computed from the whole bag
  (its per-expert counts).

Padding rows only ever reach padding rows: tokens are processed row-wise, attention is causal
or masks padding keys, and labels of padding rows are ``ignore_index``. Slicing a replicated
value fills its padding rows with copies of its last row (not zeros): they stay as finite as
real rows, since a non-finite padding row would reach real ones as ``0 * nan`` (a masked key's
value in attention, a weight's gradient).

Gradients follow the dual rule: a shard holds its rows' gradient, a replicated value holds a
partial gradient (the sum over ranks is the true one), a partial value holds the full one.
Parameters are replicated, so their per-rank gradients are summed over the group.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Shard:
    """Sharded along ``dim``; see the note above for ``inner`` and ``length``."""

    dim: int
    inner: int = 0
    length: int = 0

    @property
    def merged(self) -> bool:
        return self.inner > 0


@dataclass(frozen=True, slots=True)
class Replicate:
    """Every rank holds the whole value. ``loss_grad`` marks a value whose gradient every rank
    seeds identically (the loss), so no rescaling is needed at the output."""

    loss_grad: bool = False


@dataclass(frozen=True, slots=True)
class Partial:
    """The value is the sum over ranks of the local values."""


@dataclass(frozen=True, slots=True)
class Local:
    """Rank-local items of the bag made by the node named ``bag`` along ``dim`` (see the note
    above); values of one bag line up item by item."""

    bag: str
    dim: int | None


Placement = Shard | Replicate | Partial | Local
REPLICATE = Replicate()


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim
