"""Checkpointing the model asked for (Note [Checkpointed regions])."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils.checkpoint import CheckpointPolicy, checkpoint

from autosp.compiler.checkpoints import CHECKPOINT, inline_checkpoints_pass
from autosp.compiler.ops_table import op_name
from tests.multirank import run_ranks
from tests.workers import checkpointed_parity


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b(x))

    def outer(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.inner, self.a(x), use_reentrant=False) * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.outer, x, use_reentrant=False).sum()


def test_regions_are_inlined_and_tagged() -> None:
    """Nested regions are copied into the graph, each copied op tagged for recomputation with
    its region's id; ops outside stay untagged; the graph computes what the model does."""
    captured: list[tuple[GraphModule, list]] = []

    def capture(gm: GraphModule, inputs: list) -> GraphModule:
        captured.append((gm, inputs))
        return gm

    model = Nested()
    x = torch.randn(3, 4)
    torch.compile(model, backend=capture, fullgraph=True)(x)
    ((gm, inputs),) = captured
    assert gm.graph.find_nodes(op="call_function", target=CHECKPOINT)
    inline_checkpoints_pass(gm, None)  # type: ignore[arg-type]
    assert not gm.graph.find_nodes(op="call_function", target=CHECKPOINT)
    ops = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    tags = {op_name(n): n.meta.get("recompute") for n in ops}
    assert tags["relu"] == tags["mul"] == CheckpointPolicy.PREFER_RECOMPUTE, tags
    assert tags["sum"] is None, tags
    regions = {n.meta["ac_graph_id"] for n in ops if "ac_graph_id" in n.meta}
    assert len(regions) == 2
    torch.testing.assert_close(gm(*inputs)[0], model(x))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_hf_gradient_checkpointing(backend: str) -> None:
    """``gradient_checkpointing_enable()`` keeps parity, with nothing gathered."""
    per_rank = run_ranks(2, checkpointed_parity, "llama", backend)
    for result in per_rank:
        assert result["loss_rel_err"] <= 1e-5, result
        assert max(result["grad_rel_err"].values()) <= 1e-4, result["grad_rel_err"]
        assert result["gathered_ops"] == [] and not result["warnings"], result
        assert result["attention"] and all(" ulysses (" in a for a in result["attention"])
