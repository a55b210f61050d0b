"""The command line as a user meets it: help, version, env, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from capsule_batch.cli import COMMANDS, cli

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "capsule_batch", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_python_m_entry_point_and_version():
    res = run_cli("--version")
    assert res.returncode == 0 and "capsule-batch" in res.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name):
    res = CliRunner().invoke(cli, [name, "--help"])
    assert res.exit_code == 0 and "Usage:" in res.output


def test_env_reports_packages_devices_and_registries():
    res = CliRunner().invoke(cli, ["env", "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    pkgs = {p["package"]: p for p in rep["packages"]}
    for name in ("torch", "timm", "h5py", "decord", "nvidia.dali", "tensorrt"):
        assert name in pkgs
    assert pkgs["torch"]["importable"] and pkgs["timm"]["importable"]
    assert pkgs["tensorrt"]["version"] is None  # cannot be installed on these machines
    assert rep["devices"]["cuda_available"] in (True, False)
    assert isinstance(rep["sources"], list) and isinstance(rep["backends"], list)
    text = CliRunner().invoke(cli, ["env"]).output
    assert "packages:" in text and "sources:" in text and "backends:" in text


@pytest.mark.parametrize("args, message", [
    (["model", "info", "/no/such/bundle"], "/no/such/bundle: no such bundle folder"),
    (["model", "import", "/no/such.ckpt", "--arch", "eva02_tiny_patch14_224", "-o", "{tmp}/b"],
     "/no/such.ckpt: no such file"),
    (["model", "import", "{tmp}", "--arch", "eva02_tiny_patch14_224", "-o", "{tmp}/b"],
     "is a directory, expected a checkpoint file"),
    (["synth", "-o", "{tmp}/nodir/x.mp4", "--frames", "3"], "nodir: output folder does not exist"),
    (["synth", "-o", "{tmp}/afile/x.mp4", "--frames", "3"], "afile: output folder does not exist"),
    (["model", "info", "{tmp}/afile"], "not a model bundle"),
])
def test_bad_input_is_one_line_and_exit_1(tmp_path, args, message):
    (tmp_path / "afile").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = run_cli(*args)
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("args", [
    ["synth", "-o", "x.mp4", "--frames", "abc"],
    ["synth", "-o", "x.mp4"],
    ["synth", "-o", "x.mp4", "--frames", "3", "--codec", "h265"],
    ["model", "import", "x.ckpt"],
    ["no-such-command"],
])
def test_usage_errors_exit_2(args):
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_run_option_defaults_are_the_options_dataclasses_own() -> None:
    """A default is written once, on RunOptions / TriageConfig; `run --help` shows it from there."""
    import dataclasses

    from capsule_batch.cli.run import command
    from capsule_batch.run.pipeline import RunOptions
    from capsule_batch.study.triage import TriageConfig

    shown = {p.name: p.default for p in command.params}
    run_fields = {f.name: f.default for f in dataclasses.fields(RunOptions)}
    triage_fields = {f.name: f.default for f in dataclasses.fields(TriageConfig)}
    for name in ("resume", "reuse", "probs_dtype", "block_frames", "thumbs_per_event", "max_thumbs", "progress",
                 "decode_timeout", "engine_timeout", "inflight", "fps", "progress_every"):
        assert shown[name] == run_fields[name], name
    for name in ("merge_gap", "min_run", "smooth", "top_k"):
        assert shown[name] == triage_fields[name], name
