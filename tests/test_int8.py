"""int8 on a CPU (capsule_batch/backends/int8.py): onnxruntime's static quantisation of the bundle's real ONNX export,
calibrated on synthetic or real frames, stored with the calibration set's identity and its parity with the fp32
export, run by `capsule-batch run --precision int8`, and offered to `auto` only where a stored int8 engine passed
parity. The references are onnxruntime's own fp32 session of the same export and torch fp32."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from capsule_batch.backends import cpu_choice
from capsule_batch.backends.engine_store import EngineStore
from capsule_batch.backends.int8 import (
    calibration_set,
    ensure_int8_onnx,
    passing_int8_entries,
    stored_int8_engine,
)
from capsule_batch.backends.select import choose_backend, create_engine
from capsule_batch.cli import cli
from capsule_batch.errors import EngineError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "kvasir_capsule_seg" / "images"

pytest.importorskip("onnxruntime")


def _int8_meta(store: EngineStore) -> list[dict]:
    return [r for r in store.entries() if r.get("kind") == "onnx-int8"]


def test_engine_build_run_and_reuse(tiny_bundle, recording: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store_dir = tmp_path / "engines"
    monkeypatch.setenv("CAPSULE_BATCH_ENGINES", str(store_dir))  # what `run` uses
    res = CliRunner().invoke(cli, ["engine", "build", "-m", str(tiny_bundle.path), "--device", "cpu", "--precision",
                                   "int8", "--engine-dir", str(store_dir)])
    assert res.exit_code == 0, res.output
    assert "onnxruntime int8 engine on cpu" in res.output and "int8 against fp32 on 32 held-out frames" in res.output
    (meta,) = _int8_meta(EngineStore(store_dir))
    assert meta["calibration"]["source"] == "synthetic" and meta["calibration"]["frames"] == 64
    assert len(meta["calibration"]["sha256"]) == 64 and meta["path"].endswith(meta["calibration"]["sha256"][:12])
    assert meta["bundle_sha256"] == tiny_bundle.sha256 and meta["scheme"].startswith("qdq-minmax")
    par = meta["parity"]
    assert par["frames"] == 32 and 0 <= par["max_abs_dp"] <= 1 and 0 <= par["top1_agreement"] <= 1
    assert par["passed"] == (par["top1_agreement"] >= 0.999 and par["max_abs_dp"] <= 0.01)
    # the quantised graph really holds int8 products: QuantizeLinear/DequantizeLinear around the MatMuls
    import onnx

    ops = {n.op_type for n in onnx.load(str(Path(meta["path"]) / meta["file"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= ops

    # a run with --precision int8 uses the stored engine (no second quantisation) and records int8
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["run", str(recording), "-m", str(tiny_bundle.path), "-o", str(out), "--device",
                                   "cpu", "--precision", "int8", "--batch-size", "32"])
    assert res.exit_code == 0, res.output
    assert len(_int8_meta(EngineStore(store_dir))) == 1
    with h5py.File(out / "study_a.h5") as f:
        engine = f.attrs["engine"]
        engine = json.loads(engine) if isinstance(engine, (str, bytes)) else dict(engine)
        probs = f["frames/probs"][:].astype(np.float32)
    assert engine["backend"] == "onnxruntime" and engine["precision"] == "int8"
    assert engine["calibration"]["sha256"] == meta["calibration"]["sha256"]
    # against torch fp32 on the same frames: int8 moves the probabilities, not the model
    ref = create_engine(tiny_bundle, backend="torch", device="cpu", precision="fp32", max_batch=32)
    from capsule_batch.sources.base import open_source

    with open_source(recording, tiny_bundle.preprocess, batch_size=32) as src:
        fp32 = torch.cat([ref.infer(b.pixels) for b in src]).numpy()
    assert fp32.shape == probs.shape
    assert np.abs(fp32 - probs).max() < 0.2 and (fp32.argmax(1) == probs.argmax(1)).mean() >= 0.8


def test_calibration_frames_are_part_of_the_identity(tiny_bundle, tmp_path: Path) -> None:
    from capsule_batch.sources.synthesize import synthesize

    store = EngineStore(tmp_path / "engines")
    folder = synthesize(tmp_path / "calib", 80, codec="jpg", size=96, seed=3, findings_per_1000=40.0).path
    pixels, ident = calibration_set(tiny_bundle, folder, 16)
    assert pixels.shape == (16, 3, 56, 56) and ident["source"] == str(folder.resolve()) and ident["frames"] == 16
    again, ident2 = calibration_set(tiny_bundle, folder, 16)
    assert ident2 == ident and torch.equal(again, pixels)  # the same frames, spread over the recording
    path_a, meta_a = ensure_int8_onnx(tiny_bundle, store, calibration=folder, frames=16)
    path_b, meta_b = ensure_int8_onnx(tiny_bundle, store)  # the synthetic default: another engine
    assert path_a.parent != path_b.parent and meta_a["calibration"]["sha256"] != meta_b["calibration"]["sha256"]
    assert ensure_int8_onnx(tiny_bundle, store, calibration=folder, frames=16)[1]["created"] == meta_a["created"]
    # a run that names no calibration takes a stored engine as built (passing ones first, then the newest), even
    # when its calibration frames are gone
    import shutil

    shutil.rmtree(folder)
    stored_path, stored_meta = stored_int8_engine(tiny_bundle, store)
    assert stored_path in (path_a, path_b)
    eng = create_engine(tiny_bundle, backend="onnxruntime", device="cpu", precision="int8", max_batch=8, store=store)
    assert eng.describe()["artifact"] == str(stored_path)
    with pytest.raises(EngineError, match="no such file or folder"):
        calibration_set(tiny_bundle, tmp_path / "nothing", 16)


@pytest.mark.skipif(not REAL.is_dir(), reason="the real Kvasir-Capsule frames (../shared/data/real) are not here")
def test_calibrated_on_real_capsule_frames(tiny_bundle, tmp_path: Path) -> None:
    """Calibration on 32 real Kvasir-Capsule frames; parity measured on the 16 of them it did not calibrate on."""
    store = EngineStore(tmp_path / "engines")
    path, meta = ensure_int8_onnx(tiny_bundle, store, calibration=REAL, frames=32)
    assert meta["calibration"]["source"] == str(REAL.resolve()) and meta["parity"]["frames"] == 16
    pixels, _ = calibration_set(tiny_bundle, REAL, 32)
    eng = create_engine(tiny_bundle, backend="onnxruntime", device="cpu", precision="int8", max_batch=32,
                        store=store, calibration=str(REAL), calibration_frames=32)
    ref = create_engine(tiny_bundle, backend="torch", device="cpu", precision="fp32", max_batch=32)
    dp = (eng.infer(pixels) - ref.infer(pixels)).abs().max().item()
    assert dp == pytest.approx(meta["parity"]["max_abs_dp"], abs=0.05)  # fp32 ONNX vs torch: float rounding only


def test_auto_considers_int8_only_where_a_stored_engine_passed(tiny_bundle, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu_choice.FORCE_ENV, raising=False)
    store = EngineStore(tmp_path / "engines")
    cpu = cpu_choice.cpu_info()
    assert cpu_choice.int8_candidates(tiny_bundle, store) == []
    path, meta = ensure_int8_onnx(tiny_bundle, store)
    # the tiny random model's parity decides; make the stored verdict a pass to see `auto` take it up
    meta_file = path.parent / "meta.json"
    stored = json.loads(meta_file.read_text())
    stored["parity"]["passed"] = True
    meta_file.write_text(json.dumps(stored))
    (cand,) = cpu_choice.int8_candidates(tiny_bundle, store)
    assert (cand.backend, cand.precision, cand.options) == ("onnxruntime", "int8", {})
    assert cand in cpu_choice.candidates("auto", "auto", cpu, True, [cand])
    assert cand not in cpu_choice.candidates("auto", "fp32", cpu, True, [cand])  # asked for fp32: never int8
    assert cand not in cpu_choice.candidates("torch", "auto", cpu, True, [cand])
    engine, decision = cpu_choice.choose(
        tiny_bundle, backend="onnxruntime", precision="auto", max_batch=16, store=store, parity_frames=32,
        build=lambda c: create_engine(tiny_bundle, backend=c.backend, device="cpu", precision=c.precision,
                                      max_batch=16, store=store, **c.options))
    ev = decision["evidence"]["onnxruntime int8"]
    assert set(ev) >= {"top1_agreement", "max_abs_dp", "passed", "best_frames_per_s"}  # measured again, like all
    assert ev["passed"] == (ev["top1_agreement"] >= 0.999 and ev["max_abs_dp"] <= 0.01)
    assert decision["label"] in ("onnxruntime fp32", "onnxruntime int8")
    if not ev["passed"]:
        assert decision["label"] == "onnxruntime fp32"
    engine.close()
    assert len(passing_int8_entries(tiny_bundle, store)) == 1


def test_int8_backend_rules(tiny_bundle) -> None:
    assert choose_backend("cpu", "int8") == "onnxruntime"
    with pytest.raises(EngineError, match="backend torch on cpu runs fp32, bf16, fp16, not int8"):
        create_engine(tiny_bundle, backend="torch", device="cpu", precision="int8")
    res = CliRunner().invoke(cli, ["engine", "build", "-m", str(tiny_bundle.path), "--device", "cpu",
                                   "--precision", "fp32", "--calibration", str(tiny_bundle.path)])
    assert res.exit_code != 0 and "for --precision int8" in res.output
