"""Run report: summary on stdout, ``report.json`` and ``report.png`` in the output folder."""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

logger = logging.getLogger(__name__)


@dataclass
class StepStats:
    """Measurements of one optimizer step."""

    step: int
    loss: float
    time_s: float
    tokens_per_s: float
    peak_mem_mib: list[float]  # per rank


def versions() -> dict[str, str | None]:
    """Versions of the software stack this run used."""
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
    }


def summarize(steps: list[StepStats]) -> dict[str, Any]:
    """Headline numbers; throughput leaves out step 1, which includes compilation."""
    timed = steps[1:] or steps
    return {
        "steps": len(steps),
        "first_loss": steps[0].loss,
        "final_loss": steps[-1].loss,
        "first_step_s": steps[0].time_s,
        "total_time_s": sum(s.time_s for s in steps),
        "mean_tokens_per_s": sum(s.tokens_per_s for s in timed) / len(timed),
        "peak_mem_mib": [max(mem) for mem in zip(*(s.peak_mem_mib for s in steps), strict=True)],
    }


def plot(steps: list[StepStats], path: Path) -> None:
    """Save loss and tokens/s per step as a PNG (Agg, no display needed)."""
    from matplotlib.figure import Figure  # Figure.savefig renders PNGs with Agg, no pyplot

    x = [s.step for s in steps]
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, speed_ax = fig.subplots(1, 2)
    loss_ax.plot(x, [s.loss for s in steps], marker="o")
    loss_ax.set(xlabel="step", ylabel="loss", title="Training loss")
    speed_ax.plot(x, [s.tokens_per_s for s in steps], marker="o")
    speed_ax.set(xlabel="step", ylabel="tokens/s", title="Throughput")
    fig.savefig(path, dpi=100)


def write_report(out: Path, info: dict[str, Any], steps: list[StepStats]) -> dict[str, Any]:
    """Write report.json and report.png to ``out``, print a summary; return the report."""
    out.mkdir(parents=True, exist_ok=True)
    report = {
        **info,
        "versions": versions(),
        "summary": summarize(steps),
        "steps": [asdict(s) for s in steps],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    try:
        plot(steps, out / "report.png")
    except ImportError:
        logger.warning("matplotlib is not installed: no plot (pip install 'autosp[plot]')")

    s = report["summary"]
    mem = ", ".join(f"{m:.0f}" for m in s["peak_mem_mib"])
    print(
        f"\n{s['steps']} steps in {s['total_time_s']:.1f}s (first step {s['first_step_s']:.1f}s)\n"
        f"loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}\n"
        f"throughput {s['mean_tokens_per_s']:.0f} tokens/s (steps after the first)\n"
        f"peak memory per rank (MiB): {mem}\n"
        f"report: {out / 'report.json'}"
    )
    return report
