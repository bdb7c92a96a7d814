"""``autosp plan``: the traced search, its breakdown, the command and its errors.

The presets keep their widths (vocabularies of 128k-152k, hidden sizes up to 4096) but run
with one layer, so each plan compiles in seconds; the tracing path is the real one."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autosp.cli import main
from autosp.errors import AutoSPError
from autosp.plan.planner import GIB, Plan, PlanSettings, plan
from autosp.plan.presets import PRESETS, plan_config
from autosp.plan.trace import CATEGORIES

ROOT = Path(__file__).resolve().parent.parent


def _adamw_fp32_bytes(parameters: int, tensors: int) -> int:
    """fp32 master weights and the two moments (12 bytes per parameter) and one fp32 step
    counter per parameter tensor."""
    return 12 * parameters + 4 * tensors


BUDGET_GIB = {"llama-3.2-1b": 3.5, "llama-3.1-8b": 11.5, "qwen2.5-7b": 12.5}
"""About 1 GiB above the one-layer models' peak at 1,024 tokens (weights, gradients and the
chunked loss's fp32 weight-gradient buffers): a short search (no optimizer:
``test_options_change_memory`` checks its state)."""


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_plans(preset: str) -> None:
    config = plan_config(preset, num_layers=1)
    settings = PlanSettings(
        memory_gib=BUDGET_GIB[preset], sp=8, optimizer="none", recompute="cheap", curve_points=0
    )
    result = plan(config, settings, name=preset)

    step = settings.step
    budget = int(BUDGET_GIB[preset] * GIB)
    answer = result.point(result.largest)
    above = result.point(result.largest + step)
    assert answer.memory.peak <= budget < above.memory.peak
    assert result.largest % step == 0

    n_params = sum(_model_parameters(config))
    for p in result.points:
        parts = p.memory.breakdown
        assert sum(parts.values()) == p.memory.peak
        assert parts["weights"] >= 2 * n_params  # bf16 parameters (and the rotary buffer)
        assert parts["weights"] - 2 * n_params < 2**20
        assert parts["optimizer"] == 0
        assert 0 <= parts["gradients"] <= 2 * n_params
        assert parts["saved activations"] > 0
    peaks = [p.memory.peak for p in result.points]
    assert peaks == sorted(peaks)  # more tokens, more memory
    assert result.slope > 0
    assert any("linear_cross_entropy" in line for line in result.plans)
    assert any("recognised" in line for line in result.plans)  # causal mask, never built


def _model_parameters(config: object) -> list[int]:
    return [math.prod(shape) for shape in _parameter_shapes(config)]


def _parameter_shapes(config: object) -> list[tuple[int, ...]]:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    with FakeTensorMode():
        model = AutoModelForCausalLM.from_config(config)
    return [tuple(p.shape) for p in model.parameters()]


def test_options_change_memory() -> None:
    """fp32 AdamW state of a bf16 model is counted to the byte; recomputing the cheap ops
    lowers the traced slope."""
    config = plan_config("tiny")
    params = _model_parameters(config)

    def planned(recompute: str) -> Plan:
        settings = PlanSettings(memory_gib=0.05, sp=2, recompute=recompute, curve_points=0)
        return plan(config, settings)

    cheap, off = planned("cheap"), planned("off")
    for p in cheap.points + off.points:
        assert p.memory.breakdown["optimizer"] == _adamw_fp32_bytes(sum(params), len(params))
    assert cheap.slope < off.slope
    assert any("cheap" in line for line in cheap.plans)


def test_sharded_parameters_divide_the_fixed_memory() -> None:
    """--shard-params over dp 2 x sp 2: each rank holds its rows of every parameter (padded
    to a multiple of 4) and AdamW state for those alone, to the byte; buffers stay whole."""
    config = plan_config("tiny")
    shapes = _parameter_shapes(config)
    rows = sum(-(-shape[0] // 4) * math.prod(shape[1:]) for shape in shapes)

    def planned(shard: bool) -> Plan:
        settings = PlanSettings(
            memory_gib=0.05, sp=2, dp=2, shard_params=shard, recompute="cheap", curve_points=0
        )
        return plan(config, settings)

    whole, sharded = planned(False), planned(True)
    buffers = whole.points[0].memory.breakdown["weights"] - 2 * sum(map(math.prod, shapes))
    for p in sharded.points:
        parts = p.memory.breakdown
        assert parts["weights"] == 2 * rows + buffers
        assert parts["optimizer"] == _adamw_fp32_bytes(rows, len(shapes))
        assert parts["gradients"] <= 2 * rows
    assert any(line.startswith("sharded parameters: ") for line in sharded.plans)
    assert not any(line.startswith("sharded parameters: ") for line in whole.plans)
    assert sharded.parameters == whole.parameters == sum(map(math.prod, shapes))
    common = {p.seq_len for p in whole.points} & {p.seq_len for p in sharded.points}
    for n in common:
        assert sharded.point(n).memory.peak < whole.point(n).memory.peak, n


def test_auto_recompute_switches_in_the_plan() -> None:
    """Under the default recompute="auto" the planner traces what parallelize would run:
    "cheap" at short lengths, "layers" once "cheap"'s saved activations pass half the memory
    and "full" once "layers"' do (Note [Recomputation by length]); the search goes on past
    each switch (the peak drops there), and the answer fits while the next length does not."""
    settings = PlanSettings(memory_gib=0.05, sp=2, optimizer="none", curve_points=0)
    assert settings.recompute == "auto"
    result = plan(plan_config("tiny"), settings)
    chosen = [line.split(" for ")[0] for line in result.plans if line.startswith("auto chose")]
    assert set(chosen) == {f"auto chose '{p}'" for p in ("cheap", "layers", "full")}, result.plans
    budget = int(settings.memory_gib * GIB)
    assert result.point(result.largest).memory.peak <= budget
    assert result.point(result.largest + settings.step).memory.peak > budget


def test_cli_prints_table_and_writes_plot(tmp_path: Path) -> None:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    cmd = [
        sys.executable,
        "-m",
        "autosp",
        "plan",
        "--model",
        "tiny",
        "--sp",
        "2",
        "--memory",
        "0.05",
        "--dtype",
        "fp32",
        "--optimizer",
        "param",
        "--recompute",
        "cheap",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=True
    )
    out = done.stdout
    assert "seq len" in out and "saved" in out and "transient" in out
    assert "<- largest that fits" in out
    assert "traced" in done.stderr  # progress
    record = json.loads((tmp_path / "plan.json").read_text())
    assert f"{record['largest_seq_len']:,} tokens" in out
    fits = {p["seq_len"]: p["fits"] for p in record["points"]}
    assert fits[record["largest_seq_len"]] and not fits[record["largest_seq_len"] + 1024]
    for p in record["points"]:
        assert sum(p["breakdown_bytes"][c] for c in CATEGORIES) == p["peak_bytes"]
    assert (tmp_path / "plan.png").stat().st_size > 0


def test_unknown_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "llama-9"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'llama-9'" in err and "llama-3.1-8b" in err


def test_weights_over_budget() -> None:
    with pytest.raises(
        AutoSPError, match=r"weights \(14\.\d\d GiB in bf16\) alone exceed 10 GiB.*--shard-params"
    ):
        plan(plan_config("llama-3.1-8b"), PlanSettings(memory_gib=10, sp=8))


def test_optimizer_state_over_budget() -> None:
    """fp32 AdamW of a one-layer 8B shape: 14 GiB of state, checked after compiling."""
    with pytest.raises(
        AutoSPError, match=r"optimizer state \(14\.\d\d GiB, fp32\).*--optimizer param"
    ):
        plan(plan_config("llama-3.1-8b", num_layers=1), PlanSettings(memory_gib=10, sp=8))


def test_shortest_length_over_budget() -> None:
    """Weights fit, a step does not: the error gives the breakdown and what to change."""
    settings = PlanSettings(memory_gib=0.005, sp=2, dtype="fp32", optimizer="none")
    with pytest.raises(AutoSPError, match=r"even 1,024 tokens need .* GiB per rank.*--sp"):
        plan(plan_config("tiny"), settings)


def test_bad_settings() -> None:
    with pytest.raises(AutoSPError, match="--sp must be at least 2"):
        PlanSettings(memory_gib=10, sp=1)
    with pytest.raises(AutoSPError, match="--dtype must be one of"):
        PlanSettings(memory_gib=10, dtype="int8")
    with pytest.raises(AutoSPError, match="--memory must be positive"):
        PlanSettings(memory_gib=0)


def test_refuses_an_initialised_process_group(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'store'}"
    )
    try:
        with pytest.raises(AutoSPError, match="fresh process"):
            plan(plan_config("tiny"), PlanSettings(memory_gib=1, sp=2))
    finally:
        dist.destroy_process_group()
    assert torch.distributed.is_initialized() is False


def test_chunk_loops_visit_first_and_last_chunk_on_fake_tensors() -> None:
    """Note [Chunk loops on fake tensors]: real tensors get every chunk, fake ones the first
    and the last (shorter) chunk; a loop of one or two chunks is the same either way."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from autosp.compiler.row_chunks import row_chunks

    real = torch.empty(10, 3)
    with FakeTensorMode():
        fake = torch.empty(10, 3)
    assert row_chunks(10, 3, real) == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 12)]
    assert row_chunks(10, 3, fake) == [slice(0, 3), slice(9, 12)]
    assert row_chunks(10, 5, fake) == row_chunks(10, 5, real) == [slice(0, 5), slice(5, 10)]
    assert row_chunks(4, 8, fake) == [slice(0, 8)]
