"""Ranks that disagree or fail: the per-call input check and clear errors from collectives.

Note [Input agreement]
----------------------
Every rank of a sequence-parallel group must call the model with the same batch. Different
*shapes* make the ranks run collectives of different sizes: gloo aborts the process from a
background thread (no Python error), NCCL hangs or mixes the data. So shapes are compared on
every call before the graph runs. Shapes are host values, so one all-reduce of a fixed-size
int64 vector over a host (gloo) channel compares them without waiting for the accelerator: the
vector is ``[call count, digest of (names, dtypes, shapes), digest of contents]`` followed by
its negation, reduced with MAX, so every rank learns ``max`` and ``-min`` of each entry; they are
equal everywhere exactly when all ranks agree. The vector has the same size whatever the
inputs, so the check itself cannot be a mismatched collective.

*Contents* live on the accelerator. Each call computes integer checksums there (sums of the
bits, exact and independent of summation order), copies them to pinned host memory without
blocking, and the *next* call's exchange carries them: a content mismatch is reported one call
late, with no synchronisation of host and device per step. The first call waits for its own
checksums (it compiles anyway), so a wrong sampler fails before the first step.

On a mismatch every rank holds the same reduced vector, so all ranks take the error path
together: an ``all_gather_object`` of each rank's description names the inputs that differ
and the ranks that hold them, and every rank raises ``InputMismatchError``.

The channel is a gloo group of its own over the same ranks, with the group's timeout: it never
interleaves with the model's collectives, and it also notices a rank that has exited (the
connection is reset) or is stuck (the timeout) at the start of the next call.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from autosp.errors import AutoSPError, CollectiveError, InputMismatchError

logger = logging.getLogger(__name__)

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _describe_group(group: dist.ProcessGroup) -> str:
    ranks = dist.get_process_group_ranks(group)
    return f"the sequence-parallel group (global ranks {ranks}; this is rank {dist.get_rank()})"


@contextlib.contextmanager
def collective(op: str, group: dist.ProcessGroup) -> Iterator[None]:
    """Turn a failure of the collective ``op`` over ``group`` into a ``CollectiveError`` that
    names the group, this rank and what to check. autosp's own errors pass through."""
    try:
        yield
    except AutoSPError:
        raise
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CollectiveError(
            f"autosp: {op} over {_describe_group(group)} failed: {first[:300]}. Another rank of "
            "the group has most likely exited or stopped responding (its log shows the first "
            "error), or the ranks ran different collectives (different batches, or a different "
            "number of model calls or backward passes). A rank that stops responding is waited "
            "for at most the process-group timeout (init_process_group(timeout=...))."
        ) from err


def _timeout(group: dist.ProcessGroup) -> timedelta:
    """The timeout of ``group``'s backend (the user's ``init_process_group(timeout=...)``)."""
    for device in ("cuda", "cpu"):
        with contextlib.suppress(AttributeError, RuntimeError):
            return group._get_backend(torch.device(device)).options._timeout
    return dist.default_pg_timeout


def host_channel(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """A gloo group over the ranks of ``group``, with its timeout. Members synchronise among
    themselves only, so each group's ranks may create theirs independently."""
    return dist.new_group(
        dist.get_process_group_ranks(group),
        timeout=_timeout(group),
        backend="gloo",
        use_local_synchronization=True,
    )


def _digest(value: object) -> int:
    """A 56-bit digest of ``repr(value)``: equal on every rank for equal values (unlike
    ``hash``, which is salted per process), and its negation fits in an int64."""
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=7).digest(), "big")


def checksum(x: torch.Tensor) -> torch.Tensor:
    """Two int64 sums of the bits of ``x`` on its device: plain and position-weighted. Integer
    sums wrap and are exact, so equal tensors give equal sums on every rank."""
    flat = x.detach().reshape(-1)
    bits = flat.view(_INT_OF_SIZE[min(flat.element_size(), 8)]).to(torch.int64)
    weights = torch.arange(1, bits.numel() + 1, device=bits.device) * 2654435761
    return torch.stack([bits.sum(), (bits * weights).sum()])


@dataclass(slots=True)
class _Contents:
    """Checksums of one call's inputs, on their way to the host."""

    call: int
    names: list[str]
    host: torch.Tensor
    ready: Any  # torch.cuda.Event, or None when ``host`` already holds the values

    @classmethod
    def start(cls, call: int, inputs: Mapping[str, torch.Tensor]) -> _Contents:
        names = list(inputs)
        if not names:
            return cls(call, names, torch.zeros(0, 2, dtype=torch.int64), None)
        devices = [t.device for t in inputs.values()]
        device = next((d for d in devices if d.type != "cpu"), devices[0])
        sums = torch.stack([checksum(t).to(device) for t in inputs.values()])
        if device.type != "cuda":
            return cls(call, names, sums.cpu(), None)
        host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
        host.copy_(sums, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(call, names, host, ready)

    def sums(self) -> dict[str, tuple[int, ...]]:
        if self.ready is not None:
            self.ready.synchronize()
        return {name: tuple(row) for name, row in zip(self.names, self.host.tolist(), strict=True)}


class InputCheck:
    """Checks on every call that the ranks of ``group`` got the same batch (Note [Input
    agreement]): shapes at once, contents one call late (the first call at once)."""

    def __init__(self, group: dist.ProcessGroup, channel: dist.ProcessGroup) -> None:
        """``channel``: a gloo group over the ranks of ``group`` (``host_channel``)."""
        self.group = group
        self.channel = channel
        self.calls = 0
        self.pending: _Contents | None = None

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """``inputs``: this call's tensors by the caller's names."""
        self.calls += 1
        shapes = {
            name: (str(t.dtype).removeprefix("torch."), tuple(t.shape))
            for name, t in inputs.items()
        }
        contents = _Contents.start(self.calls, inputs)
        checked, self.pending = (contents, None) if self.calls == 1 else (self.pending, contents)
        sums = checked.sums() if checked is not None else {}
        local = torch.tensor([self.calls, _digest(shapes), _digest(sums)], dtype=torch.int64)
        reduced = torch.cat([local, -local])
        with collective("the input check", self.group):
            dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=self.channel)
        if torch.equal(reduced[:3], -reduced[3:]):
            return
        mine = {"call": self.calls, "shapes": shapes, "sums": sums}
        if checked is not None:
            mine["checked_call"] = checked.call
        everyone: list[Any] = [None] * dist.get_world_size(self.channel)
        with collective("the input check", self.group):
            dist.all_gather_object(everyone, mine, group=self.channel)
        raise InputMismatchError(_mismatch(everyone))


def host_channel_for(group: dist.ProcessGroup) -> dist.ProcessGroup | None:
    """The host channel of ``group``, or None where there is nothing to agree on: a group of
    one rank, or the ``fake`` backend that emulates a group in one process."""
    if dist.get_world_size(group) == 1 or "fake" in dist.get_backend_config(group):
        return None
    return host_channel(group)


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def _mismatch(everyone: list[dict[str, Any]]) -> str:
    """What differs between the ranks' descriptions, against rank 0, and how to fix it."""
    first = everyone[0]
    calls = [d["call"] for d in everyone]
    if len(set(calls)) > 1:
        counts = ", ".join(f"rank {r}: {c}" for r, c in enumerate(calls))
        return (
            "autosp: the ranks of the sequence-parallel group called the model a different "
            f"number of times (calls so far: {counts}). Every rank of the group must run the "
            "same forward passes, evaluation included (e.g. not `if rank == 0: evaluate()`)."
        )
    key = "shapes" if any(d["shapes"] != first["shapes"] for d in everyone) else "sums"
    other = [r for r, d in enumerate(everyone) if d[key] != first[key]]
    names = sorted(
        {n for d in everyone for n in {*d[key], *first[key]} if d[key].get(n) != first[key].get(n)}
    )
    if key == "shapes":
        when = f"at call {first['call']}"
        details = []
        for name in names:
            seen = [d["shapes"].get(name) for d in everyone]
            shown = ", ".join(
                f"{'absent' if s is None else f'{s[0]} {s[1]}'} on rank {r}"
                for r, s in enumerate(seen)
                if r == 0 or s != seen[0]
            )
            details.append(f"{name}: {shown}")
        detail = "; ".join(details)
    else:
        late = "" if first["checked_call"] == first["call"] else ", found one call late"
        when = f"at call {first['checked_call']}{late}"
        detail = "same shapes, different values"
    return (
        f"autosp: {_ranks(other)} of the sequence-parallel group received a different batch "
        f"than rank 0 (inputs {', '.join(names)}) {when} ({detail}). Every rank of the group "
        "must get the same full-length batch; give each data-parallel group, not each rank, its "
        "own data (seed the sampler the same way on all ranks of a group)."
    )
