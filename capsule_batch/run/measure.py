"""Stage benchmarks — decode only, engine only, end to end — each returning one JSON-able dict.

The method follows timm's benchmark.py: warm-up before the clock starts, device synchronisation
before the clock is read, the median of several repeats for the engine, real frames as input (never
zeros), and the whole configuration (model, source, backend, precision, batch, frame size, device,
package versions) in every result, so a number never travels without what produced it.
`capsule-batch bench` and the scripts in benchmarks/ are thin layers over these functions.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from capsule_batch import __version__

_logger = logging.getLogger(__name__)

STAGES = ("decode", "engine", "e2e")
_FLOPS_CACHE: dict[str, float] = {}


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def device_name(device: Any) -> str:
    import torch

    from capsule_batch.backends.cpu_choice import cpu_info

    if getattr(device, "type", str(device)).startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return cpu_info()["model"]


def environment(device: Any) -> dict[str, Any]:
    """Machine and package versions that a benchmark line carries."""
    import torch

    from capsule_batch.backends.cpu_choice import cpu_info
    from capsule_batch.run.environment import PACKAGES, _version

    versions = {mod: _version(dists) for mod, dists, _ in PACKAGES}
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_info(),  # model, the flags the kernels depend on (avx512_bf16, amx_bf16, ...), usable cores
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "python": platform.python_version(),
        "capsule_batch": __version__,
        "versions": {k: v for k, v in versions.items() if v},
    }


def flops_per_frame(bundle: Any) -> float | None:
    """Forward FLOPs of one frame (2 x multiply-accumulates), counted by torch's FlopCounterMode on CPU, on a copy
    with timm's fused attention off: the counter has no formula for CPU's fused attention kernel and would leave
    the attention products out (2.4 of eva02_base's 46.3 GFLOP); unfused they are two counted `bmm`s."""
    if bundle.sha256 in _FLOPS_CACHE:
        return _FLOPS_CACHE[bundle.sha256]
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        from capsule_batch.backends.onnx_export import disable_fused_attn

        model = bundle.create_model(verify=False)
        disable_fused_attn(model)
        s = bundle.preprocess.input_size
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, s, s))
        flops = float(counter.get_total_flops())
    except Exception as e:  # a model the counter cannot trace still gets benchmarked, without TFLOP/s
        _logger.warning("could not count FLOPs of %s: %s", bundle.arch, e)
        return None
    _FLOPS_CACHE[bundle.sha256] = flops
    return flops


def bench_decode(recording: str | Path, bundle: Any, *, source: str, batch_size: int, device: Any, dtype: Any,
                 frames: int | None = None) -> tuple[dict[str, Any], Any]:
    """Decode + preprocess only. Returns (result, first batch's pixels for the engine stage).

    The first batch is the warm-up (opening, first keyframe) and is not timed.
    """
    from capsule_batch.sources.base import open_source

    with open_source(recording, bundle.preprocess, source=source, batch_size=batch_size, device=device,
                     dtype=dtype) as src:
        it = iter(src)
        first = next(it, None)
        if first is None or len(first) == 0:
            raise RuntimeError(f"{recording}: no frames decoded")
        sample = first.pixels
        _sync(device)
        t0 = time.perf_counter()
        n = 0
        for b in it:
            n += len(b)
            if frames is not None and n + len(first) >= frames:
                break
        _sync(device)
        dt = time.perf_counter() - t0
        name = src.name
    if n == 0:
        raise RuntimeError(f"{recording}: too few frames to time decoding beyond the warm-up batch")
    return {"stage": "decode", "frames": n, "seconds": round(dt, 4), "frames_per_s": n / dt, "source": name}, sample


def bench_engine(engine: Any, pixels: Any, *, batch_size: int, warmup: int = 3, repeats: int = 10,
                 flops: float | None = None) -> dict[str, Any]:
    """Engine only on one batch of real frames (tiled to `batch_size`): median of `repeats` timed calls."""
    import torch

    x = pixels
    if len(x) < batch_size:
        x = x.repeat((batch_size + len(x) - 1) // len(x), 1, 1, 1)
    x = x[:batch_size].to(engine.device, engine.dtype).contiguous()
    t0 = time.perf_counter()
    for _ in range(warmup):
        engine.infer(x)
    _sync(engine.device)
    warmup_s = time.perf_counter() - t0  # torch.compile and CUDA graph capture happen here
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine.infer(x)
            _sync(engine.device)
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    fps = batch_size / med
    out: dict[str, Any] = {"stage": "engine", "frames": batch_size * repeats, "seconds": round(sum(times), 4),
                           "frames_per_s": fps, "median_batch_s": med, "repeats": repeats, "warmup": warmup,
                           "warmup_s": round(warmup_s, 3)}
    if flops:
        out["gflop_per_frame"] = round(flops / 1e9, 3)
        out["tflop_per_s"] = round(flops * fps / 1e12, 4)
    return out


def bench_e2e(recording: str | Path, bundle: Any, engine: Any, *, source: str, batch_size: int,
              workdir: str | Path, inflight: int = 2, max_thumbs: int | None = None,
              prefetch: int | None = None) -> dict[str, Any]:
    """The whole `run` path (`run_recordings`: decode thread, engine, writer thread, triage, thumbnails) into a
    study file, with the given engine.

    `frames_per_s` is the recording's whole time, as `run` reports it; `stream_frames_per_s` the streaming part
    alone (decode -> engine -> writer, `stream_s`), the figure to hold against engine-only, and `finish_s` what came
    after it (events over the whole table, thumbnails decoded again: it grows with the flagged frames, not with the
    recording). The calling thread's streaming time splits into `stage_seconds` (in the engine: launching batches
    and waiting for their results; waiting for decode; waiting for the writer); `outside_engine_s` is the rest of
    the wall time. Nothing extra is synchronised, so batches stay in flight as in a real run. `max_thumbs` and
    `prefetch` (batches decoded ahead, and batches queued for the writer) None: `run`'s defaults."""
    from capsule_batch.run.pipeline import RunOptions
    from capsule_batch.run.runner import run_recordings

    opts = RunOptions(source=source, batch_size=batch_size, overwrite=True, progress=False, inflight=inflight)
    if max_thumbs is not None:
        opts.max_thumbs = max_thumbs
    if prefetch is not None:
        opts.prefetch = prefetch
    res = run_recordings([recording], bundle, Path(workdir) / "e2e", engine=engine, options=opts).results[0]
    dt = res.seconds  # the recording's own time, as `run` reports it (not the output folder's check before it)
    if res.status != "done":
        raise RuntimeError(f"{recording}: end-to-end run failed: {res.error}")
    engine_s, stream_s = res.stage_seconds["engine"], res.stream_seconds
    return {"stage": "e2e", "frames": res.frames, "seconds": round(dt, 4), "frames_per_s": res.frames / dt,
            "stream_s": round(stream_s, 4), "stream_frames_per_s": res.frames / stream_s if stream_s else None,
            "finish_s": round(dt - stream_s, 4), "flagged_frames": res.flagged_frames, "events": res.events,
            "max_thumbs": opts.max_thumbs, "inflight": inflight, "prefetch": opts.prefetch,
            "stage_seconds": res.stage_seconds,
            "engine_s": round(engine_s, 4), "outside_engine_s": round(dt - engine_s, 4),
            "engine_frames_per_s_in_run": res.frames / engine_s if engine_s else None}


def synthetic_recording(workdir: str | Path, frames: int, size: int = 336, seed: int = 0) -> Path:
    """A 336x336 H.264 synthetic recording, reused when it already exists."""
    from capsule_batch.sources.synthesize import synthesize

    path = Path(workdir) / f"bench_h264_{frames}_{size}_{seed}.mp4"
    if not path.exists():
        _logger.info("writing the synthetic recording %s (%d frames)", path, frames)
        synthesize(path, frames, size=size, seed=seed)
    return path


def run_benchmarks(bundle: Any, recording: str | Path | None = None, *, stages: tuple[str, ...] = STAGES,
                   backend: str = "auto", source: str = "auto", device: Any = "cpu", precision: str = "auto",
                   batch_size: int = 64, frames: int = 512, warmup: int = 3, repeats: int = 10,
                   workdir: str | Path | None = None, inflight: int = 2,
                   engine_kwargs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run the requested stages on one configuration; one result dict per stage, each with the full config."""
    from capsule_batch.run.runner import EngineSpec

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="capsule-bench-")
        workdir = tmp.name
    try:
        rec = Path(recording) if recording else synthetic_recording(workdir, frames)
        engine = EngineSpec(backend, device, precision, batch_size, dict(engine_kwargs or {})).build(bundle)
        decode, pixels = bench_decode(rec, bundle, source=source, batch_size=batch_size, device=engine.device,
                                      dtype=engine.dtype, frames=frames)
        results = []
        if "decode" in stages:
            results.append(decode)
        if "engine" in stages:
            results.append(bench_engine(engine, pixels, batch_size=batch_size, warmup=warmup, repeats=repeats,
                                        flops=flops_per_frame(bundle)))
        if "e2e" in stages:
            results.append(bench_e2e(rec, bundle, engine, source=source, batch_size=batch_size, workdir=workdir,
                                     inflight=inflight))
        config = {
            "model": bundle.arch, "model_args": bundle.model_args, "bundle_sha256": bundle.sha256[:16],
            "input_size": bundle.preprocess.input_size, "recording": str(rec), "source": decode["source"],
            **{k: v for k, v in engine.describe().items()
               if k in ("backend", "precision", "compile", "cuda_graphs", "cast", "choice")},
            "batch_size": batch_size, "engine_create_s": engine.create_seconds, **_frame_size(rec),
            **environment(engine.device),
        }
        engine.close()
        for r in results:
            r["frames_per_s"] = round(r["frames_per_s"], 3)
            if r.get("stream_frames_per_s"):
                r["stream_frames_per_s"] = round(r["stream_frames_per_s"], 3)
            r["config"] = config
        return results
    finally:
        if tmp is not None:
            tmp.cleanup()


def _frame_size(recording: Path) -> dict[str, Any]:
    from capsule_batch.errors import SourceError
    from capsule_batch.model.preprocess import Preprocess
    from capsule_batch.sources.base import open_source

    try:
        with open_source(recording, Preprocess(), batch_size=1) as src:
            info = src.info()
        return {"frame_width": info.width, "frame_height": info.height, "codec": info.codec}
    except SourceError:
        return {}
