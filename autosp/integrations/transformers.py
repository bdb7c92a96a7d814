"""Hugging Face transformers: what a model needs before its forward is captured as one graph."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torch import nn


def _captures_outputs(forward: Callable[..., Any]) -> bool:
    """Whether ``forward`` is wrapped by transformers' ``capture_outputs`` (possibly under
    other decorators, each keeping ``__wrapped__``)."""
    fn: Any = forward
    while fn is not None:
        code = getattr(fn, "__code__", None)
        if code is not None and code.co_qualname.startswith("capture_outputs."):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def install_output_hooks(model: nn.Module) -> None:
    """Install transformers' output-recording hooks (``output_router_logits=True`` and the
    like) on the submodules whose forward would install them on its first call: that first
    call takes a ``threading.Lock``, which Dynamo cannot trace (a graph break). Installed
    early, the hooks are exactly those the first call would install."""
    capturing = sys.modules.get("transformers.utils.output_capturing")
    if capturing is None:
        return
    for module in model.modules():
        if _captures_outputs(type(module).forward) and capturing._CAN_RECORD_REGISTRY.get(module):
            capturing.maybe_install_capturing_hooks(module)
