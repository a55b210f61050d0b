"""The GPU suite (benchmarks/gpu_suite.py) is run only in the rare sessions with a GPU: its CPU dry run keeps the
script itself working between them (every part runs and writes its JSON lines; nothing is timed here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_part_runs_on_a_cpu(tmp_path: Path) -> None:
    out = tmp_path / "suite.jsonl"
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--parts", "all", "--device", "cpu",
           "--arch", "eva02_tiny_patch14_224", "--frames", "160", "--batch-sizes", "16", "--precisions", "fp32",
           "--modes", "eager", "--sample", "16", "--check-frames", "32", "--check-batch", "16",
           "--e2e-config", "fp32/eager", "--e2e-batch", "16", "--warmup", "1", "--repeats", "2",
           "--workdir", str(tmp_path / "work"), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cp = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert cp.returncode == 0, cp.stderr[-3000:]
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [ln["part"] for ln in lines] == ["env", "synth", "check", "engine", "decode", "e2e", "e2e"]
    assert [ln["inflight"] for ln in lines[5:]] == [1, 2]
    assert all(set(ln["stage_seconds"]) == {"engine", "decode_wait", "write_wait"} for ln in lines[5:])
    assert "e2e     decord fp32 eager 16 inflight 2" in cp.stdout and "engine " in cp.stdout
    assert not [ln for ln in lines if "error" in ln]
    check = lines[2]
    assert check["pass"] and check["top1_agreement"] == 1.0  # fp32 on the CPU against the fp32 reference
    assert lines[1]["frames"] == 160 and Path(lines[1]["recording"]).is_file()
    assert all(ln["frames_per_s"] > 0 for ln in lines[3:])
