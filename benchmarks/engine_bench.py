"""Engine-only throughput: frames/s per backend, precision and batch, one JSON line per configuration.

    python benchmarks/engine_bench.py --arch eva02_tiny_patch14_224 --backend torch,onnxruntime \
        --precision fp32,bf16 --batch 8,32 [--device cpu|cuda] [--bundle DIR] [--out FILE.jsonl]

Without --bundle a randomly initialised bundle of the architecture is made once under runs/bench-bundles/
(engine speed does not depend on the weights' values). Inputs are random normal pixels (never zeros),
already on the device in the engine's dtype, so only the engine is timed. Each configuration gets warm-up
calls, then the median of --repeats timed calls (synchronised on CUDA). Combinations a backend cannot
run (onnxruntime bf16 on CPU) are skipped with a note on stderr. Logs go to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

_logger = logging.getLogger("engine_bench")


def bench_bundle(arch: str, root: Path, model_args: dict) -> object:
    from capsule_batch.model.bundle import ModelBundle, create_model, save_bundle
    from capsule_batch.model.classes import CE24_CLASSES
    from capsule_batch.model.preprocess import Preprocess

    path = root / arch
    if (path / "model.json").is_file():
        return ModelBundle.load(path)
    root.mkdir(parents=True, exist_ok=True)
    model = create_model(arch, len(CE24_CLASSES), model_args)
    size = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]) if hasattr(model, "pretrained_cfg") else 224
    return save_bundle(path, model.state_dict(), arch=arch, class_names=list(CE24_CLASSES),
                       preprocess=Preprocess(input_size=size, resize=size), model_args=model_args,
                       provenance={"source": "random init for benchmarks"})


def time_engine(engine: object, batch: int, warmup: int, repeats: int) -> list[float]:
    import torch

    size = engine.bundle.preprocess.input_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(engine.device, engine.dtype)
    cuda = engine.device.type == "cuda"
    for _ in range(warmup):
        engine.infer(x)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(engine.device)
        t0 = time.perf_counter()
        engine.infer(x)
        if cuda:
            torch.cuda.synchronize(engine.device)
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="eva02_tiny_patch14_224", help="timm architecture (comma list)")
    ap.add_argument("--bundle", type=Path, default=None, help="use this bundle instead of a random one")
    ap.add_argument("--backend", default="torch,onnxruntime", help="comma list: torch, onnxruntime, tensorrt")
    ap.add_argument("--precision", default="fp32,bf16", help="comma list: fp32, bf16, fp16")
    ap.add_argument("--batch", default="8,32", help="comma list of batch sizes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the torch backend")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--engine-dir", dest="engines", type=Path, default=None, help="engine store (default ./engines)")
    ap.add_argument("--bundles", type=Path, default=Path("runs/bench-bundles"))
    ap.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from capsule_batch import __version__
    from capsule_batch.backends import create_engine
    from capsule_batch.backends.engine_store import EngineStore
    from capsule_batch.errors import CapsuleError
    from capsule_batch.model.bundle import ModelBundle

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    store = EngineStore(args.engines)
    archs = [args.arch] if args.bundle else args.arch.split(",")
    for arch in archs:
        bundle = ModelBundle.load(args.bundle) if args.bundle else bench_bundle(arch, args.bundles, {})
        for backend in args.backend.split(","):
            for precision in args.precision.split(","):
                for batch in (int(b) for b in args.batch.split(",")):
                    kw: dict = {"store": store}
                    if backend == "torch" and args.compile:
                        kw["compile"] = True
                    if backend == "onnxruntime" and args.threads:
                        kw["threads"] = args.threads
                    try:
                        engine = create_engine(bundle, backend=backend, device=args.device, precision=precision,
                                               max_batch=batch, **kw)
                    except CapsuleError as e:
                        _logger.warning("skipped %s %s %s: %s", bundle.arch, backend, precision, e)
                        continue
                    times = time_engine(engine, batch, args.warmup, args.repeats)
                    med = statistics.median(times)
                    row = {"stage": "engine", "model": bundle.arch, **engine.describe(), "batch": batch,
                           "frames_per_s": round(batch / med, 2), "median_s": round(med, 5),
                           "min_s": round(min(times), 5), "repeats": args.repeats, "warmup": args.warmup,
                           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                           "loadavg_1m": round(os.getloadavg()[0], 2),
                           "gpu": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else None,
                           "host": platform.node(), "torch": torch.__version__, "capsule_batch": __version__,
                           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "command": command}
                    line = json.dumps(row, default=str)
                    print(line, flush=True)
                    if args.out:
                        args.out.parent.mkdir(parents=True, exist_ok=True)
                        with open(args.out, "a", encoding="utf-8") as f:
                            f.write(line + "\n")
                    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
