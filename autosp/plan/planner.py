"""The largest trainable sequence length for a memory budget, by tracing steps (Note
[Planning by tracing] in ``autosp/plan/trace.py``)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from transformers import AutoModelForCausalLM, PretrainedConfig

from autosp.compiler.recompute import AUTO_SHARE, policy_within
from autosp.config import RECOMPUTE_POLICIES
from autosp.errors import AutoSPError
from autosp.mesh import sequence_parallel_mesh
from autosp.plan.trace import PHASES, MemoryTracker, Optimizer, StepMemory

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPTIMIZERS = ("fp32", "param", "none")
WARMUP_ROWS = 64
"""Rows per rank of the first (compiling) call; the sequence is dynamic, so later lengths
reuse its graphs."""
FIRST_FIT = 32
"""The second traced length, in multiples of the first: the line is fitted over this span."""
MAX_TRACES = 16
MAX_GROWTH = 16
"""The search lengthens a fitting length at most this many times per trace."""
GIB = 2**30

Progress = Callable[[str], None]


@dataclass(kw_only=True, slots=True)
class PlanSettings:
    """What to plan for; see ``autosp plan --help``."""

    memory_gib: float
    """Memory per rank (GiB) the step's peak must fit in."""
    sp: int = 8
    """Sequence-parallel degree."""
    dp: int = 1
    """Data-parallel replicas beside each sequence-parallel group: per-rank memory does not
    depend on it, unless ``shard_params`` shards over ``dp x sp``."""
    shard_params: bool = False
    """Parameters, gradients and optimizer state sharded over the ``dp x sp`` ranks and
    gathered per use in the graph (``autosp.integrations.sharded``)."""
    dtype: str = "bf16"
    batch_size: int = 1
    """Sequences per step per sequence-parallel group."""
    optimizer: str = "fp32"
    """AdamW on fp32 master weights (``"fp32"``), on the parameters (``"param"``: states in
    their dtype), or no optimizer step (``"none"``)."""
    chunk_loss: bool = True
    recompute: str = "auto"
    """``Config.recompute``; under ``"auto"`` the budget of the saved activations of
    ``"cheap"`` and ``"layers"`` is ``AUTO_SHARE`` of ``memory_gib``, as on a device of that
    size."""
    multiple: int = 1024
    """The answer is a multiple of this many tokens (rounded up to a multiple of 2 sp)."""
    lengths: tuple[int, ...] = ()
    """Sequence lengths to trace as well (for the table and the plot)."""
    curve_points: int = 3
    """Lengths traced below the answer, evenly spaced, for the plot."""
    max_tokens: int = 1 << 26
    """Largest sequence length searched."""

    def __post_init__(self) -> None:
        if self.memory_gib <= 0:
            raise AutoSPError(f"autosp plan: --memory must be positive, got {self.memory_gib}")
        if self.curve_points < 0 or any(n < 1 for n in self.lengths):
            raise AutoSPError("autosp plan: lengths and curve points must be positive")
        for name in ("sp", "dp", "batch_size", "multiple"):
            if getattr(self, name) < 1:
                raise AutoSPError(f"autosp plan: {name} must be at least 1")
        if self.sp < 2:
            raise AutoSPError("autosp plan: --sp must be at least 2 (sequence parallelism)")
        if self.dtype not in DTYPES:
            raise AutoSPError(f"autosp plan: --dtype must be one of {', '.join(DTYPES)}")
        if self.optimizer not in OPTIMIZERS:
            raise AutoSPError(f"autosp plan: --optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.recompute not in RECOMPUTE_POLICIES:
            raise AutoSPError(
                f"autosp plan: --recompute must be one of {', '.join(RECOMPUTE_POLICIES)}"
            )

    @property
    def step(self) -> int:
        """The length granularity: a multiple of ``multiple`` and of ``2 sp`` (no padding)."""
        return math.lcm(self.multiple, 2 * self.sp)


@dataclass(slots=True)
class Point:
    """One traced sequence length."""

    seq_len: int
    memory: StepMemory
    seconds: float
    recompute: str
    """The recomputation policy the traced call ran (Note [Recomputation by length])."""


@dataclass(slots=True)
class Plan:
    """The answer of ``plan``: traced points, the largest length that fits, and the fit."""

    model: str
    parameters: int
    settings: PlanSettings
    points: list[Point]
    largest: int
    """The largest traced length (a multiple of ``settings.step``) whose peak fits; the next
    one was traced too and does not fit (unless ``largest`` is ``settings.max_tokens``)."""
    slope: float
    """Bytes per token of sequence (global) of the line fitted through the traced peaks of
    ``fit_range``."""
    fixed: float
    """Bytes at zero tokens of that line."""
    fit_range: tuple[int, int]
    """The lengths of the fitted line: those that run the answer's recomputation policy
    (``_segments``)."""
    plans: list[str]
    """What autosp did to the traced graph (``model.plans``)."""
    compile_s: float
    trace_s: float
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def budget(self) -> int:
        return int(self.settings.memory_gib * GIB)

    def point(self, seq_len: int) -> Point:
        return next(p for p in self.points if p.seq_len == seq_len)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "parameters": self.parameters,
            "settings": asdict(self.settings),
            "largest_seq_len": self.largest,
            "tokens_per_rank": self.largest // self.settings.sp,
            "slope_bytes_per_token": round(self.slope, 1),
            "fixed_bytes": round(self.fixed),
            "fit_range": list(self.fit_range),
            "points": [
                {
                    "seq_len": p.seq_len,
                    "peak_bytes": p.memory.peak,
                    "breakdown_bytes": p.memory.breakdown,
                    "peak_phase": p.memory.peak_phase,
                    "phase_peaks_bytes": p.memory.phase_peaks,
                    "saved_at_forward_end_bytes": p.memory.saved_at_forward_end,
                    "fits": p.memory.peak <= self.budget,
                    "trace_s": round(p.seconds, 2),
                    "recompute": p.recompute,
                }
                for p in sorted(self.points, key=lambda p: p.seq_len)
            ],
            "plans": self.plans,
            "compile_s": round(self.compile_s, 1),
            "trace_s": round(self.trace_s, 1),
            "versions": self.versions,
            "emulation": "rank 0 of the sequence-parallel group on torch's fake process group; "
            "fake CPU tensors, aot_eager (op by op: no fusion); live tensor bytes, no allocator "
            "or runtime overhead",
        }


@contextlib.contextmanager
def _fake_group(world: int) -> Iterator[dist.ProcessGroup]:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise AutoSPError(
            "autosp plan: torch.distributed is already initialised in this process; the plan "
            "emulates the sequence-parallel group with a fake process group of its own: run it "
            "in a fresh process (the `autosp plan` command)"
        )
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


class Emulator:
    """One rank of a sequence-parallel run on fake tensors: ``trace(seq_len)`` runs a step."""

    def __init__(
        self, config: PretrainedConfig, settings: PlanSettings, mesh: DeviceMesh | None
    ) -> None:
        """``mesh``: the ``("dp", "sp")`` mesh to shard the parameters over, or None."""
        import autosp

        self.settings = settings
        dtype = DTYPES[settings.dtype]
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).train()
        self.model = model
        self.parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        """The model's parameter count (before any sharding)."""
        options: dict[str, Any] = dict(
            backend="aot_eager",
            check_inputs=False,  # fake tensors hold no values to compare
            chunk_loss=settings.chunk_loss,
            recompute=settings.recompute,
            activation_memory_gib=AUTO_SHARE * settings.memory_gib,
        )
        if mesh is not None:
            from autosp.integrations import sharded

            self.parallel = sharded.shard(model, mesh, **options)
        else:
            self.parallel = autosp.parallelize(model, **options)
        self.params = [p for p in model.parameters() if p.requires_grad]  # shards if sharded
        self.optimizer = Optimizer(self.params, settings.optimizer)

    def _step(self, seq_len: int, tracker: MemoryTracker | None) -> int:
        ids = torch.zeros(self.settings.batch_size, seq_len, dtype=torch.long)
        loss = self.parallel(input_ids=ids, labels=ids)["loss"]
        saved = tracker.end_forward() if tracker else 0
        if tracker:
            tracker.phase = PHASES[1]
        loss.backward()
        del loss
        if tracker:
            for p in self.params:
                if p.grad is not None:
                    tracker.add(p.grad, "gradients")
            tracker.phase = PHASES[2]
        self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        return saved

    def compile(self) -> None:
        """The first step: compiles the graphs and makes the optimizer's state."""
        self._step(WARMUP_ROWS * self.settings.sp, None)

    def persistent(self) -> list[torch.Tensor]:
        """Parameters and buffers (tied weights once)."""
        return [*self.model.parameters(), *self.model.buffers()]

    def trace(self, seq_len: int) -> StepMemory:
        tracker = MemoryTracker()
        for t in self.persistent():
            tracker.add(t, "weights")
        for t in self.optimizer.state_tensors():
            tracker.add(t, "optimizer")
        with tracker:
            saved = self._step(seq_len, tracker)
        if not tracker.autosp_ops:
            raise AutoSPError(
                "autosp plan: the traced step ran none of autosp's ops: torch.compile did not "
                "run the parallelized graph under the memory tracker (an active dispatch mode "
                "or torch.compiler.disable around the call?); the plan would be wrong"
            )
        return tracker.result(saved)

    def plan_lines(self) -> list[str]:
        return sorted(
            {
                line
                for p in self.parallel.plans
                for line in p.attention + p.loss + p.mlp + p.recompute
            }
        )


@contextlib.contextmanager
def emulate(
    config: PretrainedConfig, settings: PlanSettings, progress: Progress = lambda _: None
) -> Iterator[Emulator]:
    """Rank 0 of ``settings.sp`` on a fake process group, with ``config``'s model built on
    fake tensors, parallelized and compiled (one step run): ``trace`` runs the next ones.

    Raises:
        AutoSPError: the weights (checked before compiling) and the optimizer state exceed
            the budget."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch._dynamo.reset()  # a fresh compilation for this model
    world = settings.sp * (settings.dp if settings.shard_params else 1)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_fake_group(world))
        # The mesh holds real rank numbers: made before the fake tensors.
        mesh = sequence_parallel_mesh(settings.sp) if settings.shard_params else None
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        emulator = Emulator(config, settings, mesh)
        _check_fixed(emulator.persistent(), [], settings)
        progress(f"{emulator.parameters / 1e9:.2f}B parameters; compiling")
        emulator.compile()
        _check_fixed(emulator.persistent(), emulator.optimizer.state_tensors(), settings)
        yield emulator


def _versions() -> dict[str, str]:
    import platform

    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _advice(settings: PlanSettings, *options: str) -> str:
    """What to change, of ``options``, that is not already chosen."""
    chosen = {
        "--dtype bf16": settings.dtype != "fp32",
        "--optimizer param": settings.optimizer != "fp32",
        "--optimizer none": settings.optimizer == "none",
        "--recompute full": settings.recompute == "full",
        "--batch-size 1": settings.batch_size == 1,
        "--chunk-loss": settings.chunk_loss,
        "--shard-params": settings.shard_params,
    }
    return ", ".join(o for o in options if not chosen.get(o, False))


def _check_fixed(
    weights: list[torch.Tensor], optimizer: list[torch.Tensor], settings: PlanSettings
) -> None:
    """Refuse a budget that the weights and optimizer state alone exceed."""
    sizes = [sum(t.untyped_storage().nbytes() for t in ts) for ts in (weights, optimizer)]
    if sum(sizes) <= settings.memory_gib * GIB:
        return
    what = f"the weights ({sizes[0] / GIB:.2f} GiB in {settings.dtype})"
    if optimizer:
        what += f" and the optimizer state ({sizes[1] / GIB:.2f} GiB, {settings.optimizer})"
    raise AutoSPError(
        f"autosp plan: {what} alone exceed {settings.memory_gib:g} GiB per rank: autosp keeps "
        + (
            f"1/{settings.sp * settings.dp} of them on each rank (--shard-params)"
            if settings.shard_params
            else "a whole copy of them on every rank unless --shard-params"
        )
        + ". Change: "
        + _advice(
            settings,
            "--memory",
            "--shard-params",
            "--dtype bf16",
            "--optimizer param",
            "a smaller model",
        )
    )


def _too_small(memory: StepMemory, seq_len: int, settings: PlanSettings) -> AutoSPError:
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in memory.breakdown.items())
    return AutoSPError(
        f"autosp plan: even {seq_len:,} tokens need {memory.peak / GIB:.2f} GiB per rank "
        f"({parts}), more than {settings.memory_gib:g} GiB. Change: "
        + _advice(
            settings,
            "--memory",
            "--sp",
            "--chunk-loss",
            "--recompute full",
            "--batch-size 1",
            "--optimizer param",
        )
    )


def _fit(points: list[Point]) -> tuple[float, float]:
    """Least-squares line (bytes per token, bytes at zero) through the traced peaks."""
    xs = [float(p.seq_len) for p in points]
    ys = [float(p.memory.peak) for p in points]
    if len(set(xs)) < 2:
        return 0.0, ys[0]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    return slope, mean_y - slope * mean_x


def plan(
    config: PretrainedConfig,
    settings: PlanSettings,
    *,
    name: str = "model",
    progress: Progress = lambda _: None,
) -> Plan:
    """Trace steps of ``config``'s model under ``settings`` and find the largest sequence
    length whose per-rank peak fits ``settings.memory_gib``.

    The peak grows about linearly with the tokens (the chunked loss and the recognised masks
    leave nothing quadratic) within each range of lengths that runs one recomputation policy
    (``_segments``): in each range whose first length fits, two lengths are traced and a line
    fitted, the length where it meets the budget is traced, and a secant search over traced
    lengths (bisection when it stalls) ends at a length that fits whose next multiple of
    ``settings.step`` does not (or at the range's end); the answer is the longest of them.

    Raises:
        AutoSPError: bad settings, a second process group, or a budget that even the
            shortest length or the weights exceed (the message says what to change).
    """
    budget = int(settings.memory_gib * GIB)
    step = settings.step
    start = time.perf_counter()
    progress(f"building {name} on fake tensors and compiling one rank of SP={settings.sp}")
    with emulate(config, settings, progress) as emulator:
        parameters = emulator.parameters
        compile_s = time.perf_counter() - start
        progress(f"compiled in {compile_s:.0f} s")
        traced: dict[int, Point] = {}
        limits = _auto_limits(emulator)

        def policy(seq_len: int) -> str:
            if limits is None:
                return settings.recompute
            per_rank = settings.batch_size * -(-seq_len // settings.sp)
            return policy_within(limits, per_rank)

        def trace(seq_len: int) -> Point:
            if seq_len not in traced:
                begin = time.perf_counter()
                memory = emulator.trace(seq_len)
                seconds = time.perf_counter() - begin
                traced[seq_len] = Point(seq_len, memory, seconds, policy(seq_len))
                verdict = "fits" if memory.peak <= budget else "over"
                progress(
                    f"traced {seq_len:>12,} tokens ({seq_len // settings.sp:,} per rank): peak "
                    f"{memory.peak / GIB:8.2f} GiB, {verdict} "
                    f"({traced[seq_len].seconds:.1f} s)"
                )
            return traced[seq_len]

        segments = _segments(emulator, settings)
        largest = _largest(trace, traced, segments, settings)
        for extra in settings.lengths:
            trace(extra)
        for i in range(1, settings.curve_points + 1):
            fraction = i / (settings.curve_points + 1)
            trace(max(step, int(largest * fraction) // step * step))
        points = sorted(traced.values(), key=lambda p: p.seq_len)
        fit_range = next((lo, hi) for lo, hi in segments if lo <= largest <= hi)
        in_range = [p for p in points if fit_range[0] <= p.seq_len <= fit_range[1]]
        slope, fixed = _fit(in_range if len(in_range) >= 2 else points)
        trace_s = sum(p.seconds for p in points)
        return Plan(
            model=name,
            parameters=parameters,
            settings=settings,
            points=points,
            largest=largest,
            slope=slope,
            fixed=fixed,
            fit_range=fit_range,
            plans=emulator.plan_lines(),
            compile_s=compile_s,
            trace_s=trace_s,
            versions=_versions(),
        )


def _auto_limits(emulator: Emulator) -> tuple[int, int] | None:
    """Under ``recompute="auto"``: the most tokens per rank that run ``"cheap"``, and
    ``"cheap"`` or ``"layers"``."""
    return next((p.auto_limits for p in emulator.parallel.plans if p.auto_limits), None)


def _segments(emulator: Emulator, settings: PlanSettings) -> list[tuple[int, int]]:
    """The ranges of sequence lengths (multiples of ``settings.step``, up to
    ``settings.max_tokens``) whose peak grows with the length: one, or under
    ``recompute="auto"`` one per policy, as the peak drops where calls switch from ``"cheap"``
    to ``"layers"`` and from ``"layers"`` to ``"full"`` (Note [Recomputation by length])."""
    step, cap = settings.step, settings.max_tokens
    limits = _auto_limits(emulator) or ()
    ends = sorted({limit * settings.sp // settings.batch_size // step * step for limit in limits})
    starts = [step] + [end + step for end in ends]
    return [(lo, min(hi, cap)) for lo, hi in zip(starts, [*ends, cap], strict=True) if lo <= cap]


def _largest(
    trace: Callable[[int], Point],
    traced: dict[int, Point],
    segments: list[tuple[int, int]],
    settings: PlanSettings,
) -> int:
    """The largest length whose traced peak fits the budget: the largest of each segment's
    (``_segments``) where its first length fits."""
    budget = int(settings.memory_gib * GIB)
    first = trace(segments[0][0])
    if first.memory.peak > budget:
        raise _too_small(first.memory, first.seq_len, settings)
    largest = segments[0][0]
    for lo, hi in segments:
        if lo > largest and trace(lo).memory.peak > budget:
            continue  # a later segment starts lower: it may fit again
        largest = max(largest, _search(trace, traced, budget, settings.step, lo, hi))
    return largest


def _growing(point: Point) -> int:
    """The forward and backward peak: what grows with the tokens (the optimizer step's peak
    does not, and was checked to fit at the shortest length)."""
    return max(point.memory.phase_peaks[PHASES[0]], point.memory.phase_peaks[PHASES[1]])


def _search(
    trace: Callable[[int], Point],
    traced: dict[int, Point],
    budget: int,
    step: int,
    lo: int,
    hi: int,
) -> int:
    """The largest multiple of ``step`` in ``[lo, hi]`` whose traced peak fits ``budget``,
    where ``lo`` fits and the peak grows with the length: a secant search on the forward and
    backward peak over traced lengths of the range, bracketing the answer between a length
    that fits and the next one, which does not."""
    fits, over = lo, None
    candidate = min(hi, max(FIRST_FIT * step, 2 * lo))
    for _ in range(MAX_TRACES):
        if candidate <= fits:
            return fits
        if trace(candidate).memory.peak <= budget:
            fits = max(fits, candidate)
        else:
            over = candidate if over is None else min(over, candidate)
        if over is not None and over - fits <= step:
            return fits
        if over is None and fits >= hi:
            return hi
        low = trace(fits)
        below = [n for n in traced if lo <= n < fits]
        if over is not None:
            high = trace(over)
        elif below:  # the longest fitting length and the one below it
            high, low = low, trace(max(below))
        else:
            high = low
        rise, run = _growing(high) - _growing(low), high.seq_len - low.seq_len
        guess = (
            low.seq_len + (budget - _growing(low)) * run / rise
            if rise > 0 and run
            else fits * (MAX_GROWTH if below else 2)
        )
        upper = min(hi, fits * MAX_GROWTH) if over is None else over - step
        candidate = min(max(int(guess) // step * step, fits + step), upper)
        if candidate in traced:  # the secant stalled: bisect
            middle = (fits + (over if over is not None else 2 * fits)) // 2
            candidate = min(max(middle // step * step, fits + step), upper)
    raise AutoSPError(
        f"autosp plan: no answer after {MAX_TRACES} traced lengths (last: {fits:,} fits, "
        f"{'none' if over is None else f'{over:,}'} does not); the peak is far from linear "
        "in the tokens: trace explicit lengths with --lengths"
    )
