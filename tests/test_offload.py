"""Saved activations offloaded to host memory (Note [Activation offloading])."""

from __future__ import annotations

import re

import pytest

import autosp
from autosp.compiler.offload import check_torch
from autosp.errors import AutoSPError
from tests.multirank import run_ranks
from tests.offload_workers import offload_steps

LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
LAYERS = 2  # tests.models builds two-layer models
PLAN = re.compile(
    r"offload: (\d+) saved layer activations to host memory, ([\d.]+) MiB per step per rank "
    r"at the traced length \((\d+) copies out in the forward, (\d+) back in the backward; "
    r"CPU: copies to the same memory"
)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_exact_and_offloaded(backend: str) -> None:
    """Loss and gradients equal one process's at two lengths (one graph, dynamic length), and
    the partitioned graphs hold the copies: every layer's four all-to-all results go to the
    host in the forward and come back in the backward."""
    seqs = [32, 24] if backend == "aot_eager" else [32]
    for result in run_ranks(2, offload_steps, "llama", {"backend": backend}, seqs):
        for step in result["steps"]:
            assert step["loss_rel_err"] <= LOSS_TOL, step
            assert max(step["grad_rel_err"].values()) <= GRAD_TOL, step["grad_rel_err"]
        (line,) = result["plan"]
        found = PLAN.match(line)
        assert found, line
        moved, mib, out, back = found.groups()
        assert int(moved) == int(out) == int(back) >= 4 * LAYERS, line
        assert float(mib) > 0, line
        assert f"all_to_all x{4 * LAYERS}" in line, line


def test_needs_torch_2_12() -> None:
    check_torch("2.12.0")
    check_torch("2.14.1+cu128")
    with pytest.raises(AutoSPError, match=r"needs torch >= 2\.12, .* this is torch 2\.11\.0\."):
        check_torch("2.11.0")


def test_options() -> None:
    assert autosp.Config().offload is False
    assert autosp.Config(offload=True, backend="aot_eager").offload is True
    with pytest.raises(ValueError, match="offload=True needs an AOTAutograd backend"):
        autosp.Config(offload=True, backend="eager")
    with pytest.raises(ValueError, match="offload must be True or False, got 'yes'"):
        autosp.Config(offload="yes")
