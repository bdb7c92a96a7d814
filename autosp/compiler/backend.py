"""The ``torch.compile`` backend: find the sequence, rewrite the graph, compile it, run it.

The backend receives Dynamo's graph of the whole forward (one graph: ``fullgraph=True``),
whose token inputs were marked dynamic along the sequence by ``autosp.api``. It reads the
sequence symbols off those inputs, runs the sharding pass, hands the rank-local graph to the
inner compiler (Inductor or ``aot_eager``) and wraps the result in a ``Runner`` that checks
inputs and trims sharded outputs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sympy
import torch
import torch.distributed as dist
from torch.fx import GraphModule, Node

from autosp.compiler import runtime
from autosp.compiler.eager_attention import fuse_eager_attention_pass
from autosp.compiler.masks import MaskPlan, recognise_masks
from autosp.compiler.ops_table import ATTENTION, op_name
from autosp.compiler.propagate import GroupInfo, Plan, ShardingPass, meta
from autosp.errors import AutoSPError, InputMismatchError
from autosp.shards import register_shard

if TYPE_CHECKING:
    from autosp.api import Config

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class TraceState:
    """What the module wrapper tells the backend about the call being traced."""

    seq_len: int = 0
    plans: list[Plan] = field(default_factory=list)


def is_user_input(node: Node) -> bool:
    """A placeholder fed by the caller's arguments, not by a parameter or buffer."""
    grapharg = node.meta.get("grapharg")
    if grapharg is None or not isinstance(meta(node), torch.Tensor):
        return False
    name = grapharg.source.name
    return not any(part in name for part in ("_parameters", "_buffers", "_modules"))


def input_name(node: Node) -> str:
    """The caller's name for an input placeholder: ``input_ids`` for ``L['kwargs']['input_ids']``,
    ``argument 1`` for ``L['args'][1]``."""
    source = node.meta["grapharg"].source.name
    found = re.findall(r"\['([^']+)'\]|\[(\d+)\]", source)
    if not found:
        return source
    key, index = found[-1]
    return key or f"argument {index}"


def find_sequence(gm: GraphModule, seq_len: int) -> tuple[frozenset[sympy.Symbol], tuple[str, int]]:
    """The symbols that stand for the sequence length, and one (placeholder, dim) holding it."""
    syms: set[sympy.Symbol] = set()
    source: tuple[str, int] | None = None
    for node in gm.graph.find_nodes(op="placeholder"):
        if not is_user_input(node):
            continue
        for dim, size in enumerate(meta(node).shape):
            if isinstance(size, torch.SymInt) and size.node.hint == seq_len:
                expr = size.node.expr
                if isinstance(expr, sympy.Symbol):
                    syms.add(expr)
                    source = source or (node.name, dim)
    if source is None:
        raise AutoSPError(
            f"autosp: no input of the compiled graph has a dynamic sequence dimension of length "
            f"{seq_len}; the model code specialised the sequence length. Check for Python "
            "branches on the sequence length in the model's forward."
        )
    return frozenset(syms), source


def check_attention(gm: GraphModule) -> None:
    if not any(op_name(n) in ATTENTION for n in gm.graph.nodes):
        raise AutoSPError(
            "autosp: no attention found in the captured graph. autosp recognises "
            "torch.nn.functional.scaled_dot_product_attention and attention written out as "
            "matmul-softmax-matmul; a model without attention has nothing to split."
        )


Compile = Callable[[MaskPlan], tuple[Callable[..., Any], Plan]]


class Runner:
    """Runs the compiled rank-local graph: checks inputs, picks the graph whose mask
    assumptions hold (Note [Mask probing]) and trims padding off sharded outputs."""

    def __init__(
        self,
        compile_graph: Compile,
        masks: MaskPlan,
        gm: GraphModule,
        group: dist.ProcessGroup,
        seq_source: tuple[str, int],
        check_inputs: bool,
    ) -> None:
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        self.compile_graph = compile_graph
        self.masks = masks
        self.primary = compile_graph(masks)
        self.fallback: tuple[Callable[..., Any], Plan] | None = None
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.seq_index = [p.name for p in placeholders].index(seq_source[0])
        self.seq_dim = seq_source[1]
        self.inputs = {i: input_name(p) for i, p in enumerate(placeholders) if is_user_input(p)}
        self.check_inputs = check_inputs

    def _select(self, args: Sequence[Any]) -> tuple[Callable[..., Any], Plan]:
        if all(guard.holds(args[guard.index]) for guard in self.masks.guards):
            return self.primary
        if self.fallback is None:
            names = ", ".join(self.inputs[g.index] for g in self.masks.guards)
            logger.warning(
                "autosp: inputs %s are not plain positions/all-ones, so the attention mask is "
                "not causal; compiling a graph for such inputs (structured masks where "
                "recognised, else the model's own mask)",
                names,
            )
            self.fallback = self.compile_graph(self.masks.fallback or MaskPlan({}, ()))
        return self.fallback

    def __call__(self, *args: Any) -> Any:
        if self.check_inputs:
            self._check_same_inputs(args)
            self.check_inputs = False
        compiled, plan = self._select(args)
        outputs = list(compiled(*args))
        seq_len = args[self.seq_index].shape[self.seq_dim]
        for out in plan.sharded_outputs:
            rows = runtime.valid_rows(seq_len, out.length, self.rank, self.world)
            trimmed = outputs[out.index].narrow(out.dim, 0, rows)
            register_shard(trimmed, out.dim, seq_len, out.length, self.group)
            outputs[out.index] = trimmed
        return outputs

    def _check_same_inputs(self, args: Sequence[Any]) -> None:
        """One small all-gather of input checksums: every rank must hold the same batch."""
        sums = []
        for index in self.inputs:
            x = args[index].detach().reshape(-1).to(torch.float64)
            weights = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device)
            sums.append(torch.stack([x.sum(), (x * weights.remainder(9973)).sum()]))
        local = torch.stack(sums) if sums else torch.zeros(0, 2, dtype=torch.float64)
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local, group=self.group)
        for rank, other in enumerate(gathered):
            if not torch.equal(other, gathered[0]):
                bad = [
                    name
                    for name, a, b in zip(self.inputs.values(), other, gathered[0], strict=True)
                    if not torch.equal(a, b)
                ]
                raise InputMismatchError(
                    f"autosp: rank {rank} of the sequence-parallel group received a different "
                    f"batch than rank 0 (inputs {', '.join(bad)}). Every rank of the group must "
                    "get the same full-length batch; give each data-parallel group, not each "
                    "rank, its own data (seed the sampler the same way on all ranks of a group)."
                )


@dataclass(slots=True)
class AutoSPBackend:
    """A ``torch.compile`` backend that makes the captured forward sequence-parallel."""

    group: dist.ProcessGroup
    config: Config
    state: TraceState
    hybrid: dict[int, tuple[str, str]]

    def __call__(self, gm: GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        fuse_eager_attention_pass(gm)
        check_attention(gm)
        syms, source = find_sequence(gm, self.state.seq_len)
        group = GroupInfo(
            dist.get_rank(self.group),
            dist.get_world_size(self.group),
            self.group.group_name,
            self.hybrid,
        )
        inner = torch._dynamo.lookup_backend(self.config.backend)

        def compile_graph(masks: MaskPlan) -> tuple[Callable[..., Any], Plan]:
            local_gm, plan = ShardingPass(
                gm,
                group,
                syms,
                source,
                masks.masks,
                self.config.attention,
                self.config.load_balance,
            ).run()
            logger.debug("autosp rank-local graph:\n%s", local_gm.code)
            for line in plan.attention + plan.loss:
                logger.info("autosp: %s", line)
            self.state.plans.append(plan)
            return inner(local_gm, list(example_inputs)), plan

        masks = (
            recognise_masks(gm, example_inputs, syms)
            if self.config.recognise_masks
            else MaskPlan({}, ())
        )
        return Runner(compile_graph, masks, gm, self.group, source, self.config.check_inputs)
