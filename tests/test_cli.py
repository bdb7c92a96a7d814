"""End-to-end check of ``autosp train`` on two CPU ranks."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_train_writes_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    cmd = [
        sys.executable,
        "-m",
        "autosp",
        "train",
        "--sp",
        "2",
        "--seq-len",
        "256",
        "--steps",
        "2",
        "--backend",
        "aot_eager",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, timeout=600)

    report = json.loads((out / "report.json").read_text())
    assert [s["step"] for s in report["steps"]] == [1, 2]
    assert all(math.isfinite(s["loss"]) for s in report["steps"])
    assert report["config"]["sp"] == 2
    assert (out / "report.png").stat().st_size > 0
