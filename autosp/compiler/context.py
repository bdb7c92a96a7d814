"""What the compiler passes share while compiling one captured graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sympy

if TYPE_CHECKING:
    from autosp.compiler.masks import MaskPlan
    from autosp.compiler.propagate import Plan
    from autosp.compiler.recompute import AutoRecompute
    from autosp.compiler.tiled_mlp import MlpTiling
    from autosp.config import Config


@dataclass(slots=True)
class GroupInfo:
    """The sequence-parallel group as the rewritten graph sees it (constants per rank)."""

    rank: int
    world: int
    name: str
    hybrid: dict[int, tuple[str, str]] = field(default_factory=dict)
    """For each Ulysses size ``u`` (a proper divisor of ``world``): this rank's Ulysses group
    and ring names for hybrid attention."""
    mean: tuple[str, int] = ("", 1)
    """The group a token-mean loss averages over and the scale of its local sum's gradient:
    ``(name, 1)`` or, over data-parallel groups' tokens, every ``dp x sp`` rank and ``dp``
    (Note [Token mean over data-parallel groups]); an empty name is this group."""


@dataclass(frozen=True, slots=True)
class LengthChoice:
    """What a call's length decides, and a graph is compiled for: the recomputation policy
    (Note [Recomputation by length]) and the gated MLPs tiled (Note [Tiled MLP])."""

    recompute: str
    tiled_mlps: frozenset[str] = frozenset()

    def describe(self) -> str:
        return f"recompute={self.recompute!r}, {len(self.tiled_mlps)} tiled MLPs"


@dataclass(slots=True)
class CompileContext:
    """One compilation's inputs and findings. Each pass reads what earlier passes filled in;
    nothing here outlives the compiled graph that owns it."""

    group: GroupInfo
    config: Config
    example_inputs: list[Any]
    seq_len: int
    """The sequence length of the call being traced (a hint to find its symbol)."""
    label_inputs: frozenset[str] = frozenset()
    """The inputs that hold the ``labels=`` tensor of the call being traced: ``{"labels"}``,
    or more when the caller aliased it (``labels=input_ids``); then the graph must return a
    loss computed from one of them."""
    seq_syms: frozenset[sympy.Symbol] = frozenset()
    """The symbols that stand for the sequence length (``find_sequence_pass``)."""
    seq_source: tuple[str, int] = ("", 0)
    """One (placeholder name, dim) whose size is the sequence length."""
    masks: MaskPlan | None = None
    """Recognised attention masks (``recognise_masks_pass``); the sharding pass may be run
    again with the plan's fallback."""
    plan: Plan | None = None
    """What the sharding pass did (``shard_sequence_pass``)."""
    recompute: str = "off"
    """The recomputation policy of the graph being built (its ``LengthChoice``)."""
    auto_recompute: AutoRecompute | None = None
    """Under ``recompute="auto"``, the rule that picks each call's policy."""
    mlps: MlpTiling | None = None
    """The gated MLPs ``Config.tile_mlp`` may tile (``find_mlps_pass``)."""
    tiled_mlps: frozenset[str] = frozenset()
    """The MLPs the graph being built tiles (``tile_mlp_pass``)."""
    tokens_per_rank: int = 0
    """Tokens one rank holds in the call the graph being built is for."""

    def choose(self, tokens_per_rank: int) -> LengthChoice:
        """What a call with ``tokens_per_rank`` tokens on each rank runs (``LengthChoice``)."""
        policy = self.config.recompute
        if self.auto_recompute is not None:
            policy = self.auto_recompute.policy(tokens_per_rank)
        tiled = self.mlps.tiled(tokens_per_rank) if self.mlps is not None else frozenset()
        return LengthChoice(policy, tiled)
