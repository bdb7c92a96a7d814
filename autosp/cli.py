"""Command-line interface: ``autosp train``, ``autosp plan``."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

DEFAULT_STEPS = 10  # about 2-3 minutes with the defaults on 2 CPU cores


def build_parser() -> argparse.ArgumentParser:
    """Return the ``autosp`` argument parser."""
    parser = argparse.ArgumentParser(prog="autosp", description="Automatic sequence parallelism.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="train a small Llama on a built-in byte-level corpus with sequence parallelism",
    )
    train.add_argument(
        "--sp",
        type=int,
        default=None,
        help="ranks per sequence-parallel group (default: WORLD_SIZE / dp under torchrun, else 2)",
    )
    train.add_argument(
        "--dp",
        type=int,
        default=None,
        help="data-parallel groups, each with its own batches; dp x sp ranks in all "
        "(default: WORLD_SIZE / sp under torchrun, else 1)",
    )
    train.add_argument(
        "--seq-len", type=int, default=16384, help="tokens per sequence (%(default)s)"
    )
    train.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps (%(default)s)"
    )
    train.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="sequences per step and data-parallel group (%(default)s)",
    )
    train.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (%(default)s)")
    train.add_argument(
        "--model",
        default="tiny",
        help="preset (tiny, small) or a local HF model folder (%(default)s)",
    )
    train.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto picks CUDA when available (%(default)s)",
    )
    train.add_argument(
        "--backend",
        choices=["inductor", "aot_eager"],
        default="inductor",
        help="torch.compile backend (%(default)s)",
    )
    train.add_argument(
        "--seed", type=int, default=0, help="seed for weights and data (%(default)s)"
    )
    train.add_argument(
        "--shard-params",
        action="store_true",
        help="shard parameters, gradients and optimizer state over dp x sp, gathered in the "
        "graph (autosp.integrations.sharded)",
    )
    train.add_argument("--out", default=None, help="output folder (default: runs/<timestamp>)")
    from autosp.plan.command import add_arguments as add_plan_arguments

    add_plan_arguments(
        commands.add_parser(
            "plan", help="the longest sequence that fits a memory size, by tracing the step"
        )
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``autosp`` command line; return the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "plan":
        from autosp.plan.command import run as run_plan

        return run_plan(args)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    from autosp.train.launch import launch
    from autosp.train.worker import TrainConfig

    options = {name: value for name, value in vars(args).items() if name != "command"}
    options["out"] = args.out or str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    launch(TrainConfig(**options))
    return 0
