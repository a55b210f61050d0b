"""int8 on a CPU: the bundle's ONNX export quantised after training, calibrated on frames, checked against fp32.

`--precision int8` (backend `onnxruntime`, CPU) runs an int8 copy of the bundle's fp32 ONNX export made by
onnxruntime's static quantisation (QDQ format): every MatMul and Gemm (the patch embedding's and the transformer's
products, ~all of the FLOPs) gets int8 weights, per output channel, and uint8 activations whose ranges were
measured on calibration frames (MinMax). Measured against the alternatives on an AMD Zen 3 (AVX2) with eva02_base:
onnxruntime int8 1.81x torch fp32, torch's dynamic int8 1.34x, torchao's PT2E x86 inductor int8 (docs/engines.md,
"int8").

Calibration frames (`engine build --precision int8 --calibration PATH`, `calibration=` of the backend; a run
without it uses the bundle's stored int8 engine as it was built, one that passed parity first, else quantises on
the default):
- a recording (video file or frame folder) of the kind the model will read, ideally the bundle's own validation
  frames: `DEFAULT_CALIBRATION_FRAMES` frames spread over it (8 places, 8 frames each); every other one calibrates,
  the rest measure parity with fp32;
- by default, capsule-like synthetic frames (`synthesize.Scene`: mucosa, folds, vignette, findings; seed
  `SYNTHETIC_SEED`, another than the CPU choice's parity frames).
The calibration set's identity (source, size and time of the file, the frames' sha256) is part of the stored
engine's identity (`onnx-int8-<digest>` in the engine store): other frames build another engine. The engine's
meta.json records its parity with the fp32 export on the held-out frames (top-1 agreement, max |dp|) and whether
that meets the Fidelity bounds; the CPU choice offers int8 to `auto` only where a stored int8 engine of the bundle
passed them (cpu_choice.py), and measures it again there like every candidate.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from capsule_batch.errors import EngineError, MissingPackageError
from capsule_batch.model.bundle import ModelBundle

_logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION_FRAMES = 64
#: the synthetic calibration recording's seed (the CPU choice's parity frames use seed 0)
SYNTHETIC_SEED = 1
#: places a recording is sampled at; each gives `frames / PLACES` consecutive frames
PLACES = 8
ENTRY_PREFIX = "onnx-int8-"


def calibration_set(bundle: ModelBundle, source: str | os.PathLike | None = None,
                    frames: int = DEFAULT_CALIBRATION_FRAMES) -> tuple[Any, dict[str, Any]]:
    """(preprocessed (N,3,S,S) float32 frames, identity) of the calibration frames (see the module docstring)."""

    if frames < 4:
        raise EngineError(f"int8 calibration needs at least 4 frames, got {frames}")
    if source is None:
        from capsule_batch.backends.cpu_choice import parity_pixels

        pixels = parity_pixels(bundle, frames, seed=SYNTHETIC_SEED).float()  # the CPU choice's scene, another seed
        ident = {"source": "synthetic", "seed": SYNTHETIC_SEED}
    else:
        pixels, ident = _recording_frames(bundle, Path(source), frames)
    digest = hashlib.sha256(pixels.numpy().tobytes()).hexdigest()
    return pixels, {**ident, "frames": int(pixels.shape[0]), "sha256": digest}


def _recording_frames(bundle: ModelBundle, path: Path, frames: int) -> tuple[Any, dict[str, Any]]:
    import torch

    from capsule_batch.errors import SourceError
    from capsule_batch.sources.base import open_source

    if not path.exists():
        raise EngineError(f"{path}: int8 calibration frames: no such file or folder")
    per_place = max(1, frames // PLACES)
    try:
        with open_source(path, bundle.preprocess, batch_size=per_place) as src:
            total = src.info().frame_count
        starts = [0] if not total else sorted({int(k * max(total - per_place, 0) / max(PLACES - 1, 1))
                                               for k in range(PLACES)})
        chunks = []
        for start in starts:
            with open_source(path, bundle.preprocess, batch_size=per_place, start=start, announce=False) as src:
                for batch in src:
                    chunks.append(batch.pixels.float().cpu())
                    break
    except SourceError as e:
        raise EngineError(f"{path}: int8 calibration frames cannot be read: {e}") from None
    pixels = torch.cat(chunks)[:frames] if chunks else None
    if pixels is None or pixels.shape[0] < 4:
        raise EngineError(f"{path}: int8 calibration needs at least 4 frames, found "
                          f"{0 if pixels is None else pixels.shape[0]}")
    st = path.stat()
    return pixels, {"source": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def quantize(fp32_onnx: Path, out: Path, pixels: Any) -> None:
    """Write the static int8 (QDQ) copy of `fp32_onnx` to `out`, activations calibrated on `pixels`."""
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
    except ImportError:
        raise MissingPackageError("onnxruntime", "onnx", "int8 quantisation") from None

    from capsule_batch.backends.onnx_export import INPUT_NAME

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{INPUT_NAME: pixels[i:i + 8].numpy()} for i in range(0, len(pixels), 8)])

        def get_next(self) -> dict[str, Any] | None:
            return next(self._batches, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # onnxruntime's quantiser logs advice to the root logger
    try:
        quantize_static(str(fp32_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=["MatMul", "Gemm"], calibrate_method=CalibrationMethod.MinMax)
    finally:
        root.setLevel(level)


def _session(path: Path, threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def parity(fp32_onnx: Path, int8_onnx: Path, pixels: Any, threads: int | None = None) -> dict[str, Any]:
    """The int8 export against the fp32 export on `pixels`: top-1 agreement, max |dp|, passed (Fidelity bounds)."""
    import numpy as np
    import torch

    from capsule_batch.backends.cpu_choice import compare
    from capsule_batch.backends.onnx_export import INPUT_NAME

    def probs(path: Path) -> Any:
        sess = _session(path, threads)
        outs = [sess.run(None, {INPUT_NAME: pixels[i:i + 8].numpy()})[0] for i in range(0, len(pixels), 8)]
        return torch.softmax(torch.from_numpy(np.concatenate(outs)).float(), 1)

    return {**compare(probs(fp32_onnx), probs(int8_onnx)), "frames": int(pixels.shape[0])}


def ensure_int8_onnx(bundle: ModelBundle, store: Any, *, calibration: str | os.PathLike | None = None,
                     frames: int = DEFAULT_CALIBRATION_FRAMES, opset: int | None = None, exporter: str = "legacy",
                     policy: str = "auto", threads: int | None = None) -> tuple[Path, dict[str, Any]]:
    """The bundle's int8 ONNX from the engine store, quantised on first use (and its fp32 export with it)."""
    from capsule_batch.backends.engine_store import bundle_identity
    from capsule_batch.backends.onnx_export import DEFAULT_OPSET, ensure_onnx

    opset = opset or DEFAULT_OPSET
    fp32_path, fp32_meta = ensure_onnx(bundle, store, dtype="fp32", opset=opset, exporter=exporter, policy=policy)
    pixels, calib = calibration_set(bundle, calibration, frames)
    import onnxruntime

    expected = {"kind": "onnx-int8", **bundle_identity(bundle), "dtype": "int8", "opset": opset, "exporter": exporter,
                "fp32_sha256": fp32_meta["sha256"], "calibration": calib, "scheme": "qdq-minmax-w8pc-a8u-matmul",
                "quantizer_version": onnxruntime.__version__}

    def build(tmp: Path) -> tuple[str, dict[str, Any]]:
        t0 = time.perf_counter()
        quantize(fp32_path, tmp / "model.onnx", pixels[0::2])
        seconds = time.perf_counter() - t0
        check = parity(fp32_path, tmp / "model.onnx", pixels[1::2], threads)
        _logger.info("int8 quantisation of %s: %.1f s on %d calibration frames; against fp32 on %d held-out frames: "
                     "top-1 agreement %.2f %%, max |dp| %.4f (%s the Fidelity bounds)", bundle.name, seconds,
                     len(pixels[0::2]), check["frames"], 100 * check["top1_agreement"], check["max_abs_dp"],
                     "meets" if check["passed"] else "misses")
        return "model.onnx", {"backend": "onnxruntime", "backend_version": onnxruntime.__version__,
                              "quantize_seconds": round(seconds, 2), "parity": check}

    return store.ensure(bundle, f"{ENTRY_PREFIX}{calib['sha256'][:12]}", expected, build, policy)


def stored_int8_entries(bundle: ModelBundle, store: Any) -> list[dict[str, Any]]:
    """The usable stored int8 engines of this bundle (same weights), those that passed parity first, then newest."""
    from capsule_batch.backends.engine_store import bundle_identity

    ident = bundle_identity(bundle)
    rows = [r for r in store.entries() if r.get("status") == "ok" and r.get("kind") == "onnx-int8"
            and all(r.get(k) == v for k, v in ident.items())]
    rows.sort(key=lambda r: str(r.get("created")), reverse=True)
    return sorted(rows, key=lambda r: not (r.get("parity") or {}).get("passed"))


def passing_int8_entries(bundle: ModelBundle, store: Any) -> list[dict[str, Any]]:
    """The stored int8 engines of this bundle whose parity with fp32 met the Fidelity bounds."""
    return [r for r in stored_int8_entries(bundle, store) if (r.get("parity") or {}).get("passed")]


def stored_int8_engine(bundle: ModelBundle, store: Any) -> tuple[Path, dict[str, Any]] | None:
    """(artefact, meta) of the stored int8 engine a run without `--calibration` uses (one that passed parity first,
    then the newest), its bytes checked against its meta.json; None when the store holds none of this bundle. The
    calibration frames need not exist any more: the engine is used as it was built."""
    rows = stored_int8_entries(bundle, store)
    if not rows:
        return None
    d = Path(rows[0]["path"])
    meta = store.read_meta(d)
    return store.verify_artifact(d, meta), meta


__all__ = ["DEFAULT_CALIBRATION_FRAMES", "ENTRY_PREFIX", "calibration_set", "ensure_int8_onnx",
           "passing_int8_entries", "parity", "quantize", "stored_int8_engine", "stored_int8_entries"]
