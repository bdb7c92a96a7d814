"""Summing parameter gradients over the sequence-parallel group, once per backward.

Each rank's parameter gradient is a partial sum (it saw only its own tokens). A hook on every
parameter records the gradient this backward produced; when the backward ends, the recorded
gradients are flattened into buckets and summed with one all-reduce per bucket. Gradients
accumulated by earlier backwards (gradient accumulation) are not summed twice, and every rank
ends with the same bits (Note [Identical replicas]); inside ``deferred()`` the backward ends without
the all-reduce and the next one outside it reduces everything recorded since the last. A
gradient held over that way is dropped if ``zero_grad()`` reset ``.grad`` to None in between;
if ``.grad`` was changed in place instead (``zero_grad(set_to_none=False)``, clipping), what
it holds is no longer known and the next backward raises.

With data parallelism the group holds every rank of the ``dp x sp`` mesh and the sum is
divided by ``dp``: the mean over DP groups of each group's sum (Note [Layout of the mesh]).

A parameter may get a gradient on some ranks only (an expert that none of this rank's tokens
were routed to). The ranks first agree, over the host channel, on the parameters that got one
anywhere: each such parameter joins the same bucket on every rank (zeros where this rank
produced none) and ends with the full gradient, as in one process; a parameter that got none
anywhere keeps ``grad=None``, as in one process.

Note [Identical replicas]
    The ranks' parameters must stay bitwise equal, or the replicas drift apart step by step.
    ``.grad = local + (sum - local)`` rounds differently on each rank, so the reduced sum is
    written whole instead. Where ``.grad`` was None before this reduction's first backward,
    ``.grad`` holds exactly the recorded local gradient and is overwritten with the sum. Where
    it held a reduced gradient (accumulation without ``no_sync``), the hook hands autograd a
    zero gradient (``.grad`` stays that base, the same on every rank) and the sum is added to
    it. Only a base under ``no_sync`` mixes with local terms; there ``sum - local`` is added,
    correct to rounding but not bitwise equal across ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from autosp.comm.faults import collective
from autosp.comm.ops import _counts
from autosp.errors import AutoSPError


class GradSync:
    """Bucketed all-reduce of the gradients produced by each backward pass."""

    def __init__(
        self,
        module: nn.Module,
        group: dist.ProcessGroup,
        bucket_mb: float,
        channel: dist.ProcessGroup | None,
        dp: int = 1,
    ) -> None:
        """``group``: the ranks to sum over; ``dp``: what to divide the sum by (the DP groups
        among them); ``channel``: a gloo group over the same ranks for host values, or None
        where the group is emulated in one process (the fake backend) or has one rank."""
        self.group = group
        self.channel = channel
        self.dp = dp
        self._deferred = False
        self.bucket_bytes = int(bucket_mb * 2**20)
        self._fresh: dict[nn.Parameter, torch.Tensor] = {}
        self._based: dict[nn.Parameter, bool] = {}
        """Whether ``.grad`` held a reduced gradient at the first backward since the last
        reduction (Note [Identical replicas])."""
        self._mixed: set[nn.Parameter] = set()
        """Parameters whose ``.grad`` adds local gradients to such a base (under no_sync)."""
        self._held: dict[nn.Parameter, tuple[int, int] | None] = {}
        """``_grad_state`` of each parameter whose fresh gradient a deferred backward held."""
        self._queued = False
        self._params = [p for p in module.parameters() if p.requires_grad]
        self._handles = [p.register_hook(self._make_hook(p)) for p in self._params]

    def _make_hook(self, param: nn.Parameter):  # noqa: ANN202
        def hook(grad: torch.Tensor | None) -> torch.Tensor | None:
            if grad is None:  # a compiled backward's undefined gradient: none produced here
                return grad
            if not self._queued:
                self._queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._sync)
            self._check_held(param)
            based = self._based.setdefault(param, param.grad is not None)
            previous = self._fresh.get(param)
            self._fresh[param] = grad if previous is None else previous + grad
            if not based:
                return grad
            if self._deferred:
                self._mixed.add(param)
                return grad
            return torch.zeros_like(grad)

        return hook

    def _check_held(self, param: nn.Parameter) -> None:
        """Forget ``param``'s held gradient if ``.grad`` was reset to None since; raise if it
        was changed in place."""
        if param not in self._held or self._held.pop(param) == _grad_state(param):
            return
        if param.grad is not None:
            self._fresh.clear()
            self._based.clear()
            self._mixed.clear()
            self._held.clear()
            raise AutoSPError(
                "autosp: a gradient accumulated under no_sync() was changed in place before it "
                "was reduced (zero_grad(set_to_none=False), clipping or scaling between "
                "micro-batches), so the ranks can no longer reduce what it holds. Change "
                "gradients only after the backward outside no_sync(), and reset them with "
                "zero_grad() (set_to_none=True, the default)."
            )
        self._fresh.pop(param, None)
        self._based.pop(param, None)
        self._mixed.discard(param)

    def _produced(self) -> list[nn.Parameter]:
        """The parameters that got a gradient in this backward on any rank of the group."""
        mine = [p in self._fresh for p in self._params]
        if self.channel is not None:
            flags = torch.tensor(mine, dtype=torch.int32)
            with collective("the gradient all-reduce", self.group):
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.channel)
            mine = [bool(f) for f in flags.tolist()]
        return [p for p, produced in zip(self._params, mine, strict=True) if produced]

    def _buckets(self, fresh: dict[nn.Parameter, torch.Tensor]) -> list[list[nn.Parameter]]:
        buckets: list[list[nn.Parameter]] = []
        size = 0
        for param, grad in fresh.items():
            nbytes = grad.numel() * grad.element_size()
            same_kind = buckets and fresh[buckets[-1][0]].dtype == grad.dtype
            if not same_kind or size + nbytes > self.bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(param)
            size += nbytes
        return buckets

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Backward passes inside the block accumulate ``.grad`` locally, unreduced."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False

    def _sync(self) -> None:
        self._queued = False
        if self._deferred:
            self._held = {p: _grad_state(p) for p in self._fresh}
            return
        for param in list(self._held):
            self._check_held(param)
        try:
            fresh = {
                p: self._fresh[p] if p in self._fresh else torch.zeros_like(p)
                for p in self._produced()
            }
            for bucket in self._buckets(fresh):
                flat = torch.cat([fresh[p].reshape(-1) for p in bucket])
                summed = flat.clone()
                _counts["grad_all_reduce"] += 1
                with collective("the gradient all-reduce", self.group):
                    dist.all_reduce(summed, group=self.group)
                if self.dp > 1:
                    summed /= self.dp
                offset = 0
                for param in bucket:
                    n = param.numel()
                    total = summed[offset : offset + n].view_as(param)
                    if param.grad is None:
                        param.grad = total.clone()
                    elif param in self._mixed:
                        param.grad.add_(total - flat[offset : offset + n].view_as(param))
                    elif self._based.get(param, True):
                        param.grad.add_(total)
                    else:
                        param.grad.copy_(total)
                    offset += n
        finally:
            self._fresh.clear()
            self._based.clear()
            self._mixed.clear()

    def remove(self) -> None:
        self._fresh.clear()
        self._based.clear()
        self._mixed.clear()
        self._held.clear()
        for handle in self._handles:
            handle.remove()


def _grad_state(param: nn.Parameter) -> tuple[int, int] | None:
    """Which tensor ``param.grad`` is and its in-place version (``zero_`` changes it)."""
    return None if param.grad is None else (id(param.grad), param.grad._version)
