"""Summing parameter gradients over the sequence-parallel group, once per backward.

Each rank's parameter gradient is a partial sum (it saw only its own tokens). A hook on every
parameter records the gradient this backward produced; when the backward ends, the recorded
gradients are flattened into buckets, summed with one all-reduce per bucket, and the
difference is added to ``.grad``. Gradients accumulated by earlier backwards (gradient
accumulation) are therefore not summed twice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from autosp.comm.faults import collective
from autosp.comm.ops import _counts


class GradSync:
    """Bucketed all-reduce of the gradients produced by each backward pass."""

    def __init__(self, module: nn.Module, group: dist.ProcessGroup, bucket_mb: float) -> None:
        self.group = group
        self.bucket_bytes = int(bucket_mb * 2**20)
        self._fresh: dict[nn.Parameter, torch.Tensor] = {}
        self._queued = False
        self._params = [p for p in module.parameters() if p.requires_grad]
        self._handles = [p.register_hook(self._make_hook(p)) for p in self._params]

    def _make_hook(self, param: nn.Parameter):  # noqa: ANN202
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if not self._queued:
                self._queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._sync)
            previous = self._fresh.get(param)
            self._fresh[param] = grad if previous is None else previous + grad
            return grad

        return hook

    def _buckets(self) -> list[list[nn.Parameter]]:
        buckets: list[list[nn.Parameter]] = []
        size = 0
        for param in (p for p in self._params if p in self._fresh and p.grad is not None):
            grad = self._fresh[param]
            nbytes = grad.numel() * grad.element_size()
            same_kind = buckets and self._fresh[buckets[-1][0]].dtype == grad.dtype
            if not same_kind or size + nbytes > self.bucket_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(param)
            size += nbytes
        return buckets

    def _sync(self) -> None:
        self._queued = False
        try:
            for bucket in self._buckets():
                fresh = [self._fresh[p] for p in bucket]
                flat = torch.cat([g.reshape(-1) for g in fresh])
                summed = flat.clone()
                _counts["grad_all_reduce"] += 1
                with collective("the gradient all-reduce", self.group):
                    dist.all_reduce(summed, group=self.group)
                delta = summed - flat
                offset = 0
                for param, grad in zip(bucket, fresh, strict=True):
                    n = grad.numel()
                    param.grad.add_(delta[offset : offset + n].view_as(param.grad))
                    offset += n
        finally:
            self._fresh.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
