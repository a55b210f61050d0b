"""GPU verification and timing in one script (issue 8), in parts that fit the device tool's 10-minute calls.

Parts (run in order; later parts reuse what earlier ones left in --workdir while the machine is warm):
  env      nvidia-smi, GPU, driver, package versions
  synth    a 336x336 H.264 synthetic recording of --frames frames (rendered on all CPU cores, encoded by x264)
  check    correctness: GPU configurations vs the CPU fp32 reference (PyAV decode + PIL preprocessing + eager fp32
           on the CPU) on a sample of frames: top-1 agreement and max |dp|
  engine   engine only: torch fp16/bf16, eager / torch.compile / CUDA graphs, at each --batch-sizes
  decode   decode only: every available source (decord on the CPU cores, DALI on NVDEC when installed), and
           PyNvVideoCodec on NVDEC when installed (measured only, not a `run` source yet: pixels vs PyAV, frames/s)
  e2e      end to end `run` pipeline for the best engine configuration with each available source, at each
           --e2e-inflight (batches queued on the device); each line says where the run's time went
Each part appends JSON lines to --out (default $OUT/gpu_suite.jsonl) and prints a short table last.

    python benchmarks/gpu_suite.py --parts env,synth,check --frames 50000 --workdir runs/gpu
    python benchmarks/gpu_suite.py --parts engine,decode,e2e --workdir runs/gpu

A dry run on a CPU machine (tiny model, few frames) proves the script itself:
    PYTHONPATH=$PWD python benchmarks/gpu_suite.py --parts all --device cpu --arch eva02_tiny_patch14_224 \\
        --frames 256 --batch-sizes 16 --precisions fp32 --modes eager --sample 32 --check-frames 64 \\
        --e2e-config fp32/eager --e2e-batch 16 --workdir /tmp/gpu-dry --out /tmp/gpu-dry/out.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import parity, random_bundle  # noqa: E402

_logger = logging.getLogger("gpu_suite")
MODES = {"eager": {}, "compile": {"compile": True}, "graphs": {"cuda_graphs": True}}


def part_env(args: argparse.Namespace, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    from capsule_batch.bench import environment

    smi = ""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return [{"part": "env", "nvidia_smi": smi, **environment(ctx["device"])}]


def part_synth(args: argparse.Namespace, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    from capsule_batch.synth import synthesize

    rec = ctx["recording"]
    if rec.exists():
        return [{"part": "synth", "recording": str(rec), "reused": True}]
    t = time.perf_counter()
    synthesize(rec, args.frames, size=336, seed=0, workers=os.cpu_count() or 1)
    return [{"part": "synth", "recording": str(rec), "frames": args.frames,
             "seconds": round(time.perf_counter() - t, 1), "bytes": rec.stat().st_size}]


def reference_probs(bundle: Any, rec: Path, frames: list[int]) -> np.ndarray:
    """CPU fp32 reference on the sampled frames: PyAV decode, PIL preprocessing, eager fp32 on the CPU."""
    import av
    import torch

    from capsule_batch.preprocess import reference_preprocess

    want, got = set(frames), {}
    with av.open(str(rec)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i in want:
                got[i] = reference_preprocess(f.to_ndarray(format="rgb24"), bundle.preprocess)
            if i >= max(frames):
                break
    model = bundle.create_model()
    out = []
    with torch.no_grad():
        for lo in range(0, len(frames), 32):
            x = torch.from_numpy(np.stack([got[i] for i in frames[lo:lo + 32]]))
            out.append(torch.softmax(model(x), 1).numpy())
    return np.concatenate(out)


def part_check(args: argparse.Namespace, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """Each GPU configuration runs the real pipeline over the first --check-frames frames; the sampled rows are
    compared with the CPU fp32 reference."""
    from capsule_batch.pipeline import RunOptions
    from capsule_batch.runner import EngineSpec, run_recordings
    from capsule_batch.store import StudyReader
    from capsule_batch.synth import synthesize

    bundle, n = ctx["bundle"], args.check_frames
    rec = ctx["workdir"] / f"check_{n}.mp4"
    if not rec.exists():
        synthesize(rec, n, size=336, seed=1, workers=os.cpu_count() or 1)
    sample = sorted({int(i) for i in np.linspace(0, n - 1, min(args.sample, n))})
    ref = reference_probs(bundle, rec, sample)
    lines = []
    for precision in args.precisions.split(","):
        for source in ctx["sources"]:
            try:
                opts = RunOptions(source=source, batch_size=args.check_batch, overwrite=True, progress=False,
                                  probs_dtype="float32")
                res = run_recordings([rec], bundle, ctx["workdir"] / f"check-{precision}-{source}", options=opts,
                                     engine=EngineSpec("torch", ctx["device"], precision)).results[0]
                if res.status != "done":
                    raise RuntimeError(f"run {res.status}: {res.error}")
                with StudyReader(res.output) as st:
                    probs = st.probs()[sample]
                p = parity(probs, ref)
                p["pass"] = p["top1_agreement"] >= 0.999 and p["max_abs_dp"] <= 0.01
            except Exception as e:  # one failing configuration is a finding, not the end of the run
                p = {"error": f"{type(e).__name__}: {e}"[:300], "pass": False}
            lines.append({"part": "check", "precision": precision, "source": source, "backend": "torch", **p})
    return lines


def part_engine(args: argparse.Namespace, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    from capsule_batch.backends.base import create_engine
    from capsule_batch.bench import bench_engine, flops_per_frame

    bundle, dev = ctx["bundle"], ctx["device"]
    import torch

    s = bundle.preprocess.input_size
    pixels = torch.randn(64, 3, s, s, generator=torch.Generator().manual_seed(0))  # never zeros
    flops = flops_per_frame(bundle)
    lines = []
    for precision in args.precisions.split(","):
        for mode in args.modes.split(","):
            for b in [int(x) for x in args.batch_sizes.split(",")]:
                try:
                    eng = create_engine(bundle, backend="torch", device=dev, precision=precision, max_batch=b,
                                        **MODES[mode])
                    r = bench_engine(eng, pixels, batch_size=b, warmup=args.warmup, repeats=args.repeats, flops=flops)
                    eng.close()
                except Exception as e:
                    r = {"error": f"{type(e).__name__}: {e}"[:300]}
                lines.append({"part": "engine", "precision": precision, "mode": mode, "batch_size": b, **r})
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    return lines


def part_decode(args: argparse.Namespace, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    import torch

    from capsule_batch.bench import bench_decode

    lines = []
    for source in ctx["sources"]:
        try:
            r, _ = bench_decode(ctx["recording"], ctx["bundle"], source=source, batch_size=args.e2e_batch,
                                device=ctx["device"], dtype=torch.float16 if ctx["device"].type == "cuda" else None)
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {e}"[:300]}
        lines.append({"part": "decode", "source": source, **r})
    if ctx["device"].type == "cuda":
        try:
            import PyNvVideoCodec  # noqa: F401
        except ImportError as e:
            lines.append({"part": "decode", "source": "pynvvideocodec", "error": f"not installed ({e})"[:300]})
        else:
            try:
                r = nvc_decode(ctx["recording"], ctx["bundle"], args.e2e_batch, ctx["device"])
            except Exception as e:
                r = {"error": f"{type(e).__name__}: {e}"[:300]}
            lines.append({"part": "decode", "source": "pynvvideocodec", **r})
    return lines


def nvc_decode(rec: Path, bundle: Any, batch: int, device: Any) -> dict[str, Any]:
    """PyNvVideoCodec (NVDEC, RGB out, on the GPU) + the bundle's preprocessing in fp16: the fallback the issue names
    should DALI not install. Also how its RGB differs from PyAV's on the first batch (colour conversion)."""
    import av
    import PyNvVideoCodec as nvc
    import torch

    from capsule_batch.preprocess import preprocess_batch

    dec = nvc.SimpleDecoder(str(rec), gpu_id=device.index or 0, use_device_memory=True,
                            output_color_type=nvc.OutputColorType.RGB)
    first = None
    n, t0 = 0, time.perf_counter()
    while True:
        frames = dec.get_batch_frames(batch)
        if not frames:
            break
        x = torch.stack([torch.from_dlpack(f) for f in frames])  # (B, H, W, 3) uint8 on the GPU
        if first is None:
            first = x[:16].cpu().numpy()
        preprocess_batch(x, bundle.preprocess, torch.float16, device)
        n += len(frames)
    torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    with av.open(str(rec)) as c:
        ref = [f.to_ndarray(format="rgb24") for f in itertools.islice(c.decode(video=0), len(first))]
    diff = np.abs(first.astype(np.int16) - np.stack(ref).astype(np.int16))
    return {"frames": n, "seconds": round(dt, 2), "frames_per_s": round(n / dt, 1), "batch_size": batch,
            "rgb_vs_pyav_mean_abs": round(float(diff.mean()), 3), "rgb_vs_pyav_max_abs": int(diff.max()),
            "version": getattr(nvc, "__version__", "?"), "note": "measured only; not a run source"}


def part_e2e(args: argparse.Namespace, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    from capsule_batch.backends.base import create_engine
    from capsule_batch.bench import bench_e2e

    precision, mode = args.e2e_config.split("/")
    lines = []
    for source in ctx["sources"]:
        eng = None
        for inflight in (int(x) for x in args.e2e_inflight.split(",")):
            try:
                if eng is None:
                    eng = create_engine(ctx["bundle"], backend="torch", device=ctx["device"], precision=precision,
                                        max_batch=args.e2e_batch, **MODES[mode])
                r = bench_e2e(ctx["recording"], ctx["bundle"], eng, source=source, batch_size=args.e2e_batch,
                              workdir=ctx["workdir"] / f"e2e-{source}", inflight=inflight)
            except Exception as e:
                r = {"error": f"{type(e).__name__}: {e}"[:300], "inflight": inflight}
            lines.append({"part": "e2e", "source": source, "precision": precision, "mode": mode,
                          "batch_size": args.e2e_batch, **r})
        if eng is not None:
            eng.close()
    return lines


PARTS = {"env": part_env, "synth": part_synth, "check": part_check, "engine": part_engine, "decode": part_decode,
         "e2e": part_e2e}


def available_sources(device: Any) -> list[str]:
    from capsule_batch.sources import SOURCES

    names = ["decord"]
    if device.type == "cuda" and "dali" in SOURCES.names() and SOURCES.get("dali").available()[0]:
        names.append("dali")
    return names


def table(lines: list[dict[str, Any]]) -> str:
    from capsule_batch.pipeline import time_split

    rows = []
    for ln in lines:
        what = " ".join(str(ln[k]) for k in ("source", "precision", "mode", "batch_size") if k in ln)
        if "inflight" in ln:
            what += f" inflight {ln['inflight']}"
        if "frames_per_s" in ln:
            extra = f"  {ln['tflop_per_s']:.1f} TFLOP/s" if "tflop_per_s" in ln else ""
            if ln.get("stage_seconds"):
                extra += "  " + time_split(ln["stage_seconds"], ln["seconds"])
            rows.append(f"{ln['part']:<7} {what:<34} {ln['frames_per_s']:>10,.0f} frames/s{extra}")
        elif "top1_agreement" in ln:
            rows.append(f"{ln['part']:<7} {what:<34} top-1 {ln['top1_agreement']:.4f}  max|dp| {ln['max_abs_dp']:.4f}"
                        f"  {'PASS' if ln['pass'] else 'FAIL'}")
        elif "error" in ln:
            rows.append(f"{ln['part']:<7} {what:<34} ERROR {ln['error'][:80]}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="all")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--arch", default="eva02_base_patch14_224")
    ap.add_argument("--bundle", type=Path, default=None, help="default: a seeded random bundle of --arch")
    ap.add_argument("--frames", type=int, default=50_000)
    ap.add_argument("--check-frames", type=int, default=2048)
    ap.add_argument("--check-batch", type=int, default=256)
    ap.add_argument("--sample", type=int, default=1024, help="frames compared with the CPU fp32 reference")
    ap.add_argument("--precisions", default="fp16,bf16")
    ap.add_argument("--modes", default="eager,compile,graphs")
    ap.add_argument("--batch-sizes", default="128,256,512")
    ap.add_argument("--e2e-config", default="fp16/graphs", help="precision/mode of the e2e runs")
    ap.add_argument("--e2e-batch", type=int, default=256)
    ap.add_argument("--e2e-inflight", default="1,2", help="batches in flight on the device, one e2e run each")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--workdir", type=Path, default=Path("runs/gpu"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_suite.jsonl")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")

    from capsule_batch.bundle import ModelBundle
    from capsule_batch.devices import resolve_device

    args.workdir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    bundle = ModelBundle.load(args.bundle) if args.bundle else random_bundle(args.arch, {}, args.workdir / "bundles")
    ctx = {"device": device, "bundle": bundle, "workdir": args.workdir, "sources": available_sources(device),
           "recording": args.workdir / f"gpu_h264_{args.frames}_336.mp4"}
    parts = list(PARTS) if args.parts == "all" else args.parts.split(",")
    lines: list[dict[str, Any]] = []
    for name in parts:
        t = time.perf_counter()
        _logger.info("part %s", name)
        new = PARTS[name](args, ctx)
        for ln in new:
            ln.update(arch=bundle.arch, device_name=str(device), part_seconds=round(time.perf_counter() - t, 1))
        lines += new
        with open(args.out, "a", encoding="utf-8") as fh:
            for ln in new:
                fh.write(json.dumps(ln, default=str) + "\n")
    print(table(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
