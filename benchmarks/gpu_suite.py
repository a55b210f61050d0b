"""GPU verification and timing in one script, in parts that fit the device tool's 10-minute calls (docs/gpu.md).

Parts (run in the order given; later parts reuse what earlier ones left in --workdir while the machine is warm):
  env      nvidia-smi, GPU, driver, CUDA, package versions, the date
  probe    the driver's video libraries (libnvcuvid: NVDEC; libnvidia-encode, which PyNvVideoCodec's import loads),
           the CUDA libraries DALI opens at run time, and whether PyNvVideoCodec / DALI / decord / PyAV import
           (each import in a subprocess of its own, so a crash or a hang is a finding, not the end of the suite)
  engine   engine only, batch --batch-sizes: torch fp16/bf16 x eager/CUDA graphs (--modes; `compile` is slow), and
           `as-run`: the engine `run` builds when given nothing (backend, precision, options, batch all `auto`);
           then `verdict`: whether run's automatic choice is the fastest configuration measured
  synth    a 336x336 H.264 synthetic recording of --frames frames (rendered on all CPU cores, encoded by x264)
  check    correctness: `run` with each --check-precisions on the GPU vs the CPU fp32 reference (PyAV decode + PIL
           preprocessing + eager fp32 on the CPU) on --sample frames: top-1 agreement and max |dp|
  e2e      `run` end to end with the as-run engine through every available source (decord; DALI when installed),
           at each --e2e-inflight: the whole rate, the streaming rate (decode -> engine -> writer) and the finish
  decode   decode only, every available source
  nvc      PyNvVideoCodec (NVDEC) decode + the bundle's preprocessing on the GPU, measured only (not a run source)

Every line is written to --out and flushed as it is made, and logged to --log; every part is guarded (one that
raises leaves an `error` line and the next part runs: exit 1); --time-limit stops the suite between
configurations (exit 2), and a watchdog ends it (exit 3) if a part is still running --grace seconds later; the
table is printed last in every case. `--table FILE` prints the table of the last run in FILE (after a kill from
outside).

    python3 benchmarks/gpu_suite.py --time-limit 270 --workdir runs/gpu            # call 1 of docs/gpu.md
    python3 benchmarks/gpu_suite.py --parts nvc --time-limit 60 --workdir runs/gpu  # call 2

A dry run on a CPU machine (tiny model, few frames) proves the script itself (tests/test_gpu_suite.py):
    python benchmarks/gpu_suite.py --parts all --device cpu --backend torch --arch eva02_tiny_patch14_224 \\
        --model-args '{"img_size": 56, "depth": 2}' --frames 256 --batch-sizes 16 --precisions fp32 --modes eager \\
        --check-precisions fp32 --sample 32 --check-frames 64 --e2e-batch 16 --workdir /tmp/gpu-dry \\
        --out /tmp/gpu-dry/out.jsonl
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# each device call is a fresh shell: nothing on PYTHONPATH but what the command sets, so find the package here
sys.path[:0] = [p for p in (str(REPO), str(REPO / "benchmarks")) if p not in sys.path]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from suite import parity, random_bundle  # noqa: E402

_logger = logging.getLogger("gpu_suite")
#: engine options per --modes entry; each names cuda_graphs, since on CUDA create_engine turns them on by default
MODES: dict[str, dict[str, Any]] = {"eager": {"cuda_graphs": False}, "graphs": {"cuda_graphs": True},
                                    "compile": {"compile": True, "cuda_graphs": False}}
DEFAULT_PARTS = "env,probe,engine,synth,check,e2e,decode"
ALL_PARTS = DEFAULT_PARTS + ",nvc"
#: libraries DALI 2.4 opens at run time (strings in libdali_operators.so), besides the driver's
DALI_LIBRARIES = ("libnppc.so.13", "libnppicc.so.13", "libnppig.so.13", "libnvjpeg.so.13", "libnvimgcodec.so.0",
                  "libnvcomp.so.5", "libcufile.so.0")
IMPORTS = (("PyNvVideoCodec", "PyNvVideoCodec"), ("nvidia.dali", "nvidia-dali-cuda130"), ("decord", "decord"),
           ("av", "av"))


class OutOfTime(Exception):
    """--time-limit has passed: the part stops here and the rest are skipped."""


class Context:
    """What the parts share: arguments, device, the bundle and recording (made on first use, so that a part that
    cannot make them fails alone), the as-run engine's configuration, the deadline."""

    def __init__(self, args: argparse.Namespace, deadline: float | None):
        from capsule_batch.devices import resolve_device

        self.args = args
        self.deadline = deadline
        self.device = resolve_device(args.device)
        self.workdir: Path = args.workdir
        self.recording = self.workdir / f"gpu_h264_{args.frames}_336.mp4"
        self.as_run: dict[str, Any] | None = None  # describe() of the as-run engine, once built
        self.checked: dict[str, bool] = {}  # precision -> passed the parity check
        self.step_delay = 0.0  # --fail-part PART:slow: seconds added before each step of that part (tests)
        self._bundle: Any = None

    @property
    def bundle(self) -> Any:
        if self._bundle is None:
            from capsule_batch.model.bundle import ModelBundle

            a = self.args
            self._bundle = (ModelBundle.load(a.bundle) if a.bundle
                            else random_bundle(a.arch, json.loads(a.model_args), self.workdir / "bundles"))
        return self._bundle

    def check_time(self, need: float = 0.0) -> None:
        """Raise OutOfTime when --time-limit has passed, or when less than `need` seconds (what the next step
        usually takes on the GPU machine) are left: better a step not started than one the watchdog cuts off."""
        if self.step_delay:
            time.sleep(self.step_delay)
        if self.deadline is None:
            return
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise OutOfTime(f"--time-limit {self.args.time_limit:g} s reached")
        if left < need:
            raise OutOfTime(f"--time-limit {self.args.time_limit:g} s reached for the next step ({left:.0f} s left, "
                            f"it needs ~{need:g})")

    def batch_size(self) -> int:
        from capsule_batch.backends.select import auto_batch_size

        return self.args.e2e_batch or auto_batch_size(self.device.type)

    def sources(self) -> list[str]:
        from capsule_batch.sources import SOURCES

        names = ["decord"]
        dali = SOURCES.get("dali") if "dali" in SOURCES.names() else None
        if self.device.type == "cuda" and dali is not None and dali.available()[0] and dali.usable_on_gpu(
                self.recording)[0]:
            names.append("dali")
        return names

    def as_run_engine(self) -> Any:
        """The engine `run` builds with --engine/--precision/--batch-size left at auto (--backend here)."""
        from capsule_batch.run.runner import EngineSpec

        eng = EngineSpec(self.args.backend, self.device, "auto").build(self.bundle, self.batch_size())
        self.as_run = eng.describe()
        return eng


class Suite:
    """Writes each line as it is made (JSON to --out, flushed; a short form to the log) and prints the table."""

    def __init__(self, out: Path, run_id: str, started: float):
        self.lines: list[dict[str, Any]] = []
        self.run_id, self.started = run_id, started
        self.part, self.part_started = "", started
        self._lock = threading.Lock()
        out.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(out, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run, closed by close()
        self.printed = False
        self.common: dict[str, Any] = {}  # fields every line carries (arch, device)

    def emit(self, line: dict[str, Any]) -> None:
        now = time.monotonic()
        line = {"part": self.part, **line, **self.common, "run_id": self.run_id,
                "part_seconds": round(now - self.part_started, 1), "t": round(now - self.started, 1)}
        with self._lock:
            self.lines.append(line)
            if not self._fh.closed:
                self._fh.write(json.dumps(line, default=str) + "\n")
                self._fh.flush()
        _logger.info("%s", table_row(line) or json.dumps(line, default=str)[:300])

    def print_table(self) -> None:
        with self._lock:
            if self.printed:
                return
            self.printed = True
            text = table(self.lines)
        print(text, flush=True)

    def close(self) -> None:
        with self._lock:
            self._fh.close()


# ------------------------------------------------------------------------------------------------------------
# parts: generators of lines


def part_env(ctx: Context) -> Iterator[dict[str, Any]]:
    import torch

    from capsule_batch.run.measure import environment

    smi = ""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    gpu: dict[str, Any] = {}
    if ctx.device.type == "cuda":
        p = torch.cuda.get_device_properties(ctx.device)
        gpu = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
               "multiprocessors": p.multi_processor_count}
    yield {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "nvidia_smi": smi, "gpu": gpu,
           "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if ctx.device.type == "cuda"
           else None, "commit": _commit(), **environment(ctx.device)}


def _commit() -> str:
    """The commit under test: git where the repository is one; on the device machine (no .git) the id that
    benchmarks/gpu_wheels.sh wrote beside the wheels it carried."""
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        rev = ""
    if rev:
        return rev
    carried = REPO / "wheels" / "COMMIT"
    if carried.is_file():
        return " ".join(carried.read_text(encoding="utf-8").split()) or "unknown"
    return "unknown"


def part_probe(ctx: Context) -> Iterator[dict[str, Any]]:
    from capsule_batch.devices import VIDEO_LIBRARIES, load_library

    for name in VIDEO_LIBRARIES + DALI_LIBRARIES:
        why = load_library(name)
        yield {"library": name, "loaded": why is None, "why": why}
    for module, dist in IMPORTS:
        ctx.check_time()
        yield {"module": module, **import_probe(module, dist)}


def import_probe(module: str, dist: str, timeout: float = 120) -> dict[str, Any]:
    """Import `module` in a subprocess: (imported, version, why not). PyNvVideoCodec's import raises RuntimeError
    when the driver has no NVENC library; anything may crash a process."""
    code = (f"import importlib, importlib.metadata as md; importlib.import_module({module!r}); "
            f"print(md.version({dist!r}))")
    try:
        cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"imported": False, "why": f"import did not finish in {timeout:g} s"}
    if cp.returncode == 0:
        return {"imported": True, "version": cp.stdout.strip().splitlines()[-1] if cp.stdout.strip() else None}
    err = [ln for ln in cp.stderr.strip().splitlines() if ln.strip()]
    cause = next((ln for ln in reversed(err) if ln[:1].isalpha() and ":" in ln), err[-1] if err else "")
    return {"imported": False, "why": (cause or f"exit code {cp.returncode}")[:300]}


def part_engine(ctx: Context) -> Iterator[dict[str, Any]]:
    import torch

    from capsule_batch.backends.select import create_engine
    from capsule_batch.run.measure import bench_engine, flops_per_frame

    a, dev = ctx.args, ctx.device
    bundle = ctx.bundle
    s = bundle.preprocess.input_size
    pixels = torch.randn(64, 3, s, s, generator=torch.Generator().manual_seed(0))  # never zeros
    flops = flops_per_frame(bundle)

    def measure(eng: Any, batch: int) -> dict[str, Any]:
        try:
            return bench_engine(eng, pixels, batch_size=batch, warmup=a.warmup, repeats=a.repeats, flops=flops)
        finally:
            eng.close()
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    ctx.check_time()
    try:
        eng = ctx.as_run_engine()
        r = measure(eng, ctx.batch_size())
    except Exception as e:  # one configuration that fails is a finding
        r = {"error": f"{type(e).__name__}: {e}"[:300]}
    yield {"mode": "as-run", "batch_size": ctx.batch_size(), "engine": ctx.as_run, **r}
    for precision, mode, b in itertools.product(a.precisions.split(","), a.modes.split(","),
                                                [int(x) for x in a.batch_sizes.split(",")]):
        ctx.check_time(need=10)
        try:
            eng = create_engine(bundle, backend="torch", device=dev, precision=precision, max_batch=b, **MODES[mode])
            r = measure(eng, b)
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {e}"[:300]}
        yield {"precision": precision, "mode": mode, "batch_size": b, **r}


def verdict(lines: list[dict[str, Any]], checked: dict[str, bool]) -> dict[str, Any] | None:
    """Is `run`'s automatic choice the fastest measured configuration (of those whose precision did not fail the
    parity check)? None when there is nothing to compare."""
    engine = [ln for ln in lines if ln.get("part") == "engine" and "frames_per_s" in ln]
    as_run = next((ln for ln in engine if ln.get("mode") == "as-run"), None)
    grid = [ln for ln in engine if ln.get("mode") != "as-run" and checked.get(ln["precision"], True)]
    if as_run is None or not grid:
        return None
    best = max(grid, key=lambda ln: ln["frames_per_s"])
    cfg = as_run.get("engine") or {}
    ratio = as_run["frames_per_s"] / best["frames_per_s"]
    same = (cfg.get("backend") == "torch" and cfg.get("precision") == best["precision"]
            and bool(cfg.get("cuda_graphs")) == (best["mode"] == "graphs")
            and as_run["batch_size"] == best["batch_size"])
    return {"part": "verdict", "as_run": {k: cfg.get(k) for k in ("backend", "precision", "cuda_graphs", "compile")}
            | {"batch_size": as_run["batch_size"], "frames_per_s": round(as_run["frames_per_s"], 1)},
            "best": {k: best[k] for k in ("precision", "mode", "batch_size")}
            | {"frames_per_s": round(best["frames_per_s"], 1)},
            "as_run_vs_best": round(ratio, 3), "as_run_is_best": same or ratio >= 0.97}


def part_synth(ctx: Context) -> Iterator[dict[str, Any]]:
    from capsule_batch.sources.synthesize import synthesize

    rec = ctx.recording
    if rec.exists():
        yield {"recording": str(rec), "reused": True}
        return
    t = time.perf_counter()
    synthesize(rec, ctx.args.frames, size=336, seed=0, workers=os.cpu_count() or 1)
    yield {"recording": str(rec), "frames": ctx.args.frames, "seconds": round(time.perf_counter() - t, 1),
           "bytes": rec.stat().st_size}


def reference_probs(bundle: Any, rec: Path, frames: list[int]) -> np.ndarray:
    """CPU fp32 reference on the sampled frames: PyAV decode, PIL preprocessing, eager fp32 on the CPU."""
    import av
    import torch

    from capsule_batch.model.preprocess import reference_preprocess

    want, got = set(frames), {}
    with av.open(str(rec)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i in want:
                got[i] = reference_preprocess(f.to_ndarray(format="rgb24"), bundle.preprocess)
            if i >= max(frames):
                break
    model = bundle.create_model()
    out = []
    with torch.inference_mode():
        for lo in range(0, len(frames), 32):
            x = torch.from_numpy(np.stack([got[i] for i in frames[lo:lo + 32]]))
            out.append(torch.softmax(model(x), 1).numpy())
    return np.concatenate(out)


def part_check(ctx: Context) -> Iterator[dict[str, Any]]:
    """`run` with each precision on the first --check-frames frames; the sampled rows against the CPU reference."""
    from capsule_batch.backends.cpu_choice import within_fidelity
    from capsule_batch.run.pipeline import RunOptions
    from capsule_batch.run.runner import EngineSpec, run_recordings
    from capsule_batch.sources.synthesize import synthesize
    from capsule_batch.study.store import StudyReader

    a, bundle, n = ctx.args, ctx.bundle, ctx.args.check_frames
    rec = ctx.workdir / f"check_{n}.mp4"
    if not rec.exists():
        synthesize(rec, n, size=336, seed=1, workers=os.cpu_count() or 1)
    sample = sorted({int(i) for i in np.linspace(0, n - 1, min(a.sample, n))})
    t = time.perf_counter()
    ref = reference_probs(bundle, rec, sample)
    yield {"reference": "cpu fp32 eager, PyAV + PIL", "frames": len(sample),
           "seconds": round(time.perf_counter() - t, 1)}
    for precision in a.check_precisions.split(","):
        ctx.check_time(need=20)
        try:
            opts = RunOptions(source="decord", batch_size=ctx.batch_size(), overwrite=True, progress=False,
                              probs_dtype="float32", max_thumbs=0)
            res = run_recordings([rec], bundle, ctx.workdir / f"check-{precision}", options=opts,
                                 engine=EngineSpec(a.backend, ctx.device, precision)).results[0]
            if res.status != "done":
                raise RuntimeError(f"run {res.status}: {res.error}")
            with StudyReader(res.output) as st:
                probs = st.probs()[sample]
                engine = st.attrs.get("engine")
            p = parity(probs, ref)
            p["pass"] = within_fidelity(p["top1_agreement"], p["max_abs_dp"])
            p["engine"] = engine
        except Exception as e:  # one failing configuration is a finding, not the end of the part
            p = {"error": f"{type(e).__name__}: {e}"[:300], "pass": False}
        ctx.checked[precision] = bool(p["pass"])
        yield {"precision": precision, "source": "decord", **p}


def part_e2e(ctx: Context) -> Iterator[dict[str, Any]]:
    from capsule_batch.run.measure import bench_e2e

    if not ctx.recording.exists():
        raise RuntimeError(f"{ctx.recording}: no recording (the synth part makes it)")
    eng = ctx.as_run_engine()
    try:
        for source in ctx.sources():
            for k, inflight in enumerate(int(x) for x in ctx.args.e2e_inflight.split(",")):
                ctx.check_time(need=45 if k == 0 else 20)
                # the first run is `run` as it is; the others measure the stream alone (no thumbnail pass)
                thumbs = None if k == 0 else 0
                try:
                    r = bench_e2e(ctx.recording, ctx.bundle, eng, source=source, batch_size=ctx.batch_size(),
                                  workdir=ctx.workdir / f"e2e-{source}", inflight=inflight, max_thumbs=thumbs)
                except Exception as e:
                    r = {"error": f"{type(e).__name__}: {e}"[:300], "inflight": inflight}
                yield {"source": source, "mode": "as-run", "batch_size": ctx.batch_size(), "engine": ctx.as_run, **r}
    finally:
        eng.close()


def part_decode(ctx: Context) -> Iterator[dict[str, Any]]:
    import torch

    from capsule_batch.run.measure import bench_decode

    if not ctx.recording.exists():
        raise RuntimeError(f"{ctx.recording}: no recording (the synth part makes it)")
    dtype = torch.float16 if ctx.device.type == "cuda" else None
    for source in ctx.sources():
        ctx.check_time(need=10)
        try:
            r, _ = bench_decode(ctx.recording, ctx.bundle, source=source, batch_size=ctx.batch_size(),
                                device=ctx.device, dtype=dtype)
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {e}"[:300]}
        yield {"source": source, **r}


def part_nvc(ctx: Context) -> Iterator[dict[str, Any]]:
    """PyNvVideoCodec (NVDEC, RGB out, on the GPU) + the bundle's preprocessing in fp16: the GPU decoder to use
    should DALI not install. Also how its RGB differs from PyAV's on the first frames (colour conversion)."""
    try:
        import PyNvVideoCodec as nvc  # noqa: N813
    except Exception as e:  # ImportError, or RuntimeError: its __init__ loads libnvidia-encode.so.1
        yield {"skipped": f"PyNvVideoCodec: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        return
    if ctx.device.type != "cuda":
        yield {"skipped": "PyNvVideoCodec decodes on a CUDA GPU only"}
        return
    rec = ctx.recording
    if not rec.exists():
        from capsule_batch.sources.synthesize import synthesize

        rec = ctx.workdir / f"nvc_h264_{ctx.args.nvc_frames}_336.mp4"
        if not rec.exists():
            synthesize(rec, ctx.args.nvc_frames, size=336, seed=0, workers=os.cpu_count() or 1)
    yield {"source": "pynvvideocodec", **nvc_decode(nvc, rec, ctx.bundle, ctx.batch_size(), ctx.device)}


def nvc_decode(nvc: Any, rec: Path, bundle: Any, batch: int, device: Any) -> dict[str, Any]:
    import torch

    from capsule_batch.devices import side_stream
    from capsule_batch.model.preprocess import preprocess_batch

    dec = nvc.SimpleDecoder(str(rec), gpu_id=device.index or 0, use_device_memory=True,
                            output_color_type=nvc.OutputColorType.RGB)
    first = None
    n, t0 = 0, time.perf_counter()
    stream = side_stream(device)
    while True:
        frames = dec.get_batch_frames(batch)
        if not frames:
            break
        with torch.cuda.stream(stream):
            x = torch.stack([torch.from_dlpack(f) for f in frames])  # (B, H, W, 3) uint8 on the GPU
            if first is None:
                first = x[:16].cpu().numpy()
            preprocess_batch(x, bundle.preprocess, torch.float16, device)
        n += len(frames)
    torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    out = {"frames": n, "seconds": round(dt, 2), "frames_per_s": round(n / dt, 1), "batch_size": batch,
           "version": getattr(nvc, "__version__", "?"), "note": "measured only; not a run source"}
    if first is not None and importlib.util.find_spec("av") is not None:
        import av

        with av.open(str(rec)) as c:
            ref = [f.to_ndarray(format="rgb24") for f in itertools.islice(c.decode(video=0), len(first))]
        diff = np.abs(first.astype(np.int16) - np.stack(ref).astype(np.int16))
        out.update(rgb_vs_pyav_mean_abs=round(float(diff.mean()), 3), rgb_vs_pyav_max_abs=int(diff.max()))
    return out


PARTS: dict[str, Callable[[Context], Iterator[dict[str, Any]]]] = {
    "env": part_env, "probe": part_probe, "engine": part_engine, "synth": part_synth, "check": part_check,
    "e2e": part_e2e, "decode": part_decode, "nvc": part_nvc}


# ------------------------------------------------------------------------------------------------------------
# the table


def _what(ln: dict[str, Any]) -> str:
    parts = [str(ln[k]) for k in ("source", "precision", "mode", "batch_size") if k in ln]
    eng = ln.get("engine")
    if ln.get("mode") == "as-run" and isinstance(eng, dict):
        parts.append(f"({eng.get('backend')} {eng.get('precision')}{' graphs' if eng.get('cuda_graphs') else ''})")
    if "inflight" in ln:
        parts.append(f"inflight {ln['inflight']}")
    return " ".join(parts)


def table_row(ln: dict[str, Any]) -> str:
    from capsule_batch.run.pipeline import time_split

    part, what = ln.get("part", "?"), _what(ln)
    if "error" in ln:
        return f"{part:<7} {what:<42} ERROR {str(ln['error'])[:100]}"
    if "skipped" in ln or "stopped" in ln:
        kind = "SKIPPED" if "skipped" in ln else "STOPPED"
        return f"{part:<7} {what:<42} {kind} {ln.get('skipped') or ln['stopped']}"
    if part == "env":
        gpu = ln.get("gpu") or {}
        return (f"env     {gpu.get('name') or ln.get('device_name')}  driver/smi: {ln.get('nvidia_smi') or '-'}  "
                f"torch {ln.get('versions', {}).get('torch')} CUDA {ln.get('torch_cuda')}  {ln.get('utc')}")
    if part == "probe":
        if "library" in ln:
            return f"probe   {ln['library']:<42} {'ok' if ln['loaded'] else 'missing: ' + str(ln['why'])[:80]}"
        return (f"probe   import {ln['module']:<35} "
                + (f"ok {ln.get('version') or ''}" if ln["imported"] else f"no: {str(ln['why'])[:80]}"))
    if part == "verdict":
        ok = "run's auto choice is the best measured" if ln["as_run_is_best"] else "run's auto choice is NOT the best"
        return (f"verdict {ok}: as-run {ln['as_run']['frames_per_s']:,.0f} f/s vs best {ln['best']['precision']} "
                f"{ln['best']['mode']} {ln['best']['batch_size']} {ln['best']['frames_per_s']:,.0f} f/s "
                f"({ln['as_run_vs_best']:.2f})")
    if "top1_agreement" in ln:
        return (f"{part:<7} {what:<42} top-1 {ln['top1_agreement']:.4f}  max|dp| {ln['max_abs_dp']:.4f}  "
                f"{'PASS' if ln['pass'] else 'FAIL'}")
    if "frames_per_s" in ln:
        extra = f"  {ln['tflop_per_s']:.1f} TFLOP/s" if "tflop_per_s" in ln else ""
        if ln.get("stream_frames_per_s"):
            extra += f"  stream {ln['stream_frames_per_s']:,.0f} f/s, finish {ln['finish_s']:.1f} s"
        if ln.get("stage_seconds") and ln.get("stream_s"):
            extra += "  (" + time_split(ln["stage_seconds"], ln["stream_s"]) + ")"
        if "rgb_vs_pyav_max_abs" in ln:
            extra += f"  RGB vs PyAV max {ln['rgb_vs_pyav_max_abs']}"
        return f"{part:<7} {what:<42} {ln['frames_per_s']:>10,.0f} frames/s{extra}"
    if part == "synth" and "frames" in ln:
        return f"synth   {ln['frames']} frames in {ln['seconds']} s"
    return ""


def table(lines: list[dict[str, Any]]) -> str:
    rows = [r for r in (table_row(ln) for ln in lines) if r]
    return "\n".join(["=" * 100, "GPU suite", *rows, "=" * 100])


def last_run(path: Path) -> list[dict[str, Any]]:
    lines = [json.loads(t) for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
    last = lines[-1]["run_id"] if lines else None
    return [ln for ln in lines if ln.get("run_id") == last]


# ------------------------------------------------------------------------------------------------------------


def _watchdog(suite: Suite, hard_deadline: float, grace: float) -> None:
    """At the hard deadline a part is stuck (a call that Python cannot interrupt): say so, print the table, end."""
    while time.monotonic() < hard_deadline:
        time.sleep(0.5)
    suite.emit({"stopped": f"still running {grace:g} s after --time-limit: the suite ends here"})
    suite.print_table()
    logging.shutdown()
    os._exit(3)


def run_parts(ctx: Context, suite: Suite, names: list[str], fail: str | None) -> int:
    """Each part in turn, guarded. Returns the exit code: 0, 1 when a part raised, 2 when --time-limit stopped one."""
    fail_part, _, how = (fail or "").partition(":")
    ok, out_of_time = True, False
    for name in names:
        suite.part, suite.part_started = name, time.monotonic()
        if out_of_time:
            suite.emit({"skipped": "time limit reached before this part"})
            continue
        _logger.info("part %s", name)
        try:
            if name == fail_part:  # --fail-part: how tests prove the guards
                while how == "hang":
                    time.sleep(1)
                if how != "slow":
                    raise RuntimeError(f"--fail-part {name}")
            ctx.step_delay = 0.5 if (name == fail_part and how == "slow") else 0.0
            ctx.check_time()
            for ln in PARTS[name](ctx):
                suite.emit(ln)
        except OutOfTime as e:
            suite.emit({"stopped": str(e)})
            out_of_time = True
        except Exception as e:  # a part that raises is a finding; the next part runs
            ok = False
            _logger.error("part %s failed:\n%s", name, traceback.format_exc())
            suite.emit({"error": f"{type(e).__name__}: {e}"[:300]})
    suite.part, suite.part_started = "verdict", time.monotonic()  # last: the parity check is known by now
    v = verdict(suite.lines, ctx.checked)
    if v is not None:
        suite.emit(v)
    return 1 if not ok else 2 if out_of_time else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=DEFAULT_PARTS, help=f"comma-separated, or `all` ({ALL_PARTS})")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="auto", help="backend of the as-run engine, check and e2e (as run --engine)")
    ap.add_argument("--arch", default="eva02_base_patch14_224")
    ap.add_argument("--model-args", default="{}", help="JSON: timm arguments of the random bundle (dry runs)")
    ap.add_argument("--bundle", type=Path, default=None, help="default: a seeded random bundle of --arch")
    ap.add_argument("--frames", type=int, default=30_000, help="frames of the e2e/decode recording")
    ap.add_argument("--check-frames", type=int, default=2048)
    ap.add_argument("--sample", type=int, default=512, help="frames compared with the CPU fp32 reference")
    ap.add_argument("--check-precisions", default="fp32,fp16,bf16")
    ap.add_argument("--precisions", default="fp16,bf16", help="engine grid")
    ap.add_argument("--modes", default="eager,graphs", help=f"engine grid: {', '.join(MODES)}")
    ap.add_argument("--batch-sizes", default="256", help="engine grid")
    ap.add_argument("--e2e-batch", type=int, default=None, help="batch of as-run, check, e2e (default: run's auto)")
    ap.add_argument("--e2e-inflight", default="2,1", help="one e2e run each; the first is run's default")
    ap.add_argument("--nvc-frames", type=int, default=5000, help="nvc's recording when the synth one is not there")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--time-limit", type=float, default=None, help="seconds; stop between configurations after it")
    ap.add_argument("--grace", type=float, default=15.0, help="seconds after --time-limit before the watchdog ends")
    ap.add_argument("--workdir", type=Path, default=Path("runs/gpu"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_suite.jsonl")
    ap.add_argument("--log", type=Path, default=None, help="default: gpu_suite.log beside --out")
    ap.add_argument("--table", type=Path, default=None, help="print the table of the last run in this file, only")
    ap.add_argument("--fail-part", default=None,
                    help="PART, PART:hang or PART:slow: make a part raise, hang, or take 0.5 s a step (tests)")
    args = ap.parse_args(argv)
    if args.table is not None:
        print(table(last_run(args.table)))
        return 0
    started = time.monotonic()
    deadline = started + args.time_limit if args.time_limit else None
    log = args.log or args.out.with_name("gpu_suite.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr), logging.FileHandler(log, encoding="utf-8")])
    names = ALL_PARTS.split(",") if args.parts == "all" else args.parts.split(",")
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        ap.error(f"unknown parts {unknown} (choose from {', '.join(PARTS)})")
    args.workdir.mkdir(parents=True, exist_ok=True)
    suite = Suite(args.out, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), started)
    if deadline is not None:
        threading.Thread(target=_watchdog, args=(suite, deadline + args.grace, args.grace), daemon=True,
                         name="gpu-suite-watchdog").start()
    rc = 1
    try:
        suite.part = "setup"
        ctx = Context(args, deadline)
        suite.common = {"arch": args.arch if args.bundle is None else str(args.bundle), "device": str(ctx.device)}
        rc = run_parts(ctx, suite, names, args.fail_part)
    except Exception as e:  # the device cannot even be resolved: still a line and a table
        _logger.error("setup failed:\n%s", traceback.format_exc())
        suite.emit({"error": f"{type(e).__name__}: {e}"[:300]})
    finally:
        suite.print_table()
        suite.close()
    return rc


if __name__ == "__main__":
    sys.exit(main())
