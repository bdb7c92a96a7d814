"""Functions that run on every rank of a spawned group (module level, so they pickle)."""

from __future__ import annotations

import contextlib
import copy
import itertools
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import autosp
from tests.models import VOCAB, build


def make_batch(batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels; -100 on a leading block so ranks hold different label counts."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    labels = ids.clone()
    labels[0, : seq // 2 + 1] = -100
    if batch > 1:
        labels[1, -3:] = -100
    return ids, labels


BACKEND = "eager"
"""The inner compiler of the parity tests: the sharding pass is what they test, and
AOTAutograd triples their compile time. ``test_parity`` runs every family through
``aot_eager`` and one through ``inductor``; ``count_step`` counts collectives under AOTAutograd."""

GRAD_FLOOR = 1e-5
"""Gradient norms below this are treated as zero when taking relative errors: some gradients
are zero in exact arithmetic (a key bias under softmax) and only rounding noise is left."""
GRAD_FLOOR_REL = 1e-3
"""...and so are norms below this fraction of the model's largest gradient norm: a query weight
under a one-token window has a zero gradient, and fp32 leaves noise at the scale of its
neighbours' gradients (1e-8 relative), not at an absolute scale."""


@contextlib.contextmanager
def saved_tensor_bytes() -> Iterator[list[int]]:
    """The bytes of each tensor autograd saves for the backward inside the block."""
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


ATTENTION = "attention"
ATTENTION_KERNELS = dict.fromkeys(
    (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "blockwise_attention",
        "ring_attention",
    ),
    ATTENTION,
)
"""Attention forward kernels (ATen's SDPA kernels and autosp's attention ops), for
``CountOps``."""


class CountOps(TorchDispatchMode):
    """Counts the calls of the ops named in ``labels`` (op name -> label) that the compiled
    graphs run (not those that run while torch.compile traces), by label, also where a
    higher-order op runs them (a recomputed attention under ``run_and_save_rng_state``)."""

    supports_higher_order_operators = True

    def __init__(self, labels: dict[str, str]) -> None:
        super().__init__()
        self.labels = labels
        self.calls: Counter[str] = Counter()

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        for op in (func, *(a for a in args if isinstance(a, torch._ops.OpOverload))):
            if getattr(op, "_opname", None) in self.labels:
                self.calls[self.labels[op._opname]] += 1
        return func(*args, **(kwargs or {}))


def step_errors(
    loss: torch.Tensor, expected: torch.Tensor, model: torch.nn.Module, ref: torch.nn.Module
) -> dict[str, Any]:
    """The relative loss error and per-parameter gradient errors of one step against one
    process's."""
    return {
        "loss_rel_err": abs(loss.item() - expected.item()) / abs(expected.item()),
        "grad_rel_err": grad_errors(model, ref),
    }


def grad_errors(
    model: torch.nn.Module, ref: torch.nn.Module, skip_unused: bool = False
) -> dict[str, float]:
    """||g - g_ref|| / max(||g_ref||, floor) per parameter, where floor is GRAD_FLOOR or
    GRAD_FLOOR_REL of the largest ||g_ref||; infinite where one of the two has a gradient and the
    other has none, or where g is not finite; 0 where neither has (left out if ``skip_unused``)."""
    params = zip(model.named_parameters(), ref.parameters(), strict=True)
    pairs = [(n, p.grad, q.grad) for (n, p), q in params]
    norms = [want.norm() for _, _, want in pairs if want is not None]
    floor = max([GRAD_FLOOR] + [GRAD_FLOOR_REL * n.item() for n in norms])
    errors = {}
    for name, got, want in pairs:
        if got is None or want is None:
            if got is None and want is None and skip_unused:
                continue
            errors[name] = 0.0 if got is None and want is None else float("inf")
        elif not torch.isfinite(got).all():
            errors[name] = float("inf")
        else:
            errors[name] = ((got - want).norm() / want.norm().clamp(min=floor)).item()
    return errors


def parity(family: str, cases: list[tuple[int, int]], backend: str = "aot_eager") -> list[dict]:
    """Loss, logits and gradients of the parallel model against one process, per (batch, seq)."""
    return model_parity(build(family), cases, {"backend": backend})


def spec_parity(
    factory: str, kwargs: dict[str, Any], options: dict[str, Any], cases: list[tuple[int, int]]
) -> list[dict]:
    """``parity`` for ``tests.models.<factory>(**kwargs)`` parallelized with ``options``."""
    import tests.models

    torch.manual_seed(0)
    model = getattr(tests.models, factory)(**kwargs)
    return model_parity(model, cases, {"backend": BACKEND, **options})


def model_parity(
    model: torch.nn.Module,
    cases: list[tuple[int, int]],
    options: dict[str, Any],
    extra_inputs: Any = None,
) -> list[dict]:
    ref = copy.deepcopy(model)
    parallel = autosp.parallelize(model, **{"return_logits": True, **options})
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for batch, seq in cases:
        ids, labels = make_batch(batch, seq, seed=seq)
        extra = extra_inputs(batch, seq) if extra_inputs else {}
        expected = ref(input_ids=ids, labels=labels, **extra)
        expected["loss"].backward()
        out = parallel(input_ids=ids, labels=labels, **extra)
        out["loss"].backward()
        local_logits = out["logits"]
        full_logits = autosp.gather_sequence(local_logits)
        block = 2 * -(-seq // (2 * world))  # even blocks (Note [Placements and padding])
        aux = expected.get("aux_loss") if isinstance(expected, dict) else None
        results.append(
            {
                "case": (batch, seq),
                "aux_loss_rel_err": None
                if aux is None
                else abs(out["aux_loss"].item() - aux.item()) / abs(aux.item()),
                "loss": out["loss"].item(),
                "loss_rel_err": abs(out["loss"].item() - expected["loss"].item())
                / abs(expected["loss"].item()),
                "logits_max_err": (full_logits - expected["logits"]).abs().max().item(),
                "local_rows": local_logits.shape[1],
                "expected_rows": max(0, min(block, seq - rank * block)),
                "grad_rel_err": grad_errors(model, ref),
                "compiles": len(parallel.plans),
                "gathered_ops": sorted({op for p in parallel.plans for op in p.gathered_ops}),
                "attention": [line for p in parallel.plans for line in p.attention],
                "loss_plan": [line for p in parallel.plans for line in p.loss],
            }
        )
        model.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    return results


def train_steps(family: str, steps: int, batch: int, seq: int) -> list[dict[str, Any]]:
    """``steps`` AdamW steps of the parallel and the single-process model, side by side."""
    model = build(family)
    ref = copy.deepcopy(model)
    parallel = autosp.parallelize(model, backend=BACKEND)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    history = []
    for _ in range(steps):
        ids, labels = make_batch(batch, seq, seed=100)  # one batch: the loss must fall
        loss = parallel(input_ids=ids, labels=labels)["loss"]
        loss.backward()
        expected = ref(input_ids=ids, labels=labels)["loss"]
        expected.backward()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        param_err = max(
            ((p - q).norm() / q.norm()).item()
            for p, q in zip(model.parameters(), ref.parameters(), strict=True)
        )
        history.append({"loss": loss.item(), "ref": expected.item(), "param_rel_err": param_err})
    return history


def call_with_rank_batch(seed_per_rank: bool) -> None:
    """Call a parallel model with a batch that differs across ranks when asked to."""
    model = autosp.parallelize(build("plain_gpt"), backend=BACKEND)
    ids, labels = make_batch(1, 12, seed=dist.get_rank() if seed_per_rank else 0)
    model(input_ids=ids, labels=labels)


def call_model(factory: str, kwargs: dict[str, Any], options: dict[str, Any]) -> None:
    """Build a model from ``tests.models`` by class name, parallelize it and call it once."""
    import tests.models

    model = getattr(tests.models, factory)(**kwargs)
    parallel = autosp.parallelize(model, backend=BACKEND, **options)
    ids, labels = make_batch(1, 12, seed=0)
    parallel(input_ids=ids, labels=labels)


def count_step(family: str, checkpointed: bool = False) -> list[dict[str, int]]:
    """Collectives of two training steps (the first also checks the inputs), with Hugging
    Face's gradient checkpointing on if ``checkpointed``."""
    model = build(family)
    if checkpointed:
        model.gradient_checkpointing_enable()
    parallel = autosp.parallelize(model, backend="aot_eager")
    counts = []
    for seed in (1, 2):
        ids, labels = make_batch(1, 16, seed=seed)
        with autosp.count_collectives() as forward:
            loss = parallel(input_ids=ids, labels=labels)["loss"]
        with autosp.count_collectives() as backward:
            loss.backward()
        counts.append({"forward": dict(forward), "backward": dict(backward)})
    return counts


def _ring_mask(kind: str, seq: int) -> torch.Tensor | None:
    """``window``: causal sliding window of 3 (boolean, whole blocks hidden); ``documents``:
    two documents as an additive mask, bidirectional inside each."""
    q, k = torch.arange(seq).unsqueeze(1), torch.arange(seq)
    if kind == "window":
        return ((k <= q) & (q - k < 3)).view(1, 1, seq, seq)
    if kind == "documents":
        doc = torch.arange(seq) >= seq // 2
        same = doc.unsqueeze(1) == doc
        return torch.zeros(seq, seq).masked_fill(~same, float("-inf")).view(1, 1, seq, seq)
    return None


def ring_vs_full(cases: list[tuple]) -> dict[tuple, dict[str, float]]:
    """Ring attention on this rank's padded block against full attention on the whole sequence,
    per (seq, heads, kv_heads, causal, mask kind, soft-cap) on the CPU flash kernel and in fp32
    math, load-balanced and not: max errors of output and of q/k/v gradients."""
    from autosp.comm.ops import _group  # noqa: F401 - the group name resolves through it
    from autosp.compiler import runtime
    from autosp.compiler.attention.reference import softcapped_attention
    from autosp.compiler.attention.ring import ring_attention

    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD.group_name
    results = {}
    variants = itertools.product(cases, (True, False), (True, False))
    for (seq, heads, kv_heads, causal, mask_kind, softcap), use_kernel, balance in variants:
        gen = torch.Generator().manual_seed(seq * 31 + heads)
        q = torch.randn(2, heads, seq, 8, generator=gen, requires_grad=True)
        k = torch.randn(2, kv_heads, seq, 8, generator=gen, requires_grad=True)
        v = torch.randn(2, kv_heads, seq, 8, generator=gen, requires_grad=True)
        dout = torch.randn(2, heads, seq, 8, generator=gen)
        mask = _ring_mask(mask_kind, seq)
        ref = softcapped_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True, softcap=softcap
        )
        ref.backward(dout)
        local = [runtime.shard(t.detach(), 2, seq, rank, world).requires_grad_() for t in (q, k, v)]
        out = ring_attention(
            *local,
            causal,
            None,
            seq_len=seq,
            group=group,
            mask=mask,
            softcap=softcap,
            use_kernel=use_kernel,
            balance=balance,
        )
        # Padding rows get no gradient from a real graph's loss (Note [Placements and padding]).
        out.backward(runtime.shard(dout, 2, seq, rank, world, pad_value=0.0))
        expected = [runtime.shard(t, 2, seq, rank, world) for t in (ref, q.grad, k.grad, v.grad)]
        rows = runtime.valid_rows(seq, 0, rank, world)
        got = [out, *(t.grad for t in local)]
        errors = [
            (a - b).narrow(2, 0, rows).abs().max().item() if rows else 0.0
            for a, b in zip(got, expected, strict=True)
        ]
        key = (seq, heads, kv_heads, causal, mask_kind, softcap, use_kernel, balance)
        results[key] = dict(zip(("out", "dq", "dk", "dv"), errors, strict=True))
    return results


def family_parity(names: list[str], seq: int) -> dict[str, dict]:
    """``parity`` of several ``tests.models`` FAMILIES or EXTRA families in one group,
    batch 1."""
    from tests.models import EXTRA, FAMILIES

    results = {}
    for name in names:
        factory, extra_inputs = EXTRA.get(name) or (FAMILIES[name], None)
        torch.manual_seed(0)
        (result,) = model_parity(factory(), [(1, seq)], {"backend": BACKEND}, extra_inputs)
        results[name] = result
    return results


def chunked_parity(names: list[str], seq: int, options: dict[str, Any]) -> dict[str, dict]:
    """Loss and gradient errors of FAMILIES / EXTRA models under ``options`` with the logits
    left to autosp's default (dropped when the loss is chunked), batch 2, with the loss plan
    and the type of the returned logits."""
    from tests.models import EXTRA, FAMILIES

    results = {}
    for name in names:
        factory, _ = EXTRA.get(name) or (FAMILIES[name], None)
        torch.manual_seed(0)
        model = factory()
        ref = copy.deepcopy(model)
        parallel = autosp.parallelize(model, backend=BACKEND, **options)
        ids, labels = make_batch(2, seq, seed=seq)
        expected = ref(input_ids=ids, labels=labels)
        expected["loss"].backward()
        out = parallel(input_ids=ids, labels=labels)
        out["loss"].backward()
        results[name] = {
            "loss_rel_err": abs(out["loss"].item() - expected["loss"].item())
            / abs(expected["loss"].item()),
            "grad_rel_err": grad_errors(model, ref),
            "logits": type(out["logits"]).__name__,
            "loss_plan": [line for p in parallel.plans for line in p.loss],
        }
    return results


def checkpointed_parity(name: str, backend: str) -> dict[str, Any]:
    """``model_parity`` of a FAMILIES model with Hugging Face's gradient checkpointing on,
    with autosp's warnings."""
    import warnings

    from tests.models import FAMILIES

    torch.manual_seed(0)
    model = FAMILIES[name]()
    model.gradient_checkpointing_enable()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (result,) = model_parity(model, [(2, 13)], {"backend": backend})
    result["warnings"] = [str(w.message) for w in caught if "autosp" in str(w.message)]
    return result


def recompute_step(family: str, recompute: str, budget_gib: float | None = None) -> dict[str, Any]:
    """One training step under ``Config.recompute`` (and ``activation_memory_gib``): parity
    with one process, the bytes the forward saved for the backward, the backward's
    collectives, the attention kernels the forward and the backward ran and the recompute
    plan."""
    model = build(family)
    ref = copy.deepcopy(model)
    parallel = autosp.parallelize(
        model, backend="aot_eager", recompute=recompute, activation_memory_gib=budget_gib
    )
    ids, labels = make_batch(2, 32, seed=3)
    with saved_tensor_bytes() as saved, CountOps(ATTENTION_KERNELS) as forward_attention:
        loss = parallel(input_ids=ids, labels=labels)["loss"]
    with autosp.count_collectives() as backward, CountOps(ATTENTION_KERNELS) as backward_attention:
        loss.backward()
    expected = ref(input_ids=ids, labels=labels)["loss"]
    expected.backward()
    return {
        **step_errors(loss, expected, model, ref),
        "saved_bytes": sum(saved),
        "backward": dict(backward),
        "attention": (forward_attention.calls[ATTENTION], backward_attention.calls[ATTENTION]),
        "plan": [line for p in parallel.plans for line in p.recompute],
    }


def inductor_recompute_step(recompute: str) -> dict[str, Any]:
    """One training step under ``Config.recompute`` compiled by Inductor (caches off): parity
    with one process, the recompute plan, and how many of the buffers Inductor's generated code
    assigns reuse another (``# reuse`` lines: a freed buffer taken by a later kernel, or one a
    kernel writes over)."""
    from torch._inductor.utils import run_and_get_code

    model = build("llama")
    ref = copy.deepcopy(model)
    parallel = autosp.parallelize(model, backend="inductor", recompute=recompute)
    ids, labels = make_batch(2, 32, seed=3)

    def step() -> torch.Tensor:
        loss = parallel(input_ids=ids, labels=labels)["loss"]
        loss.backward()
        return loss

    with torch._inductor.config.patch(force_disable_caches=True):
        loss, code = run_and_get_code(step)
    expected = ref(input_ids=ids, labels=labels)["loss"]
    expected.backward()
    return {
        **step_errors(loss, expected, model, ref),
        "plan": [line for p in parallel.plans for line in p.recompute],
        "reused": sum(c.count("# reuse") for c in code),
        "buffers": sum(len(re.findall(r"^\s*buf\d+ = ", c, re.MULTILINE)) for c in code),
    }


def auto_recompute_steps(budget_gib: float, lengths: tuple[int, ...]) -> list[dict[str, Any]]:
    """Training steps at ``lengths`` (batch 2) under ``recompute="auto"`` with a budget: per
    step, parity with one process, the bytes saved for the backward and the recompute plan
    of the graph the step ran."""
    model = build("llama")
    ref = copy.deepcopy(model)
    parallel = autosp.parallelize(
        model, backend="aot_eager", recompute="auto", activation_memory_gib=budget_gib
    )
    results = []
    for seq in lengths:
        ids, labels = make_batch(2, seq, seed=seq)
        plans = len(parallel.plans)
        with saved_tensor_bytes() as saved:
            loss = parallel(input_ids=ids, labels=labels)["loss"]
        loss.backward()
        expected = ref(input_ids=ids, labels=labels)["loss"]
        expected.backward()
        results.append(
            {
                **step_errors(loss, expected, model, ref),
                "saved_bytes": sum(saved),
                "plan": [line for p in parallel.plans[plans:] for line in p.recompute],
            }
        )
        for m in (model, ref):
            m.zero_grad()
    return results


def gqa_parity(strategy: str) -> list[dict]:
    """``model_parity`` of HF Llama (4 heads, 2 KV heads) under ``strategy``."""
    return model_parity(build("llama"), [(1, 13)], {"backend": BACKEND, "attention": strategy})


def mesh_parity() -> list[dict]:
    """``parity`` with the group given as a 1-D DeviceMesh."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("sp",))
    torch.manual_seed(0)
    return model_parity(build("plain_gpt"), [(1, 13)], {"backend": BACKEND, "group": mesh})


def fallback_parity() -> dict[str, Any]:
    """Parity of a model with an op that must be gathered, and the warnings it raised."""
    import warnings

    from tests.models import PooledGPT

    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (result,) = model_parity(PooledGPT(), [(1, 13)], {"backend": BACKEND})
    result["warnings"] = [str(w.message) for w in caught if "autosp" in str(w.message)]
    return result


def table_parity(
    table: str,
    names: list[str],
    cases: list[tuple[int, int]],
    options: dict[str, Any],
    *build_args: Any,
) -> dict[str, list]:
    """``parity`` of models ``tests.models.<table>[name](*build_args)`` per name, parallelized
    with ``options``, each result with the autosp warnings raised while running it."""
    import warnings

    import tests.models

    results = {}
    for name in names:
        torch.manual_seed(0)
        model = getattr(tests.models, table)[name](*build_args)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            found = model_parity(model, cases, {"backend": BACKEND, **options})
        for result in found:
            result["warnings"] = [str(w.message) for w in caught if "autosp" in str(w.message)]
        results[name] = found
    return results


def replica_params(micro_batches: int, deferred: bool) -> dict[str, torch.Tensor]:
    """Parameters after three AdamW steps of ``micro_batches`` backward passes each (the
    first ones under ``no_sync()`` when ``deferred``): every rank's must be the same bits."""
    model = build("llama")
    parallel = autosp.parallelize(model, backend=BACKEND)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(3):
        for micro in range(micro_batches):
            ids, labels = make_batch(1, 14, seed=10 * step + micro)
            last = micro == micro_batches - 1
            with contextlib.nullcontext() if last or not deferred else parallel.no_sync():
                parallel(input_ids=ids, labels=labels)["loss"].backward()
        opt.step()
        opt.zero_grad()
    return {name: p.detach().clone() for name, p in model.named_parameters()}
