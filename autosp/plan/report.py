"""``autosp plan``'s outputs: the terminal table, ``plan.json`` and ``plan.png``."""

from __future__ import annotations

import json
from pathlib import Path

from autosp.plan.planner import GIB, Plan
from autosp.plan.trace import CATEGORIES

SHORT = {
    "weights": "weights",
    "optimizer": "optim",
    "gradients": "grads",
    "saved activations": "saved",
    "transient": "transient",
}


def table(plan: Plan) -> str:
    """The traced lengths, their per-rank peak and its breakdown (GiB), and the answer."""
    s = plan.settings
    head = ["seq len", "per rank", "recompute", *(SHORT[c] for c in CATEGORIES), "peak", "at", ""]
    rows = []
    for p in plan.points:
        mark = ""
        if p.seq_len == plan.largest:
            mark = "<- largest that fits"
        elif p.memory.peak > plan.budget:
            mark = "over"
        rows.append(
            [
                f"{p.seq_len:,}",
                f"{p.seq_len // s.sp:,}",
                p.recompute,
                *(f"{p.memory.breakdown[c] / GIB:.2f}" for c in CATEGORIES),
                f"{p.memory.peak / GIB:.2f}",
                p.memory.peak_phase,
                mark,
            ]
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        f"{plan.model} ({plan.parameters / 1e9:.2f}B parameters, {s.dtype}), SP={s.sp}, "
        f"DP={s.dp}{', parameters sharded' if s.shard_params else ''}, batch {s.batch_size}, "
        f"optimizer {s.optimizer}, chunk_loss="
        f"{s.chunk_loss}, recompute={s.recompute!r}; budget {s.memory_gib:g} GiB per rank",
        "  ".join(
            h.rjust(w) if i < len(head) - 2 else h.ljust(w)
            for i, (h, w) in enumerate(zip(head, widths, strict=True))
        ).rstrip(),
    ]
    for r in rows:
        cells = [
            c.rjust(w) if i < len(r) - 2 else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    lines.append(
        "per-rank peak in GiB of live tensors at the step's peak (rank 0, traced on fake tensors)"
    )
    lines.append(
        f"largest sequence length: {plan.largest:,} tokens ({plan.largest // s.sp:,} per "
        f"rank; {plan.largest * s.batch_size * s.dp:,} tokens per step over {s.sp * s.dp} "
        f"ranks); slope {plan.slope * s.sp * 1000 / GIB:.3f} GiB per 1k tokens per rank"
        + (
            f" (fitted from {plan.fit_range[0]:,} tokens, where calls run the answer's "
            "recomputation policy)"
            if plan.fit_range[0] > s.step
            else ""
        )
    )
    lines.append(f"compile {plan.compile_s:.0f} s, {len(plan.points)} traces {plan.trace_s:.0f} s")
    return "\n".join(lines)


def write(plan: Plan, out: Path) -> list[Path]:
    """Write ``plan.json`` and ``plan.png`` (when matplotlib is installed) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "plan.json"]
    written[0].write_text(json.dumps(plan.to_json(), indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    xs = [p.seq_len / 1000 for p in plan.points]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    stacks = [[p.memory.breakdown[c] / GIB for p in plan.points] for c in CATEGORIES]
    ax.stackplot(xs, stacks, labels=list(CATEGORIES), alpha=0.55)
    ax.plot(xs, [p.memory.peak / GIB for p in plan.points], "k.-", label="peak (traced)")
    ax.axhline(plan.settings.memory_gib, color="tab:red", ls="--", label="budget")
    ax.axvline(plan.largest / 1000, color="tab:gray", ls=":", label="largest that fits")
    s = plan.settings
    ax.set_xlabel("sequence length (thousand tokens, all ranks)")
    ax.set_ylabel("peak per rank (GiB)")
    sharded = f", DP={s.dp}, parameters sharded" if s.shard_params else ""
    ax.set_title(
        f"{plan.model}, {s.dtype}, SP={s.sp}{sharded}, optimizer {s.optimizer}", fontsize=10
    )
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(out / "plan.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written
