"""Scale benchmark: a long study (default 1,000,000 frames) through the whole pipeline and writer.

Frames come from the `synthetic` source (a small pool of pre-rendered, pre-processed frames, so decode
costs ~nothing) and a small real timm model keeps the engine affordable on CPU; everything else is the
production path: decode thread, engine, writer thread, per-block flushes, events, thumbnails, rename.
Reports one JSON line: frames/s end to end, the engine's frames/s in the run (the calling thread's time in it)
and the time spent outside the engine, peak RSS (sampled over the
run, with the RSS at 10%/50%/90% of the frames to show it does not grow with length), study file size.

    python benchmarks/scale_1m.py --frames 1000000 --out /tmp/scale
    python benchmarks/scale_1m.py --frames 20000 --engine test-torch --import tests/capsule_doubles.py

`--import FILE` registers extra sources/engines (e.g. the test stand-ins) before the run. Where the
`synthetic` source is not installed, the script's own `bench-synthetic` source (same idea: a pool of
random preprocessed frames, batches are views) is used and the JSON says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capsule_batch.sources.base import SOURCES, FrameBatch, FrameSource, RecordingInfo  # noqa: E402

_logger = logging.getLogger("scale_1m")


class BenchSyntheticSource(FrameSource):
    """Fallback synthetic source: the "recording" is a small JSON file {"frames": N, "seed": S}."""

    def info(self) -> RecordingInfo:
        return RecordingInfo(self.path, "synthetic", json.loads(self.path.read_text())["frames"], 4.0, None, None)

    def __iter__(self) -> Iterator[FrameBatch]:
        import torch

        spec = json.loads(self.path.read_text())
        s = self.preprocess.input_size
        g = torch.Generator().manual_seed(int(spec.get("seed", 0)))
        pool = torch.randn((64, 3, s, s), generator=g).to(self.device, self.dtype or torch.float32)
        for lo in range(self.start, spec["frames"], self.batch_size):
            hi = min(spec["frames"], lo + self.batch_size)
            idx = np.arange(lo, hi, dtype=np.int64)
            yield FrameBatch(pool[idx % 64], idx, idx / 4.0)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, default=None, help="Working folder (default: a temporary one).")
    ap.add_argument("--engine", default="torch")
    ap.add_argument("--source", default="synthetic")
    ap.add_argument("--import", dest="imports", action="append", default=[], help="Python file to import first.")
    ap.add_argument("--arch", default="eva02_tiny_patch14_224")
    ap.add_argument("--model-args", default='{"img_size": 28, "depth": 1}', help="JSON timm constructor args.")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--block-frames", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    import timm
    import torch

    from capsule_batch.model.bundle import create_model, save_bundle
    from capsule_batch.model.classes import CE24_CLASSES
    from capsule_batch.model.preprocess import Preprocess
    from capsule_batch.run.pipeline import RunOptions
    from capsule_batch.run.runner import EngineSpec, run_recordings

    for i, f in enumerate(args.imports):
        spec = importlib.util.spec_from_file_location(f"_bench_plugin{i}", f)
        assert spec and spec.loader
        sys.path.insert(0, str(Path(f).resolve().parent))
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.out or Path(tempfile.mkdtemp(prefix="scale_1m."))
    work.mkdir(parents=True, exist_ok=True)
    margs = json.loads(args.model_args)
    size = int(margs.get("img_size", 224))
    torch.manual_seed(0)
    model = create_model(args.arch, len(CE24_CLASSES), margs)
    bundle = save_bundle(work / "bundle", model.state_dict(), arch=args.arch, class_names=list(CE24_CLASSES),
                         preprocess=Preprocess(input_size=size, resize=size), model_args=margs, overwrite=True)

    source = args.source
    if source == "synthetic" and "synthetic" in SOURCES.names():
        recording: Any = f"synthetic:frames={args.frames},size={max(32, size + size % 2)},seed=0"
    else:
        if "bench-synthetic" not in SOURCES.names():
            SOURCES.register("bench-synthetic")(BenchSyntheticSource)
        source = "bench-synthetic"
        recording = work / "synthetic.json"
        recording.write_text(json.dumps({"frames": args.frames, "seed": 0}))
    eng = EngineSpec(args.engine, "cpu", "fp32", args.batch_size).build(bundle)  # built before the clock starts

    samples: list[tuple[float, int]] = []
    done = threading.Event()
    stop = threading.Event()
    opts = RunOptions(source=source, batch_size=args.batch_size, block_frames=args.block_frames, overwrite=True,
                      progress=sys.stderr.isatty(), argv=sys.argv[:])

    def sample() -> None:
        while not done.wait(0.5):
            samples.append((time.perf_counter(), rss_bytes()))

    rss0 = rss_bytes()
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    res = run_recordings([recording], bundle, work / "out", engine=eng, options=opts, stop=stop).results[0]
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if res.status != "done":
        raise SystemExit(f"run failed: {res.error}")
    engine_s = res.stage_seconds["engine"]
    peak = max([r for _, r in samples] + [rss_bytes()])
    times = np.array([s[0] - t0 for s in samples]) if samples else np.zeros(1)
    rss = np.array([s[1] for s in samples]) if samples else np.array([rss_bytes()])

    def rss_at(frac: float) -> int:
        return int(rss[min(len(rss) - 1, int(np.searchsorted(times, frac * wall)))])

    out = {
        "benchmark": "scale_1m", "frames": res.frames, "status": res.status, "events": res.events,
        "flagged_frames": res.flagged_frames, "wall_s": round(wall, 2), "e2e_fps": round(res.frames / wall, 1),
        "engine_s": round(engine_s, 2), "outside_engine_s": round(wall - engine_s, 2),
        "engine_fps_in_run": round(res.frames / engine_s, 1), "e2e_over_engine": round(engine_s / wall, 3),
        "stage_seconds": res.stage_seconds,
        "peak_rss_mib": round(peak / 2**20, 1), "rss_start_mib": round(rss0 / 2**20, 1),
        "rss_at_10_50_90_pct_mib": [round(rss_at(f) / 2**20, 1) for f in (0.1, 0.5, 0.9)],
        "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "study_bytes": Path(res.output).stat().st_size, "study": res.output,
        "config": {"arch": args.arch, "model_args": margs, "engine": args.engine, "source": source,
                   "recording": str(recording), "batch_size": args.batch_size, "block_frames": args.block_frames,
                   "probs_dtype": opts.probs_dtype, "device": "cpu", "precision": "fp32",
                   "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
                   "cpus": os.cpu_count()},
        "command": " ".join([sys.executable, *sys.argv]),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
