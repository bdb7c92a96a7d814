"""End-to-end checks of ``autosp train`` on CPU ranks."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autosp.train.launch import resolve_layout

ROOT = Path(__file__).resolve().parent.parent


def run_train(tmp_path: Path, *flags: str) -> tuple[dict, str]:
    """Run ``autosp train`` with tiny sizes and ``flags``; return its report and stderr."""
    out = tmp_path / "run"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "autosp", "train", *flags, "--steps", "2"]
    cmd += ["--backend", "aot_eager", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(
        cmd, cwd=tmp_path, env=env, check=True, timeout=600, capture_output=True, text=True
    )
    report = json.loads((out / "report.json").read_text())
    assert [s["step"] for s in report["steps"]] == [1, 2]
    assert all(math.isfinite(s["loss"]) for s in report["steps"])
    assert (out / "report.png").stat().st_size > 0
    return report, done.stderr


def test_train_writes_report(tmp_path: Path) -> None:
    """SP=2 with the parameters sharded over the two ranks (the plain layout: below)."""
    report, stderr = run_train(tmp_path, "--sp", "2", "--seq-len", "256", "--shard-params")
    assert report["config"]["sp"] == 2
    assert report["config"]["dp"] == 1
    assert report["config"]["shard_params"] is True
    assert "parameters sharded over 2 ranks (dp 1 x sp 2), gathered in the graph" in stderr


def test_train_data_parallel(tmp_path: Path) -> None:
    """dp 2 x sp 2 on 4 ranks; the steps go to the bar and the report, never to the log (a
    line there would land between the bar's redraws)."""
    report, stderr = run_train(tmp_path, "--dp", "2", "--sp", "2", "--seq-len", "64")
    assert (report["config"]["dp"], report["config"]["sp"], report["world_size"]) == (2, 2, 4)
    assert "(dp 2 x sp 2)" in stderr
    assert "step 1/2" not in stderr and "loss=" in stderr, stderr


def test_layout_flags() -> None:
    """``--dp``/``--sp`` against torchrun's world size (None: the ranks are spawned)."""

    assert resolve_layout(None, None, None) == (1, 2)
    assert resolve_layout(2, None, None) == (2, 2)
    assert resolve_layout(None, None, 4) == (1, 4)
    assert resolve_layout(2, None, 4) == (2, 2)
    assert resolve_layout(None, 2, 4) == (2, 2)
    with pytest.raises(SystemExit, match="--dp 3 x --sp 2 = 6 ranks, but torchrun's WORLD_SIZE"):
        resolve_layout(3, 2, 4)
