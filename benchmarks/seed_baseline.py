"""The pipeline a user of the seed's code would run, timed on the same recording and model.

The seed (`infer.py` of mvrcii/capsule_vision_challenge_2024) classifies frames that were first
extracted to JPEG files: it loads them one at a time in the main thread, applies the validation
transform (resize 224, center crop, ImageNet normalisation), stacks batches of 32, runs eager fp32
torch and copies the softmax to numpy. This script reproduces that shape of work with our bundle's
preprocessing (PIL reference) so the comparison is like for like:

1. extract: decode the recording with PyAV and write every frame as a JPEG (quality 95);
2. infer: per batch, open each JPEG with PIL, preprocess, stack, eager fp32 forward, softmax -> numpy.

Both phases are timed; one JSON line goes to stdout (and is appended to --out if given).

    python benchmarks/seed_baseline.py REC.mp4 -m BUNDLE [--batch-size 32] [--frames N] [--out results/x.jsonl]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

_logger = logging.getLogger("seed_baseline")


def extract_jpegs(recording: Path, out_dir: Path, max_frames: int | None = None) -> list[Path]:
    """Decode with PyAV and write `frame_<n>.jpg` files, as the seed's data preparation did."""
    import av
    from PIL import Image

    paths: list[Path] = []
    with av.open(str(recording)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if max_frames is not None and i >= max_frames:
                break
            p = out_dir / f"frame_{i}.jpg"
            Image.fromarray(frame.to_ndarray(format="rgb24")).save(p, quality=95)
            paths.append(p)
    return paths


def infer_one_at_a_time(paths: list[Path], bundle: Any, model: Any, batch_size: int) -> np.ndarray:
    """The seed's loop: load each image in the main thread, batch, eager fp32 forward, softmax to numpy."""
    import torch
    from PIL import Image

    from capsule_batch.model.preprocess import reference_preprocess

    out = []
    with torch.no_grad():
        for lo in range(0, len(paths), batch_size):
            batch = [torch.from_numpy(reference_preprocess(Image.open(p), bundle.preprocess))
                     for p in paths[lo : lo + batch_size]]
            logits = model(torch.stack(batch))
            out.append(torch.softmax(logits, dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, bundle.num_classes), np.float32)


def run_seed_baseline(recording: Path, bundle_path: Path, batch_size: int = 32, max_frames: int | None = None,
                      workdir: Path | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """Time extraction + inference; returns (JSON-able result, probabilities)."""
    import timm
    import torch

    from capsule_batch.model.bundle import ModelBundle

    bundle = ModelBundle.load(bundle_path)
    model = bundle.create_model()
    with tempfile.TemporaryDirectory(dir=workdir, prefix="seed-jpegs-") as tmp:
        t0 = time.perf_counter()
        paths = extract_jpegs(recording, Path(tmp), max_frames)
        t1 = time.perf_counter()
        # warm-up one batch outside the clock, as every stage benchmark does
        infer_one_at_a_time(paths[:batch_size], bundle, model, batch_size)
        t2 = time.perf_counter()
        probs = infer_one_at_a_time(paths, bundle, model, batch_size)
        t3 = time.perf_counter()
    n = len(paths)
    extract_s, infer_s = t1 - t0, t3 - t2
    result = {
        "stage": "seed-baseline",
        "frames": n,
        "frames_per_s": n / (extract_s + infer_s) if n else 0.0,
        "infer_frames_per_s": n / infer_s if n else 0.0,
        "extract_s": round(extract_s, 3),
        "infer_s": round(infer_s, 3),
        "model": bundle.arch,
        "model_args": bundle.model_args,
        "backend": "torch-eager",
        "precision": "fp32",
        "batch_size": batch_size,
        "device": "cpu",
        "cpu_threads": torch.get_num_threads(),
        "recording": recording.name,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    return result, probs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recording", type=Path)
    ap.add_argument("-m", "--bundle", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--frames", type=int, default=None, help="Only the first N frames.")
    ap.add_argument("--out", type=Path, default=None, help="Append the JSON line to this .jsonl file.")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    result, _ = run_seed_baseline(args.recording, args.bundle, args.batch_size, args.frames)
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
