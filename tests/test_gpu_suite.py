"""The GPU suite (benchmarks/gpu_suite.py) and its wheels (benchmarks/gpu_wheels.sh) are run only in the rare sessions
with a GPU: their CPU dry runs keep them working between those sessions. Every part runs and writes its JSON lines
as it goes, in a fresh environment (nothing on PYTHONPATH, as in a device call); a part that raises, an import that
raises RuntimeError, the time limit and a part that hangs each still leave the lines made before them and the table.
Nothing is timed here."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "benchmarks" / "gpu_suite.py"
TINY = ["--device", "cpu", "--backend", "torch", "--arch", "eva02_tiny_patch14_224",
        "--model-args", '{"img_size": 56, "depth": 2}', "--precisions", "fp32", "--modes", "eager",
        "--batch-sizes", "16", "--check-precisions", "fp32", "--sample", "16", "--check-frames", "32",
        "--e2e-batch", "16", "--warmup", "1", "--repeats", "2"]


def run_suite(tmp: Path, *args: str, pythonpath: str = "", timeout: float = 600) -> tuple[Any, list[dict]]:
    """The suite in a subprocess with an empty PYTHONPATH (a device call's fresh shell) unless given one."""
    out = tmp / "out" / "gpu_suite.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cp = subprocess.run([sys.executable, str(SUITE), *TINY, "--workdir", str(tmp / "work"), "--out", str(out), *args],
                        capture_output=True, text=True, env=env, timeout=timeout, cwd=tmp)
    lines = [json.loads(t) for t in out.read_text().splitlines()] if out.exists() else []
    return cp, lines


@pytest.mark.cpu_choice
def test_every_part_runs_on_a_cpu(tmp_path: Path) -> None:
    cp, lines = run_suite(tmp_path, "--parts", "all", "--frames", "160")
    assert cp.returncode == 0, cp.stderr[-3000:]
    parts = [ln["part"] for ln in lines]
    assert parts[0] == "env" and parts[-1] == "verdict"
    assert [p for i, p in enumerate(parts) if i == 0 or p != parts[i - 1]] == [
        "env", "probe", "engine", "synth", "check", "e2e", "decode", "nvc", "verdict"]
    assert not [ln for ln in lines if "error" in ln]
    assert len({ln["run_id"] for ln in lines}) == 1
    probe = {ln.get("library") or ln.get("module"): ln for ln in lines if ln["part"] == "probe"}
    assert {"libnvcuvid.so.1", "libnvidia-encode.so.1", "PyNvVideoCodec", "av", "decord"} <= set(probe)
    assert probe["av"]["imported"] and probe["decord"]["imported"]
    engine = [ln for ln in lines if ln["part"] == "engine"]
    assert engine[0]["mode"] == "as-run" and engine[0]["engine"]["backend"] == "torch"
    assert all(ln["frames_per_s"] > 0 for ln in engine)
    check = next(ln for ln in lines if ln["part"] == "check" and "precision" in ln)
    prec = engine[0]["engine"]["precision"]  # what `auto` picked on this CPU (bf16 where it has native bf16)
    assert check["pass"]  # the Fidelity bounds against the fp32 reference
    if prec == "fp32":
        assert check["top1_agreement"] == 1.0
    e2e = [ln for ln in lines if ln["part"] == "e2e"]
    assert [ln["inflight"] for ln in e2e] == [2, 1] and [ln["max_thumbs"] for ln in e2e] == [200, 0]
    for ln in e2e:
        assert set(ln["stage_seconds"]) == {"engine", "decode_wait", "write_wait"}
        assert ln["frames"] == 160 and 0 < ln["stream_s"] <= ln["seconds"] and ln["finish_s"] >= 0
        assert ln["stream_frames_per_s"] >= ln["frames_per_s"]
    synth = next(ln for ln in lines if ln["part"] == "synth")
    assert synth["frames"] == 160 and Path(synth["recording"]).is_file()
    assert next(ln for ln in lines if ln["part"] == "nvc")["skipped"].startswith("PyNvVideoCodec:")
    assert f"e2e     decord as-run 16 (torch {prec}) inflight 2" in cp.stdout
    assert "verdict run's auto choice" in cp.stdout
    assert "part decode" in (tmp_path / "out" / "gpu_suite.log").read_text()  # the log is kept beside the lines


def test_a_part_that_raises_leaves_the_lines_before_it_and_the_table(tmp_path: Path) -> None:
    cp, lines = run_suite(tmp_path, "--parts", "env,engine,synth", "--frames", "8", "--fail-part", "engine")
    assert cp.returncode == 1
    assert [ln["part"] for ln in lines] == ["env", "engine", "synth"]
    assert lines[1]["error"] == "RuntimeError: --fail-part engine"
    assert lines[2]["frames"] == 8  # the part after it still ran
    assert "engine" in cp.stdout and "ERROR RuntimeError: --fail-part engine" in cp.stdout
    assert "synth   8 frames" in cp.stdout


def test_a_runtime_error_on_import_is_reported_and_skipped(tmp_path: Path) -> None:
    """PyNvVideoCodec's __init__ loads libnvidia-encode.so.1 and raises RuntimeError without it (2.2.4)."""
    fake = tmp_path / "fake" / "PyNvVideoCodec"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("libnvidia-encode.so.1: cannot open shared object file: '
                                      'No such file or directory")\n')
    cp, lines = run_suite(tmp_path, "--parts", "probe,nvc", pythonpath=str(tmp_path / "fake"))
    assert cp.returncode == 0, cp.stderr[-2000:]
    probe = next(ln for ln in lines if ln.get("module") == "PyNvVideoCodec")
    assert not probe["imported"] and "RuntimeError: libnvidia-encode.so.1" in probe["why"]
    nvc = next(ln for ln in lines if ln["part"] == "nvc")
    assert nvc["skipped"].startswith("PyNvVideoCodec: RuntimeError: libnvidia-encode.so.1")
    assert "SKIPPED PyNvVideoCodec: RuntimeError" in cp.stdout


@pytest.mark.cpu_choice
def test_the_time_limit_stops_a_part_and_the_table_still_prints(tmp_path: Path) -> None:
    # 200 configurations of at least 0.5 s each (engine:slow) cannot all run within the limit on any machine, however
    # fast: the engine part stops between two of them (each is far shorter than the grace, so the watchdog, tested
    # below, stays out of it even on a loaded machine)
    cp, lines = run_suite(tmp_path, "--parts", "env,engine,synth", "--batch-sizes", ",".join(["4"] * 200),
                          "--fail-part", "engine:slow", "--time-limit", "20", "--grace", "120")
    assert cp.returncode == 2, cp.stderr[-2000:]
    parts = [ln["part"] for ln in lines]
    stopped = next(i for i, ln in enumerate(lines) if "stopped" in ln)
    assert parts[0] == "env" and parts[stopped] == "engine" and "--time-limit 20 s reached" in lines[stopped]["stopped"]
    assert [ln for ln in lines if ln["part"] == "synth"] == [lines[stopped + 1]]
    assert "skipped" in lines[stopped + 1]
    assert "STOPPED --time-limit 20 s reached" in cp.stdout and "SKIPPED time limit" in cp.stdout


def test_a_part_that_hangs_is_ended_by_the_watchdog_with_the_table(tmp_path: Path) -> None:
    cp, lines = run_suite(tmp_path, "--parts", "env,synth,engine", "--fail-part", "synth:hang", "--time-limit", "10",
                          "--grace", "2", timeout=120)
    assert cp.returncode == 3
    assert [ln["part"] for ln in lines] == ["env", "synth"]
    assert "still running 2 s after --time-limit" in lines[1]["stopped"]
    assert "GPU suite" in cp.stdout and "env " in cp.stdout and "STOPPED still running" in cp.stdout
    # the table again from the lines alone, as after a kill from outside
    again = subprocess.run([sys.executable, str(SUITE), "--table", str(tmp_path / "out" / "gpu_suite.jsonl")],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert again.returncode == 0 and "STOPPED still running" in again.stdout


# ---------------------------------------------------------------------------------------------- gpu_wheels.sh


@pytest.mark.skipif(sys.platform != "linux", reason="bash + coreutils")
def test_dali_parts_reassemble_in_part_order_whatever_folder_they_came_in(tmp_path: Path) -> None:
    big = os.urandom(3000) + b"dali"
    small = b"gast wheel"
    names = {"nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl": big, "gast-0.7.0-py3-none-any.whl": small}
    sums = "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in names.items())
    parts = [big[i:i + 1000] for i in range(0, len(big), 1000)]
    # part 02 in the first folder, 00 in the third: folder order is not part order
    layout = {1: [("nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl", 2)],
              2: [("nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl", 1),
                  ("gast-0.7.0-py3-none-any.whl", None)],
              3: [("nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl", 0),
                  ("nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl", 3)]}
    for k, entries in layout.items():
        d = tmp_path / f"wheels-dali-{k}"
        d.mkdir()
        (d / "SHA256SUMS").write_text(sums)
        (d / "MANIFEST").write_text("\n".join(sorted(names)) + "\n")
        for name, i in entries:
            (d / f"{name}.part-{0 if i is None else i:02d}").write_bytes(small if i is None else parts[i])
    env = {**os.environ, "GPU_WHEELS_ROOT": str(tmp_path)}
    script = str(REPO / "benchmarks" / "gpu_wheels.sh")
    cp = subprocess.run(["bash", script, "--assemble", str(tmp_path / "whl")], capture_output=True, text=True,
                        env=env, timeout=60)
    assert cp.returncode == 0, cp.stderr
    for name, data in names.items():
        assert (tmp_path / "whl" / name).read_bytes() == data
    (tmp_path / "wheels-dali-2" / "nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl.part-01").unlink()
    cp = subprocess.run(["bash", script, "--assemble", str(tmp_path / "whl2")], capture_output=True, text=True,
                        env=env, timeout=60)
    assert cp.returncode == 3 and "differs from SHA256SUMS" in cp.stderr  # a missing part never installs
