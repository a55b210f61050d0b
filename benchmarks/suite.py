"""Benchmark suite: sources x backends x precisions x batch sizes, plus the seed-style baseline, in one run.

For each architecture it makes one synthetic 336x336 H.264 recording (or uses --recording), times the
seed's way of inferring on it (frames extracted to JPEG, loaded one at a time, eager fp32 — see
seed_baseline.py), then every configuration's decode / engine / e2e stages through capsule_batch.run.measure.
Each e2e line carries its speed-up over the baseline and its parity with the baseline's probabilities
(top-1 agreement, max |dp|), so a speed-up is never bought with accuracy unseen. On a CPU, decoding and the engine
share the cores, so end to end cannot beat `decode_share_bound` = 1 / (1 + engine_fps / decode_fps) of engine-only;
each e2e line carries that bound and `e2e_over_bound` (e2e / engine / bound: 1.0 means nothing lost to the overlap).

    python benchmarks/suite.py --arch eva02_tiny_patch14_224 --backends torch,onnxruntime \
        --precisions fp32,bf16 --batch-sizes 32 --frames 512 --tag cpu --out benchmarks/results/suite_cpu.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_baseline import run_seed_baseline  # noqa: E402

_logger = logging.getLogger("suite")


def random_bundle(arch: str, model_args: dict[str, Any], root: Path) -> Any:
    """A random-weight bundle (seeded) for speed measurements; real weights do not change the speed."""
    import torch

    from capsule_batch.model.bundle import ModelBundle, create_model, default_preprocess, save_bundle
    from capsule_batch.model.classes import CE24_CLASSES

    path = root / f"{arch}-{hashlib.sha256(json.dumps(model_args, sort_keys=True).encode()).hexdigest()[:8]}"
    if (path / "model.json").is_file():
        return ModelBundle.load(path)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = create_model(arch, len(CE24_CLASSES), model_args)
    with torch.no_grad():  # spread the logits so that top-1 agreement is a meaningful parity check
        model.head.weight.normal_(0, 0.5)
    return save_bundle(path, model.state_dict(), arch=arch, class_names=list(CE24_CLASSES),
                       preprocess=default_preprocess(arch, model_args, "imagenet"), model_args=model_args,
                       provenance={"source": "random init for benchmarks"})


def parity(probs: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    n = min(len(probs), len(ref))
    return {"frames": n, "top1_agreement": float((probs[:n].argmax(1) == ref[:n].argmax(1)).mean()),
            "max_abs_dp": float(np.abs(probs[:n] - ref[:n]).max())}


def run_suite(args: argparse.Namespace) -> list[dict[str, Any]]:
    from capsule_batch.devices import resolve_device
    from capsule_batch.model.bundle import ModelBundle
    from capsule_batch.run.measure import run_benchmarks, synthetic_recording
    from capsule_batch.study.store import StudyReader

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    lines: list[dict[str, Any]] = []
    for arch in args.arch.split(","):
        bundle = (ModelBundle.load(args.bundle) if args.bundle
                  else random_bundle(arch, json.loads(args.model_args), work / "bundles"))
        rec = Path(args.recording) if args.recording else synthetic_recording(work, args.frames)
        ref, base = None, None
        if args.baseline:
            base, ref = run_seed_baseline(rec, bundle.path, batch_size=32, workdir=work)
            base["suite_tag"] = args.tag
            lines.append(base)
            _logger.info("%s seed-style baseline: %.2f frames/s (extraction included)", arch, base["frames_per_s"])
        pairs = ([c.split("/") for c in args.configs.split(",")] if args.configs
                 else [list(p) for p in itertools.product(args.backends.split(","), args.precisions.split(","))])
        e2e_lines = []
        for source, (backend, precision, *flags), batch in itertools.product(
                args.sources.split(","), pairs, [int(b) for b in args.batch_sizes.split(",")]):
            # `torch/fp32/compiled`, `torch/bf16/compiled`: the AOTInductor package (bf16 with the model cast)
            extra = {"compile": True, "cast": precision != "fp32"} if "compiled" in flags else {}
            try:
                # the CPU choice behind `auto` is stored in the suite's own engine store, measured once per bundle
                results = run_benchmarks(bundle, rec, backend=backend, source=source, device=device,
                                         precision=precision, batch_size=batch, frames=args.frames,
                                         warmup=args.warmup, repeats=args.repeats, workdir=work,
                                         engine_kwargs={"store": work / "engines", **extra})
            except Exception as e:  # a combination this machine cannot run is noted and skipped
                _logger.warning("skipped %s/%s/%s/b%d: %s", source, backend, precision, batch, e)
                continue
            engine_fps = next((r["frames_per_s"] for r in results if r["stage"] == "engine"), None)
            decode_fps = next((r["frames_per_s"] for r in results if r["stage"] == "decode"), None)
            for r in results:
                r["suite_tag"] = args.tag
                r["asked"] = "/".join([backend, precision, *flags])
                if r["stage"] == "e2e":
                    e2e_lines.append(r)
                    if engine_fps:
                        r["e2e_over_engine"] = round(r["frames_per_s"] / engine_fps, 3)
                        if decode_fps:
                            bound = 1.0 / (1.0 + engine_fps / decode_fps)
                            r["decode_share_bound"] = round(bound, 3)
                            r["e2e_over_bound"] = round(r["frames_per_s"] / engine_fps / bound, 3)
                    if base is not None:
                        with StudyReader(work / "e2e" / (rec.stem + ".h5")) as study:
                            r["parity_vs_seed"] = parity(study.probs(), ref)
                        r["speedup_vs_seed"] = round(r["frames_per_s"] / base["frames_per_s"], 3)
                lines.append(r)
                _logger.info("%s %s/%s/%s/b%d %s: %.2f frames/s", arch, source, backend, precision, batch,
                             r["stage"], r["frames_per_s"])
        v = verdict(arch, e2e_lines, base)
        if v:
            v["suite_tag"] = args.tag
            lines.append(v)
            _logger.info("%s verdict: %s", arch, v["summary"])
    return lines


def verdict(arch: str, e2e: list[dict[str, Any]], base: dict[str, Any] | None) -> dict[str, Any] | None:
    """How `auto` compares with the fastest configuration measured in this run (and with the seed-style baseline)."""
    autos = [r for r in e2e if "auto" in r["asked"]]
    if not autos or len(e2e) < 2:
        return None
    fastest = max(e2e, key=lambda r: r["frames_per_s"])
    auto = max(autos, key=lambda r: r["frames_per_s"])
    chosen = (auto["config"].get("choice") or {}).get("label", f"{auto['config']['backend']} "
                                                             f"{auto['config']['precision']}")
    out = {"stage": "verdict", "arch": arch, "auto_asked": auto["asked"], "auto_chose": chosen,
           "auto_e2e_frames_per_s": auto["frames_per_s"], "fastest_asked": fastest["asked"],
           "fastest_e2e_frames_per_s": fastest["frames_per_s"],
           "auto_over_fastest": round(auto["frames_per_s"] / fastest["frames_per_s"], 3),
           "auto_e2e_over_engine": auto.get("e2e_over_engine"), "auto_e2e_over_bound": auto.get("e2e_over_bound"),
           "cpu": auto["config"].get("cpu")}
    if base is not None:
        out["auto_over_seed"] = round(auto["frames_per_s"] / base["frames_per_s"], 3)
    out["summary"] = (f"auto ({chosen}) {auto['frames_per_s']:.2f} frames/s e2e = {out['auto_over_fastest']:.2f}x the "
                      f"fastest measured ({fastest['asked']} {fastest['frames_per_s']:.2f})"
                      + (f", {out['auto_over_seed']:.2f}x the seed-style baseline" if base is not None else ""))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="eva02_tiny_patch14_224", help="comma list of timm architectures")
    ap.add_argument("--model-args", default="{}", help="JSON timm constructor arguments for random bundles")
    ap.add_argument("--bundle", type=Path, default=None, help="use this bundle instead of random ones")
    ap.add_argument("--recording", default=None, help="default: a synthetic 336x336 H.264 recording")
    ap.add_argument("--sources", default="auto")
    ap.add_argument("--backends", default="torch")
    ap.add_argument("--precisions", default="fp32")
    ap.add_argument("--configs", default=None,
                    help="backend/precision pairs instead of --backends x --precisions, e.g. auto/auto,torch/fp32; "
                         "torch/fp32/compiled: the AOTInductor package")
    ap.add_argument("--batch-sizes", default="32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--frames", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-baseline", dest="baseline", action="store_false")
    ap.add_argument("--tag", default="run", help="label stored in every line")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench"))
    ap.add_argument("--out", type=Path, default=None, help="append the JSON lines to this .jsonl file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    lines = run_suite(args)
    command = " ".join(["python", *sys.argv])
    for line in lines:
        line.setdefault("command", command)
        print(json.dumps(line, default=str))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as fh:
            for line in lines:
                fh.write(json.dumps(line, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
