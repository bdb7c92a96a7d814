"""``autosp.Config``: the options of ``parallelize``."""

from __future__ import annotations

from dataclasses import dataclass

INNER_BACKENDS = ("inductor", "aot_eager", "eager")
ATTENTION_STRATEGIES = ("auto", "ulysses", "ring", "hybrid")
RECOMPUTE_POLICIES = ("auto", "off", "cheap", "layers", "full")
DP_MEANS = ("tokens", "groups")


@dataclass(kw_only=True, slots=True)
class Config:
    """Options of ``parallelize``; the defaults just work."""

    backend: str = "inductor"
    """Compiler for the rewritten graph: ``"inductor"`` or ``"aot_eager"`` (fast to compile)."""
    attention: str = "auto"
    """Attention strategy: ``"ulysses"`` (all-to-all, needs query heads divisible by the
    degree), ``"ring"`` (key/value blocks passed around the ring, any head count),
    ``"hybrid"`` (Ulysses over the largest degree dividing the heads, ring across), or
    ``"auto"``: Ulysses where the heads allow it, else hybrid, else ring. ``model.plans``
    shows the choice for each attention call."""
    load_balance: bool = True
    """Run causal ring attention in the zigzag layout, where every rank does the same work
    (one extra all-to-all per tensor); False keeps the contiguous layout, for comparison."""
    recognise_masks: bool = True
    """Run attention masks that are causal for plain positions as ``is_causal`` (guarded at run
    time); False keeps every mask the model builds (S x S memory), for comparison."""
    sync_grads: bool = True
    """Sum parameter gradients over the group after each backward (each rank's gradient is
    the part from its own rows; with a ``("dp", "sp")`` mesh, the mean over DP groups of those
    sums). Keep it on. Plain DistributedDataParallel must not take its place: DDP averages over
    its group, which would divide these sums by the degree (autosp refuses it; use
    ``autosp.integrations.ddp.wrap_ddp``). Turn it off only if something else reduces the
    gradients (FSDP2, DeepSpeed) or you sum them over the group yourself."""
    dp_mean: str = "tokens"
    """With data parallelism beside sequence parallelism, how a token-mean loss (a mean
    ``cross_entropy``) is taken over the data-parallel groups: ``"tokens"``, over all their
    labelled tokens together, as one process on the concatenated batch (every rank returns
    that loss), or ``"groups"``, each group's own mean with the gradients averaged over the
    groups, as DistributedDataParallel (the groups weigh the same whatever their number of
    labelled tokens). Note [Token mean over data-parallel groups] in
    ``autosp/compiler/loss.py``."""
    chunk_loss: bool = True
    """Compute the language-model head and its cross-entropy over chunks of tokens, so that
    the ``[tokens, vocab]`` logits never exist whole (Note [Chunked loss] in
    ``autosp/compiler/chunked_loss.py``); exact. False keeps the model's own computation."""
    loss_chunk_tokens: int | None = None
    """Tokens per chunk of the chunked loss; None: as many as make 64 MiB of fp32 logits."""
    return_logits: bool = False
    """Whether a forward whose loss is chunked also returns its logits (built whole, by the
    model's own head). False returns None in their place: a training step reads the loss."""
    recompute: str = "auto"
    """What the backward recomputes (Note [Sequence-aware recomputation] in
    ``autosp/compiler/recompute.py``): ``"cheap"`` (inside each layer everything but
    attention, collectives and matmuls), ``"layers"`` (each layer from its input, attention
    and collectives kept), ``"full"`` (each layer from its input, attention and collectives
    included), ``"off"`` (what the model's own checkpointing and the compiler choose) or
    ``"auto"``: for each call the first of ``"cheap"`` and ``"layers"`` whose saved
    activations fit in ``activation_memory_gib``, else ``"full"`` (Note [Recomputation by
    length]). Takes effect with an AOTAutograd backend (``"inductor"``, ``"aot_eager"``);
    Inductor compiles graphs under ``"layers"`` and ``"full"`` with its buffer reuse off (Note
    [Buffer reuse under recomputation]). Values never change."""
    activation_memory_gib: float | None = None
    """Under ``recompute="auto"``: GiB per rank that the saved activations of ``"cheap"``
    (then of ``"layers"``) may take before a call switches to ``"layers"`` (then to
    ``"full"``); None: half of the memory of the rank's device (a GPU's, or the host's shared
    by its ranks)."""
    tile_mlp: bool | str = "auto"
    """Run each gated MLP (``down(act(gate(x)) * up(x))``) over chunks of tokens, saving only
    its input and recomputing each chunk in the backward (Note [Tiled MLP] in
    ``autosp/compiler/tiled_mlp.py``); exact. ``"auto"`` tiles an MLP in each call where one
    ``[tokens per rank, intermediate]`` activation exceeds 256 MiB (``tiled_mlp.AUTO_BYTES``),
    decided per call as ``recompute="auto"`` is; True or False forces it on or off.
    ``model.plans`` lists the tiled MLPs."""
    mlp_chunk_tokens: int | None = None
    """Tokens per chunk of a tiled MLP; None: as many as make 64 MiB of intermediate
    activation."""
    offload: bool = False
    """Move what the layers save for the backward (collective results, matmul outputs under
    ``recompute="cheap"``, each layer's input; torch keeps views and the outputs of
    tuple-returning kernels such as attention on the device) to host memory in the forward,
    and back before its first use in the backward, through AOTAutograd's partitioner (Note
    [Activation offloading] in ``autosp/compiler/offload.py``): on CUDA, copies on a transfer
    stream into pinned buffers; on a CPU, copies to the same memory (nothing saved). Exact;
    needs torch >= 2.12 and an AOTAutograd backend (``"inductor"``, ``"aot_eager"``);
    ``model.plans`` says what was offloaded and how many bytes per step."""
    bucket_mb: float = 25.0
    """Size of the gradient all-reduce buckets."""
    check_inputs: bool = True
    """Check on every call that every rank of the group got the same batch: shapes before the
    call, contents one call late (the first call at once); one small host-side all-reduce per
    call, no wait for the accelerator (Note [Input agreement] in ``autosp/comm/faults.py``)."""

    def __post_init__(self) -> None:
        if self.backend not in INNER_BACKENDS:
            raise ValueError(
                f"autosp: backend {self.backend!r} is not one of {', '.join(INNER_BACKENDS)}"
            )
        if self.attention not in ATTENTION_STRATEGIES:
            raise ValueError(
                f"autosp: attention {self.attention!r} is not one of "
                f"{', '.join(ATTENTION_STRATEGIES)}"
            )
        if self.dp_mean not in DP_MEANS:
            raise ValueError(
                f"autosp: dp_mean {self.dp_mean!r} is not one of {', '.join(DP_MEANS)}"
            )
        if self.recompute not in RECOMPUTE_POLICIES:
            raise ValueError(
                f"autosp: recompute {self.recompute!r} is not one of "
                f"{', '.join(RECOMPUTE_POLICIES)}"
            )
        if self.activation_memory_gib is not None and self.activation_memory_gib <= 0:
            raise ValueError(
                f"autosp: activation_memory_gib must be positive, got {self.activation_memory_gib}"
            )
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens <= 0:
            raise ValueError(
                f"autosp: loss_chunk_tokens must be positive, got {self.loss_chunk_tokens}"
            )
        if self.tile_mlp not in (True, False, "auto"):
            raise ValueError(
                f"autosp: tile_mlp must be True, False or 'auto', got {self.tile_mlp!r}"
            )
        if self.mlp_chunk_tokens is not None and self.mlp_chunk_tokens <= 0:
            raise ValueError(
                f"autosp: mlp_chunk_tokens must be positive, got {self.mlp_chunk_tokens}"
            )
        if self.offload not in (True, False):
            raise ValueError(f"autosp: offload must be True or False, got {self.offload!r}")
        if self.offload:
            if self.backend == "eager":
                raise ValueError(
                    "autosp: offload=True needs an AOTAutograd backend ('inductor' or "
                    "'aot_eager'): backend='eager' has no partitioner to insert the copies"
                )
            from autosp.compiler.offload import check_torch

            check_torch()
        if self.bucket_mb <= 0:
            raise ValueError(f"autosp: bucket_mb must be positive, got {self.bucket_mb}")
