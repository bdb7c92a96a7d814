"""``autosp plan``: its arguments and what it prints."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from autosp.config import RECOMPUTE_POLICIES
from autosp.errors import AutoSPError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``plan`` subcommand's options."""
    parser.add_argument(
        "--model",
        default="llama-3.2-1b",
        help="preset (llama-3.2-1b, llama-3.1-8b, qwen2.5-7b, tiny, small) or a local HF model "
        "folder (%(default)s)",
    )
    parser.add_argument(
        "--memory", type=float, default=80.0, help="memory per rank in GiB (%(default)s)"
    )
    parser.add_argument("--sp", type=int, default=8, help="sequence-parallel degree (%(default)s)")
    parser.add_argument(
        "--dp",
        type=int,
        default=1,
        help="data-parallel replicas (per-rank memory does not change, unless --shard-params)",
    )
    parser.add_argument(
        "--shard-params",
        action="store_true",
        help="shard parameters, gradients and optimizer state over dp x sp, gathered per use "
        "in the graph (autosp.integrations.sharded)",
    )
    parser.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32 (%(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=1, help="sequences per step (%(default)s)"
    )
    parser.add_argument(
        "--optimizer",
        default="fp32",
        help="AdamW on fp32 master weights (fp32), on the parameters (param: states in their "
        "dtype), or none (%(default)s)",
    )
    parser.add_argument(
        "--chunk-loss",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="autosp's chunked head and loss (%(default)s)",
    )
    parser.add_argument(
        "--recompute", choices=list(RECOMPUTE_POLICIES), default="auto", help="(%(default)s)"
    )
    parser.add_argument(
        "--multiple", type=int, default=1024, help="the answer's granularity in tokens"
    )
    parser.add_argument(
        "--lengths", type=int, nargs="*", default=[], help="sequence lengths to trace as well"
    )
    parser.add_argument(
        "--num-layers", type=int, default=None, help="override the model's layer count"
    )
    parser.add_argument(
        "--curve-points",
        type=int,
        default=3,
        help="lengths traced below the answer for the plot (%(default)s)",
    )
    parser.add_argument("--out", type=Path, default=None, help="folder for plan.json, plan.png")


def run(args: argparse.Namespace) -> int:
    """Plan, print the table, write the outputs; return the exit status."""
    from autosp.plan.planner import PlanSettings, plan
    from autosp.plan.presets import plan_config
    from autosp.plan.report import table, write

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("autosp", "torch", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)

    def progress(line: str) -> None:
        print(f"autosp plan: {line}", file=sys.stderr, flush=True)

    try:
        settings = PlanSettings(
            memory_gib=args.memory,
            sp=args.sp,
            dp=args.dp,
            shard_params=args.shard_params,
            dtype=args.dtype,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            chunk_loss=args.chunk_loss,
            recompute=args.recompute,
            multiple=args.multiple,
            lengths=tuple(args.lengths),
            curve_points=args.curve_points,
        )
        config = plan_config(args.model, args.num_layers)
        result = plan(config, settings, name=args.model, progress=progress)
    except AutoSPError as err:
        print(str(err), file=sys.stderr)
        return 2
    print(table(result))
    for line in result.plans:
        print(f"  autosp: {line}")
    if args.out is not None:
        for path in write(result, args.out):
            print(f"wrote {path}")
    return 0
