"""Decode-only throughput of each frame source: decode + preprocessing to the bundle's input, no engine.

Writes synthetic 336x336 recordings (H.264 for decord / DALI GPU, VP9 and MJPEG for DALI CPU, JPEG and
PNG folders) into --workdir, reads each once untimed to warm caches, then times a full read and prints
one JSON line per configuration on stdout. Logs go to stderr.

    python benchmarks/decode_bench.py --frames 1000 --size 336 --batch 64
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from capsule_batch.devices import resolve_device, torch_dtype
from capsule_batch.errors import CapsuleError
from capsule_batch.model.preprocess import Preprocess
from capsule_batch.sources import open_source
from capsule_batch.sources.synthesize import synthesize

_logger = logging.getLogger("decode_bench")

#: (source, recording codec, device kind) configurations; "gpu" ones run only where CUDA is present
CONFIGS = [
    ("decord", "h264", "cpu"),
    ("dali", "vp9", "cpu"),
    ("dali", "mjpeg", "cpu"),
    ("images", "jpg", "cpu"),
    ("images", "png", "cpu"),
    ("dali", "jpg", "cpu"),
    ("synthetic", "synthetic", "cpu"),
    ("dali", "h264", "gpu"),
    ("dali", "jpg", "gpu"),
]
SUFFIX = {"h264": ".mp4", "vp9": ".webm", "mjpeg": ".avi", "jpg": "", "png": ""}


def recording(workdir: Path, codec: str, frames: int, size: int) -> str:
    if codec == "synthetic":
        return f"synthetic:frames={frames},size={size},seed=0"
    path = workdir / f"bench_{codec}_{frames}_{size}{SUFFIX[codec]}"
    if not path.exists():
        _logger.info("writing %s", path)
        synthesize(path, frames, codec=codec, size=size, seed=0)
    return str(path)


def time_source(path: str, source: str, pre: Preprocess, batch: int, device: torch.device, dtype: torch.dtype,
                **kw: object) -> tuple[int, float]:
    """(frames, seconds) for one full read; the clock starts after the first batch (warm-up) and stops
    after the device has finished."""
    with open_source(path, pre, source=source, batch_size=batch, device=device, dtype=dtype, **kw) as src:
        it = iter(src)
        first = next(it)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        n = 0
        for b in it:
            n += len(b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        assert src.frames_decoded == n + len(first)
        return n, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--synthetic-frames", type=int, default=1_000_000, help="frames of the synthetic source")
    ap.add_argument("--size", type=int, default=336, help="recording frame side in px")
    ap.add_argument("--input-size", type=int, default=224, help="bundle input size (resize + center crop)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--sources", default="", help="comma-separated source names to run (default: all)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "capsule-decode-bench")
    ap.add_argument("--dali-readers", type=int, default=None, help="parallel DALI video readers (default: auto)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    args.workdir.mkdir(parents=True, exist_ok=True)
    pre = Preprocess(input_size=args.input_size, resize=args.input_size)
    dtype = torch_dtype(args.precision)
    wanted = set(filter(None, args.sources.split(",")))
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    for source, codec, kind in CONFIGS:
        if wanted and source not in wanted:
            continue
        if kind == "gpu" and not torch.cuda.is_available():
            _logger.info("skip %s %s on gpu: no CUDA device", source, codec)
            continue
        device = resolve_device("cuda" if kind == "gpu" else "cpu")
        kw = {"readers": args.dali_readers} if source == "dali" and codec == "h264" else {}
        try:
            frames = args.synthetic_frames if codec == "synthetic" else args.frames
            path = recording(args.workdir, codec, frames, args.size)
            frames, seconds = time_source(path, source, pre, args.batch, device, dtype, **kw)
        except CapsuleError as e:
            _logger.warning("skip %s %s: %s", source, codec, e)
            continue
        print(json.dumps({
            "bench": "decode", "source": source, "codec": codec, "device": str(device),
            "frames_per_s": round(frames / seconds, 1), "frames_timed": frames, "seconds": round(seconds, 3),
            "recording_size": args.size, "input_size": args.input_size, "batch": args.batch,
            "precision": args.precision, "cpu_count": os.cpu_count(), "host": platform.node(),
            "torch": torch.__version__, "command": command,
        }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
