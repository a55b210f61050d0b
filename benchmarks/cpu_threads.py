"""Thread layouts on a CPU: does the decoder or the writer starve the engine?

Each layout runs in a fresh Python process (the OpenMP wait policy and the thread count are fixed when torch
loads), on the same recording and bundle: the engine alone on one batch of decoded frames (`engine`), then the
whole `run` pipeline (`e2e`: decode thread, engine, writer thread), so each line carries the ratio that matters,
e2e streaming rate / engine-only rate. Knobs:

* `threads`: torch's intra-op threads (default: the cores);
* `omp`: OMP_WAIT_POLICY (`default` leaves it unset: libgomp spins for a while after each parallel region, which
  takes the cores from the decoder and the writer, or from the engine when they run);
* `decord`: decord's own decoder threads (0 = FFmpeg's choice, one per core);
* `prefetch`: batches decoded ahead (and batches queued for the writer).

Layouts are run in rounds, the second in the reverse order, so that drift of the machine falls on all of them.
`--load N` runs N busy processes beside each layout (another job on the same server), to see which layout holds up
when the cores are shared.

    python benchmarks/cpu_threads.py --frames 900 --rounds 2 --out benchmarks/results/cpu_threads.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, when run as a script

#: name -> the knobs it sets; `base` is what `run` did before this benchmark chose its defaults
LAYOUTS: dict[str, dict[str, Any]] = {
    "base": {},
    "omp-passive": {"omp": "PASSIVE"},
    "decord-1": {"decord": 1},
    "prefetch-2": {"prefetch": 2},
    "threads-1": {"threads": 1},
    "omp-passive+decord-1": {"omp": "PASSIVE", "decord": 1},
}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One layout, in this (fresh) process: engine-only then e2e."""
    import torch

    from capsule_batch.model.bundle import ModelBundle
    from capsule_batch.run.measure import bench_decode, bench_e2e, bench_engine, environment
    from capsule_batch.run.runner import EngineSpec
    from capsule_batch.sources import decord_source

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec.get("decord") is not None:
        init = decord_source.DecordSource.__init__
        n = int(spec["decord"])

        def with_threads(self: Any, *a: Any, **kw: Any) -> None:
            kw["num_threads"] = n
            init(self, *a, **kw)

        decord_source.DecordSource.__init__ = with_threads  # type: ignore[method-assign]
    bundle = ModelBundle.load(spec["bundle"])
    engine = EngineSpec(spec["backend"], "cpu", spec["precision"], spec["batch"]).build(bundle)
    _, pixels = bench_decode(spec["recording"], bundle, source="decord", batch_size=spec["batch"],
                             device=engine.device, dtype=engine.dtype, frames=spec["batch"] * 2)
    eng = bench_engine(engine, pixels, batch_size=spec["batch"], warmup=2, repeats=spec["repeats"])
    e2e = bench_e2e(spec["recording"], bundle, engine, source="decord", batch_size=spec["batch"],
                    workdir=spec["workdir"], prefetch=spec.get("prefetch"))
    env = environment(engine.device)
    engine.close()
    return {"engine_frames_per_s": round(eng["frames_per_s"], 2),
            "e2e_frames_per_s": round(e2e["frames_per_s"], 2),
            "stream_frames_per_s": round(e2e["stream_frames_per_s"], 2),
            "engine_frames_per_s_in_run": round(e2e["engine_frames_per_s_in_run"], 2),
            "finish_s": e2e["finish_s"],
            "stream_over_engine": round(e2e["stream_frames_per_s"] / eng["frames_per_s"], 3),
            "e2e_over_engine": round(e2e["frames_per_s"] / eng["frames_per_s"], 3), "frames": e2e["frames"],
            "prefetch": e2e["prefetch"], "torch_threads": torch.get_num_threads(), "cpu": env["cpu"],
            "versions": env["versions"]}


def run_layout(name: str, knobs: dict[str, Any], args: argparse.Namespace, bundle: Path, recording: Path) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if knobs.get("omp"):
        env["OMP_WAIT_POLICY"] = knobs["omp"]
    spec = {**knobs, "bundle": str(bundle), "recording": str(recording), "batch": args.batch_size,
            "backend": args.backend, "precision": args.precision, "repeats": args.repeats,
            "workdir": str(args.work / f"e2e-{name}")}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    try:
        cp = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                            env=env, timeout=3600)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    if cp.returncode != 0:
        return {"layout": name, "knobs": knobs, "error": cp.stderr[-1500:]}
    return {"layout": name, "knobs": knobs, **json.loads(cp.stdout.strip().splitlines()[-1])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--arch", default="eva02_tiny_patch14_224")
    ap.add_argument("--bundle", type=Path, default=None, help="default: a seeded random bundle of --arch")
    ap.add_argument("--recording", type=Path, default=None, help="default: a synthetic 336x336 H.264 recording")
    ap.add_argument("--frames", type=int, default=900)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of: {', '.join(LAYOUTS)}")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--load", type=int, default=0, help="busy processes running beside each layout")
    ap.add_argument("--work", type=Path, default=Path("runs/cpu_threads"))
    ap.add_argument("--out", type=Path, default=None, help="append the JSON lines to this .jsonl file")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    from suite import random_bundle

    from capsule_batch.run.measure import synthetic_recording

    args.work.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or random_bundle(args.arch, {}, args.work / "bundles").path
    recording = args.recording or synthetic_recording(args.work, args.frames)
    names = args.layouts.split(",")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            line = {"bench": "cpu_threads", "when": stamp, "round": r, "arch": args.arch, "backend": args.backend,
                    "precision": args.precision, "batch_size": args.batch_size, "load": args.load,
                    "command": " ".join(["python", *sys.argv]),
                    **run_layout(name, LAYOUTS[name], args, bundle, recording)}
            print(json.dumps(line), flush=True)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(line) + "\n")
            if "error" not in line:
                print(f"  {name:<22} engine {line['engine_frames_per_s']:7.1f}  "
                      f"stream {line['stream_frames_per_s']:7.1f}  e2e {line['e2e_frames_per_s']:7.1f} f/s  "
                      f"stream/engine {line['stream_over_engine']:.3f}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
