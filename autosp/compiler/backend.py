"""The ``torch.compile`` backend: find the sequence, rewrite the graph, compile it, run it.

The backend receives Dynamo's graph of the whole forward (one graph: ``fullgraph=True``),
whose token inputs were marked dynamic along the sequence by ``autosp.api``. It reads the
sequence symbols off those inputs, runs the sharding pass, hands the rank-local graph to the
inner compiler (Inductor or ``aot_eager``) and wraps the result in a ``Runner`` that picks
the graph for the inputs' masks and trims sharded outputs. (Ranks' inputs are compared before
the call, in ``autosp.api``: Note [Input agreement].)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import boxed_nop
from torch.fx import GraphModule
from torch.utils._python_dispatch import _disable_current_modes

from autosp.compiler import runtime
from autosp.compiler.context import CompileContext, GroupInfo, LengthChoice
from autosp.compiler.find_sequence import input_name, is_user_input
from autosp.compiler.masks import MaskPlan
from autosp.compiler.offload import offload_compiler
from autosp.compiler.pipeline import ANALYSIS_PASSES, REWRITE_PASSES, run_passes
from autosp.compiler.propagate import Plan
from autosp.compiler.recompute import inductor_options, tokens_per_rank
from autosp.shards import register_shard

if TYPE_CHECKING:
    from autosp.config import Config

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class TraceState:
    """What the module wrapper tells the backend about the call being traced."""

    seq_len: int = 0
    label_inputs: frozenset[str] = frozenset()
    """The forward's parameters that hold the ``labels=`` tensor (several when aliased)."""
    plans: list[Plan] = field(default_factory=list)


Compile = Callable[[MaskPlan, list[Any] | None, LengthChoice], tuple[Callable[..., Any], Plan]]
"""Compile the rank-local graph for a mask plan and a length choice, traced with the given
inputs (``None``: the example inputs Dynamo traced with)."""


class Runner:
    """Runs the compiled rank-local graph: picks the graph whose mask assumptions hold
    (Note [Mask probing]) and whose recomputation and tiling suit the call's length
    (``LengthChoice``), and trims padding off sharded outputs."""

    def __init__(
        self,
        compile_graph: Compile,
        masks: MaskPlan,
        gm: GraphModule,
        group: dist.ProcessGroup,
        seq_source: tuple[str, int],
        choose: Callable[[int], LengthChoice],
        traced_inputs: list[Any],
    ) -> None:
        """``choose``: a call's ``LengthChoice`` from its tokens per rank; ``traced_inputs``:
        the inputs Dynamo traced with (their graph is compiled now)."""
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        self.compile_graph = compile_graph
        self.masks = masks
        self.choose = choose
        self.group = group
        self.world = dist.get_world_size(group)
        self.seq_index = [p.name for p in placeholders].index(seq_source[0])
        self.seq_dim = seq_source[1]
        self.choice = self._choice(traced_inputs)
        self.traced = compile_graph(masks, None, self.choice)
        self.fallbacks: dict[tuple[Any, ...], tuple[Callable[..., Any], Plan]] = {}
        self.placeholders = [p.name for p in placeholders]
        self.rank = dist.get_rank(group)
        self.inputs = {i: input_name(p) for i, p in enumerate(placeholders) if is_user_input(p)}

    def _choice(self, args: Sequence[Any]) -> LengthChoice:
        return self.choose(tokens_per_rank(args[self.seq_index], self.seq_dim, self.world))

    def _select(self, args: Sequence[Any]) -> tuple[Callable[..., Any], Plan]:
        """The graph of the first mask plan of the chain whose guards hold (Note [Mask
        probing]), for the call's length choice. The first plan's graph was compiled while
        Dynamo traced, for every length; a later plan's graph, or one for another choice, is
        compiled on first use, outside that trace, so for the shapes of this call: it is kept
        per plan, choice and input shapes."""
        plan, level = self.masks, 0
        failed: list[str] = []
        while broken := [g for g in plan.guards if not g.holds(args[g.index])]:
            failed += [self.inputs.get(g.index, self.placeholders[g.index]) for g in broken]
            plan, level = plan.fallback or MaskPlan({}, ()), level + 1
        choice = self._choice(args)
        if level == 0 and choice == self.choice:
            return self.traced
        key = (level, choice)
        key += tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)
        if key in self.fallbacks:
            return self.fallbacks[key]
        if choice != self.choice:
            logger.info(
                "autosp: a call of %s tokens per rank runs %s (the traced graph: %s); "
                "compiling a graph for inputs of these shapes",
                f"{tokens_per_rank(args[self.seq_index], self.seq_dim, self.world):,}",
                choice.describe(),
                self.choice.describe(),
            )
        if level:
            logger.warning(
                "autosp: inputs %s do not have the values the attention masks were recognised "
                "for (plain positions, all ones, 0/1 padding, the traced values of non-sequence "
                "inputs); compiling a graph for such inputs of these shapes (structured masks "
                "where they hold, else the model's own mask)",
                ", ".join(dict.fromkeys(failed)),
            )
        # No dispatch mode of the caller sees the compilation, as when Dynamo compiles.
        with _disable_current_modes():
            self.fallbacks[key] = self.compile_graph(plan, list(args), choice)
        return self.fallbacks[key]

    def __call__(self, *args: Any) -> Any:
        compiled, plan = self._select(args)
        outputs = list(compiled(*args))
        seq_len = args[self.seq_index].shape[self.seq_dim]
        for out in plan.sharded_outputs:
            rows = runtime.valid_rows(seq_len, out.length, self.rank, self.world)
            trimmed = outputs[out.index].narrow(out.dim, 0, rows)
            register_shard(trimmed, out.dim, seq_len, out.length, self.group)
            outputs[out.index] = trimmed
        return outputs


def inner_compiler(
    backend: str,
    inductor_options: dict[str, Any],
    partitioner: Callable[..., Any] | None = None,
) -> Callable[[GraphModule, list[Any]], Callable[..., Any]]:
    """The compiler of the rank-local graph: ``backend`` as registered with torch.compile,
    Inductor with ``inductor_options`` patched into its config. ``partitioner``, when given,
    splits the joint graph: Inductor's ``custom_partitioner_fn``, or AOTAutograd's
    ``partition_fn`` around no-op compilers for ``"aot_eager"``."""
    if partitioner is not None and backend != "inductor":
        return aot_autograd(
            fw_compiler=boxed_nop,
            bw_compiler=boxed_nop,
            partition_fn=partitioner,
            keep_inference_input_mutations=True,
        )
    options = dict(inductor_options)
    if partitioner is not None:
        options["custom_partitioner_fn"] = partitioner
    compiler = torch._dynamo.lookup_backend(backend)
    return functools.partial(compiler, config_patches=options) if options else compiler


@dataclass(slots=True)
class AutoSPBackend:
    """A ``torch.compile`` backend that makes the captured forward sequence-parallel."""

    group: dist.ProcessGroup
    config: Config
    state: TraceState
    hybrid: dict[int, tuple[str, str]]
    mean: tuple[str, int] = ("", 1)
    """``GroupInfo.mean``: where token-mean losses average (Note [Token mean over
    data-parallel groups])."""

    def __call__(self, gm: GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        ctx = CompileContext(
            GroupInfo(
                dist.get_rank(self.group),
                dist.get_world_size(self.group),
                self.group.group_name,
                self.hybrid,
                self.mean,
            ),
            self.config,
            list(example_inputs),
            self.state.seq_len,
            self.state.label_inputs,
        )
        gm = run_passes(ANALYSIS_PASSES, gm, ctx)
        backend = self.config.backend

        seq_index = [p.name for p in gm.graph.find_nodes(op="placeholder")].index(ctx.seq_source[0])

        def compile_graph(
            masks: MaskPlan, inputs: list[Any] | None, choice: LengthChoice
        ) -> tuple[Callable[..., Any], Plan]:
            ctx.masks = masks
            ctx.recompute, ctx.tiled_mlps = choice.recompute, choice.tiled_mlps
            tokens = (ctx.example_inputs if inputs is None else inputs)[seq_index]
            ctx.tokens_per_rank = tokens_per_rank(tokens, ctx.seq_source[1], ctx.group.world)
            local_gm = run_passes(REWRITE_PASSES, gm, ctx)
            plan = ctx.plan
            options = inductor_options(choice.recompute) if backend == "inductor" else {}
            if options:
                plan.recompute.append(
                    "inductor: buffer reuse off (a freed buffer kept for a later kernel would "
                    "raise the peak of the recomputed layers' backward)"
                )
            logger.debug("autosp rank-local graph:\n%s", local_gm.code)
            for line in plan.attention + plan.loss + plan.mlp + plan.recompute:
                logger.info("autosp: %s", line)
            self.state.plans.append(plan)
            inner = (
                offload_compiler(
                    functools.partial(inner_compiler, backend, options), plan, ctx.seq_syms
                )
                if self.config.offload
                else inner_compiler(backend, options)
            )
            compiled = inner(local_gm, list(example_inputs) if inputs is None else inputs)
            for line in plan.offload:
                logger.info("autosp: %s", line)
            return compiled, plan

        return Runner(
            compile_graph, ctx.masks, gm, self.group, ctx.seq_source, ctx.choose, example_inputs
        )
