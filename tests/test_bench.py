"""Benchmarks: `capsule-batch bench` JSON lines parse and carry their configuration; the suite compares with
the seed-style baseline (speed-up and parity); the plot script draws them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import REPO, make_recording

from capsule_batch.backends.cpu_choice import ALL_CANDIDATES
from capsule_batch.cli import cli

CONFIG_KEYS = {"model", "model_args", "input_size", "source", "backend", "precision", "batch_size", "frame_width",
               "frame_height", "codec", "device", "device_name", "cpu", "cpu_count", "torch_threads", "versions"}


def test_bench_cli_prints_one_json_line_per_stage_with_configuration(tiny_bundle, tmp_path):
    rec = make_recording(tmp_path / "rec.mp4", 48)
    out = tmp_path / "bench.jsonl"
    res = CliRunner().invoke(cli, ["bench", str(rec), "-m", str(tiny_bundle.path), "--stage", "all", "--engine",
                                   "torch", "--precision", "fp32", "--source", "decord", "--batch-size", "16",
                                   "--repeats", "2", "--warmup", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = [json.loads(t) for t in res.stdout.splitlines() if t.startswith("{")]
    assert [ln["stage"] for ln in lines] == ["decode", "engine", "e2e"]
    assert [json.loads(t)["stage"] for t in out.read_text().splitlines()] == ["decode", "engine", "e2e"]
    for ln in lines:
        assert ln["frames_per_s"] > 0 and ln["command"].startswith("capsule-batch")
        c = ln["config"]
        assert CONFIG_KEYS <= set(c), CONFIG_KEYS - set(c)
        assert c["model"] == tiny_bundle.arch and c["backend"] == "torch" and c["precision"] == "fp32"
        assert c["batch_size"] == 16 and c["source"] == "decord" and c["frame_width"] == 56 and c["codec"] == "h264"
        assert c["versions"]["torch"] and c["versions"]["timm"]
        assert c["engine_create_s"] > 0  # an ONNX export or a TensorRT build can take minutes: reported
    decode, engine, e2e = lines
    assert decode["frames"] == 48 - 16  # the warm-up batch is not timed
    assert engine["frames"] == 16 * 2 and engine["gflop_per_frame"] > 0 and engine["tflop_per_s"] > 0
    assert engine["warmup_s"] > 0
    assert e2e["frames"] == 48 and 0 <= e2e["outside_engine_s"] < e2e["seconds"]
    assert e2e["inflight"] == 2 and e2e["engine_s"] == e2e["stage_seconds"]["engine"] > 0
    # the streaming part (decode -> engine -> writer) apart from the finish (events, thumbnails decoded again)
    assert 0 < e2e["stream_s"] < e2e["seconds"] and e2e["finish_s"] == round(e2e["seconds"] - e2e["stream_s"], 4)
    assert e2e["stream_frames_per_s"] > e2e["frames_per_s"] and e2e["max_thumbs"] == 200


@pytest.mark.cpu_choice
def test_bench_without_recording_uses_a_synthetic_one(tiny_bundle, tmp_path):
    res = CliRunner().invoke(cli, ["bench", "-m", str(tiny_bundle.path), "--stage", "decode", "--frames", "40",
                                   "--batch-size", "8", "--workdir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    (line,) = [json.loads(t) for t in res.stdout.splitlines() if t.startswith("{")]
    assert line["stage"] == "decode" and line["config"]["frame_width"] == 336 and line["config"]["codec"] == "h264"
    assert (tmp_path / "bench_h264_40_336_0.mp4").is_file()


@pytest.mark.cpu_choice
def test_suite_compares_with_seed_baseline_and_plots(tmp_path):
    out = tmp_path / "suite.jsonl"
    args = [sys.executable, str(REPO / "benchmarks" / "suite.py"), "--arch", "eva02_tiny_patch14_224",
            "--model-args", '{"img_size": 56, "depth": 2}', "--frames", "40", "--batch-sizes", "16",
            "--configs", "torch/fp32,auto/auto", "--repeats", "2", "--warmup", "1",
            "--workdir", str(tmp_path / "work"), "--tag", "test", "--out", str(out)]
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=600, cwd=REPO,
                   env={**__import__("os").environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    lines = [json.loads(t) for t in out.read_text().splitlines()]
    assert [ln["stage"] for ln in lines] == ["seed-baseline", "decode", "engine", "e2e", "decode", "engine", "e2e",
                                             "verdict"]
    base, e2e, auto, verdict = lines[0], lines[3], lines[6], lines[7]
    assert e2e["asked"] == "torch/fp32" and auto["asked"] == "auto/auto"
    # auto on a CPU is the measured choice, stored in the suite's engine store; the verdict holds it against the
    # fastest configuration of the run and the baseline
    assert auto["config"]["choice"]["label"] in {c.label for c in ALL_CANDIDATES.values()}
    assert verdict["auto_chose"] == auto["config"]["choice"]["label"]
    # the decode-sharing bound: end to end on shared cores cannot beat 1 / (1 + engine/decode) of engine-only
    decode, engine = lines[1]["frames_per_s"], lines[2]["frames_per_s"]
    assert e2e["decode_share_bound"] == round(1 / (1 + engine / decode), 3) and 0 < e2e["decode_share_bound"] < 1
    assert e2e["e2e_over_bound"] == pytest.approx(e2e["frames_per_s"] / engine / (1 / (1 + engine / decode)),
                                                  abs=2e-3)
    assert verdict["auto_e2e_over_bound"] == auto["e2e_over_bound"]
    fastest = max(e2e["frames_per_s"], auto["frames_per_s"])
    assert verdict["auto_over_fastest"] == round(auto["frames_per_s"] / fastest, 3)
    assert verdict["auto_over_seed"] == round(auto["frames_per_s"] / base["frames_per_s"], 3)
    assert verdict["cpu"]["model"] and "auto (" in verdict["summary"]
    assert base["frames"] == e2e["frames"] == 40 and all(ln["suite_tag"] == "test" for ln in lines)
    # Same model and frames, fp32 both ways. The baseline sees each frame after a JPEG (q95) round trip, as the
    # seed's extracted frames are, so probabilities differ by a little more than the study's float16 storage;
    # the pipeline itself matches a reference decode to 1e-5 (test_pipeline.py).
    p = e2e["parity_vs_seed"]
    assert p["frames"] == 40 and p["top1_agreement"] >= 0.95 and p["max_abs_dp"] < 0.05, p
    assert e2e["speedup_vs_seed"] == round(e2e["frames_per_s"] / base["frames_per_s"], 3)
    png = tmp_path / "suite.png"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "plot.py"), str(out), "-o", str(png)], check=True,
                   capture_output=True, timeout=120)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cpu_candidates_probe_writes_a_line_per_candidate(tmp_path) -> None:
    """benchmarks/cpu_candidates_probe.py on the tiny model and a few real frames: fp32 is its own reference (ratio
    1, agreement 1), every candidate gets a line with its CPU; nothing is timed here."""
    real = REPO.parent / "shared" / "data" / "real"
    if not (real / "kvasir_capsule_seg" / "images").is_dir():
        pytest.skip(f"the real frames are not here ({real})")
    out = tmp_path / "probe.jsonl"
    cp = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cpu_candidates_probe.py"), "--arch",
                         "eva02_tiny_patch14_224", "--model-args", '{"img_size": 56, "depth": 2}', "--size", "56",
                         "--batch", "8", "--repeats", "1", "--parity-frames", "16", "--ort", "--calibration-frames",
                         "16", "--workdir", str(tmp_path / "work"), "--out", str(out)],
                        capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stderr[-2000:]
    lines = {ln["candidate"]: ln for ln in map(json.loads, out.read_text().splitlines())}
    assert set(lines) == {"fp32", "int8-dynamic", "bf16-cast", "ort-fp32", "ort-int8-static"}
    assert lines["ort-fp32"]["max_abs_dp"] < 1e-4  # the same model through the ONNX export: float rounding only
    assert lines["fp32"]["vs_fp32"] == 1.0 and lines["fp32"]["top1_agreement"] == 1.0
    assert lines["fp32"]["max_abs_dp"] == 0.0 and lines["fp32"]["parity_frames"] == 16
    assert all(ln["cpu"]["model"] and 0 <= ln["top1_agreement"] <= 1 for ln in lines.values())
