"""The compiler: its passes, in order, in one place.

Every pass has the signature ``(gm, ctx) -> gm``: it reads what earlier passes recorded in the
``CompileContext`` and returns the graph (the same one, rewritten in place, or a new one).
The analysis passes run once on Dynamo's graph of the whole forward; the rewrite passes build
the rank-local graph, once per mask plan and length choice (the runner compiles another graph
when a guarded mask assumption fails, Note [Mask probing], or a call's length needs another
recomputation policy or other MLPs tiled, ``LengthChoice``).

The inner compiler runs after them: with ``Config.offload`` its partitioner also moves the
layers' saved activations to host memory (Note [Activation offloading], ``offload.py``).

Importing this module registers every sharding rule: the generic per-op rules
(``rules.py``), attention (``attention/``) and the loss (``loss.py``) each register their own.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.fx import GraphModule

import autosp.compiler.attention  # noqa: F401 - registers the attention rules
import autosp.compiler.random_ops  # noqa: F401 - registers the dropout rule
import autosp.compiler.routing  # noqa: F401 - registers the token-routing (bag) rules
import autosp.compiler.rules  # noqa: F401 - registers the per-op rules
from autosp.compiler.checkpoints import inline_checkpoints_pass
from autosp.compiler.chunked_loss import chunk_loss_pass  # also registers its rule
from autosp.compiler.context import CompileContext
from autosp.compiler.eager_attention import fuse_eager_attention_pass
from autosp.compiler.find_sequence import find_sequence_pass
from autosp.compiler.gqa import fold_repeated_kv_pass
from autosp.compiler.loss import require_loss_pass  # also registers the loss rules
from autosp.compiler.masks import recognise_masks_pass
from autosp.compiler.propagate import shard_sequence_pass
from autosp.compiler.recompute import estimate_recompute_pass, tag_recompute_pass
from autosp.compiler.regather import regather_pass
from autosp.compiler.tiled_mlp import find_mlps_pass, tile_mlp_pass  # + its rule

Pass = Callable[[GraphModule, CompileContext], GraphModule]

ANALYSIS_PASSES: tuple[Pass, ...] = (
    inline_checkpoints_pass,  # checkpointed regions -> the graph, tagged for recomputation
    fuse_eager_attention_pass,  # written-out attention -> one attention call
    fold_repeated_kv_pass,  # repeated key/value heads -> enable_gqa: sent and saved once
    find_sequence_pass,  # the sequence symbols; refuses graphs without attention
    require_loss_pass,  # labels given: a loss must be returned
    recognise_masks_pass,  # causal / structured masks, so none is built S x S
    chunk_loss_pass,  # lm head + cross-entropy over token chunks: no whole logits
    find_mlps_pass,  # gated MLPs that may run over token chunks
    estimate_recompute_pass,  # recompute="auto": each call's policy from its length
)

REWRITE_PASSES: tuple[Pass, ...] = (
    tile_mlp_pass,  # the call's gated MLPs over token chunks: only their inputs saved
    shard_sequence_pass,  # per-op placements -> the rank-local graph
    tag_recompute_pass,  # what the backward recomputes, for the partitioner
    regather_pass,  # sharded parameters: gathered again in the backward, never saved whole
)


def run_passes(passes: tuple[Pass, ...], gm: GraphModule, ctx: CompileContext) -> GraphModule:
    for compiler_pass in passes:
        gm = compiler_pass(gm, ctx)
    return gm
