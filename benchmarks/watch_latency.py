"""From a recording's last byte to its finished study, through `capsule-batch watch` (a real watcher process).

Starts one watcher on an empty inbox, then `--repeats` times writes a `--frames`-frame synthetic H.264 recording
into the inbox in 1 MiB pieces (as an upload does), notes the time of the last byte, and waits for OUT/<name>.h5.
The latency is settle time + up to one poll + the run itself (decode, engine, writing, thumbnails). One JSON line
per recording, then a summary line with the median, on stdout:

    python benchmarks/watch_latency.py --frames 3000 --settle 5 --poll 1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--size", type=int, default=128, help="frame size of the synthetic recordings")
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--poll", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bundle", type=Path, default=None,
                    help="model bundle (default: a tiny random eva02_tiny, 2 blocks at 56 px, made here)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)

    from capsule_batch.backends.cpu_choice import cpu_info
    from capsule_batch.sources.synthesize import synthesize

    work = args.workdir or Path(tempfile.mkdtemp(prefix="watch-latency-"))
    inbox, out, src = work / "inbox", work / "out", work / "src"
    for d in (inbox, out, src):
        d.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or _tiny_bundle(work / "bundle")
    recs = [synthesize(src / f"rec{k}.mp4", args.frames, size=args.size, seed=k).path for k in range(args.repeats)]
    cmd = [sys.executable, "-m", "capsule_batch", "watch", str(inbox), "-m", str(bundle), "-o", str(out),
           "--device", "cpu", "--engine", "torch", "--precision", "fp32", "--settle", str(args.settle),
           "--poll", str(args.poll), "--log-file", str(work / "watch.log")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = {"frames": args.frames, "size": args.size, "settle_s": args.settle, "poll_s": args.poll,
              "bundle": str(bundle), "cpu": cpu_info(), "python": platform.python_version(),
              "command": shlex.join(cmd)}
    latencies = []
    try:
        time.sleep(8.0)  # the watcher loads torch, the bundle and the engine before its first look
        for rec in recs:
            dst = inbox / rec.name
            data = rec.read_bytes()
            with open(dst, "wb") as f:
                for k in range(0, len(data), 1 << 20):
                    f.write(data[k:k + (1 << 20)])
                    f.flush()
                    time.sleep(0.05)
            t_last = time.monotonic()
            study = out / (rec.stem + ".h5")
            while not study.exists():
                if proc.poll() is not None:
                    raise SystemExit(f"the watcher ended (rc {proc.returncode}); see {work / 'watch.log'}")
                time.sleep(0.05)
            lat = time.monotonic() - t_last
            latencies.append(lat)
            print(json.dumps({"recording": rec.name, "bytes": len(data), "last_byte_to_study_s": round(lat, 2),
                              "config": config}), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    print(json.dumps({"summary": "last byte to finished study", "median_s": round(statistics.median(latencies), 2),
                      "all_s": [round(x, 2) for x in latencies], "config": config}), flush=True)
    return 0


def _tiny_bundle(path: Path) -> Path:
    import torch

    from capsule_batch.model.bundle import create_model, save_bundle
    from capsule_batch.model.classes import CE24_CLASSES
    from capsule_batch.model.preprocess import Preprocess

    torch.manual_seed(0)
    args = {"img_size": 56, "depth": 2}
    model = create_model("eva02_tiny_patch14_224", len(CE24_CLASSES), args)
    return save_bundle(path, model.state_dict(), arch="eva02_tiny_patch14_224", class_names=list(CE24_CLASSES),
                       preprocess=Preprocess(input_size=56, resize=56), model_args=args, overwrite=True).path


if __name__ == "__main__":
    sys.exit(main())
