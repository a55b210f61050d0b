"""Probe CPU candidates that the measured CPU choice does not have yet, before building them into it.

Candidates, each against torch fp32 eager on the same frames, at one batch size, configurations interleaved, best of
`--repeats`, one process, the machine's cores:
- `int8-dynamic`: the model's Linear layers (all but EVA's fused qkv, which timm's attention reads as a weight)
  quantised to int8 weights with activations quantised per call (torch.ao's dynamic quantisation; x86/fbgemm
  kernels, AVX2 or better; no calibration set needed);
- `fp32-compiled`: `torch.compile` with inductor's freezing (`--compile`; its compile time is reported apart);
- `fp32-aoti` and `bf16-cast-aoti` (`--aot`): the model compiled ahead of time as the CPU choice's `compiled`
  candidates are (the product's `capsule_batch.backends.compiled.compile_package`: inductor with freezing, an
  AOTInductor package with a dynamic batch), then loaded; compile time as setup;
- `bf16-cast`: the model cast to bf16 (what `auto` picks where bf16 is native; emulated, slow, on AVX2-only CPUs);
- `ort-fp32` and `ort-int8-static` (`--ort`): the project's ONNX export in onnxruntime, and the same export quantised
  after training (onnxruntime's static QDQ quantisation: int8 weights per channel, uint8 activations with ranges
  calibrated (MinMax) on `--calibration-frames` capsule-like synthetic frames; MatMul and Gemm, the products that
  hold ~all of the FLOPs; the product's own `capsule_batch.backends.int8.quantize`); its time is reported as setup;
- `pt2e-int8-static` (`--pt2e`, needs torchao): torch's PT2E path: `torch.export`, torchao's X86InductorQuantizer
  (static, int8 weights per channel, uint8 activations), calibrated on the same synthetic frames, then
  `torch.compile` with inductor's freezing (oneDNN int8 kernels); export + calibration + compile time as setup.
Parity on real capsule frames (../shared/data/real beside the checkout: Kvasir-Capsule-SEG and WCEBleedGen frames,
the seed's preprocessing): top-1 agreement with fp32 and max |dp|. The models have random weights (no trained EVA-02
is reachable from these machines): agreement then measures the candidate's noise against a random model's logit
margins, a weaker test than a trained model's; the head is spread (as the tests' tiny bundle) so frames differ.

    python benchmarks/cpu_candidates_probe.py --arch eva02_base_patch14_224 --batch 16 --repeats 3 \
        --out benchmarks/results/cpu_candidates.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REAL = REPO.parent / "shared" / "data" / "real"


def real_frames(size: int, limit: int) -> Any:
    """Up to `limit` real capsule frames, preprocessed as the seed did (whole-frame bicubic, ImageNet stats)."""
    import torch
    from PIL import Image

    from capsule_batch.model.preprocess import reference_preprocess, seed_preprocess

    files = sorted((REAL / "kvasir_capsule_seg" / "images").glob("*.jpg")) + sorted(
        p for d in ("val", "test1", "test2") for p in (REAL / "wcebleedgen" / d).glob("*.png"))
    if not files:
        raise SystemExit(f"no real frames under {REAL} (this probe needs ../shared/data beside the checkout)")
    pre = seed_preprocess(size)
    x = np.stack([reference_preprocess(Image.open(p).convert("RGB"), pre) for p in files[:limit]])
    return torch.from_numpy(x), len(files[:limit])


def synthetic_frames(size: int, n: int) -> Any:
    """`n` capsule-like synthetic frames (another domain than the real frames parity is measured on), preprocessed
    as `real_frames` are: what the int8 ranges are calibrated on."""
    import torch

    from capsule_batch.model.preprocess import preprocess_batch, seed_preprocess
    from capsule_batch.sources.synthesize import Scene

    scene = Scene(max(size, 64), n * 8, seed=1, fps=2.0, findings_per_1000=40.0)
    frames = np.stack([scene.render(i * 8 + 4) for i in range(n)])
    return preprocess_batch(torch.from_numpy(frames), seed_preprocess(size))


def build(arch: str, model_args: dict[str, Any]) -> Any:
    import torch

    from capsule_batch.model.bundle import create_model

    torch.manual_seed(0)
    model = create_model(arch, 10, model_args).eval()
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.3)
        model.head.bias.normal_(0.0, 0.5)
    return model


def candidates(model: Any, compile_: bool, bf16: bool, aot: bool, size: int, workdir: Path,
               ) -> tuple[dict[str, Any], dict[str, float]]:
    import torch
    from torch.ao.quantization import quantize_dynamic

    out: dict[str, Any] = {"fp32": model}
    setup: dict[str, float] = {}
    t = time.perf_counter()
    # every Linear but timm EVA's fused `qkv`, whose weight its attention reads directly (F.linear with a separate
    # q/v bias), so a quantised module there breaks the forward: those products stay fp32
    from torch.ao.quantization import default_dynamic_qconfig

    spec = {name: default_dynamic_qconfig for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.endswith(".qkv")}
    out["int8-dynamic"] = quantize_dynamic(copy.deepcopy(model), spec, dtype=torch.qint8)
    setup["int8-dynamic"] = time.perf_counter() - t
    if bf16:
        bmodel = copy.deepcopy(model).to(torch.bfloat16)
        out["bf16-cast"] = lambda x: bmodel(x.to(torch.bfloat16)).float()
    if compile_:
        import torch._inductor.config as inductor

        inductor.freezing = True
        out["fp32-compiled"] = torch.compile(copy.deepcopy(model))
    if aot:
        from capsule_batch.backends.compiled import compile_package, load_package

        workdir.mkdir(parents=True, exist_ok=True)
        for name, dtype in (("fp32-aoti", torch.float32), ("bf16-cast-aoti", torch.bfloat16))[:2 if bf16 else 1]:
            setup[name] = compile_package(copy.deepcopy(model).to(dtype), size, dtype, workdir / f"{name}.pt2")
            package = load_package(workdir / f"{name}.pt2")
            out[name] = (lambda p, d: lambda x: p(x.to(d)).float())(package, dtype)
    return out, setup


def ort_candidates(model: Any, arch: str, model_args: dict[str, Any], size: int, calibration: Any,
                   workdir: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """onnxruntime fp32 and static int8 of the same ONNX export, quantised as `--precision int8` does
    (capsule_batch.backends.int8.quantize)."""
    import onnxruntime as ort
    import torch

    from capsule_batch.backends.int8 import quantize
    from capsule_batch.backends.onnx_export import INPUT_NAME, export_onnx
    from capsule_batch.model.bundle import ModelBundle, save_bundle
    from capsule_batch.model.classes import CE24_CLASSES
    from capsule_batch.model.preprocess import seed_preprocess

    workdir.mkdir(parents=True, exist_ok=True)
    save_bundle(workdir / "bundle", {k: v.contiguous() for k, v in model.state_dict().items()}, arch=arch,
                class_names=list(CE24_CLASSES), preprocess=seed_preprocess(size), model_args=model_args,
                overwrite=True)
    fp32_path = export_onnx(ModelBundle.load(workdir / "bundle"), workdir / "fp32.onnx", model=model)
    t = time.perf_counter()
    int8_path = workdir / "int8.onnx"
    quantize(fp32_path, int8_path, calibration)
    setup = {"ort-int8-static": time.perf_counter() - t}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()

    def runner(path: Path) -> Any:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(sess.run(None, {INPUT_NAME: x.numpy()})[0])

    out = {"ort-fp32": runner(fp32_path), "ort-int8-static": runner(int8_path)}
    return out, setup


def pt2e_candidate(model: Any, calibration: Any, batch: int) -> tuple[Any, float]:
    """torchao PT2E static int8 for x86 inductor, compiled (see the module docstring); (callable, setup seconds)."""
    import torch
    import torch._inductor.config as inductor
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    t = time.perf_counter()
    example = calibration[:batch]
    exported = torch.export.export(copy.deepcopy(model).eval(), (example,)).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for i in range(0, len(calibration) - batch + 1, batch):
            prepared(calibration[i:i + batch])
    converted = convert_pt2e(prepared)
    inductor.freezing = True
    compiled = torch.compile(converted)
    with torch.no_grad():
        compiled(example)
    return compiled, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="eva02_base_patch14_224")
    ap.add_argument("--model-args", default="{}")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parity-frames", type=int, default=64)
    ap.add_argument("--compile", action="store_true", help="also torch.compile fp32 (inductor, freezing)")
    ap.add_argument("--aot", action="store_true", help="also the AOTInductor packages (fp32, and bf16 cast unless "
                    "--no-bf16) that the CPU choice's compiled candidates use")
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--no-dynamic", action="store_true", help="leave out int8-dynamic")
    ap.add_argument("--ort", action="store_true", help="also onnxruntime fp32 and static int8 (QDQ)")
    ap.add_argument("--pt2e", action="store_true", help="also torchao PT2E static int8, compiled")
    ap.add_argument("--calibration-frames", type=int, default=64, help="synthetic frames that calibrate int8-static")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cpu_candidates_probe"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from capsule_batch.backends.cpu_choice import cpu_info

    frames, n = real_frames(args.size, args.parity_frames)
    model = build(args.arch, json.loads(args.model_args))
    cands, setup = candidates(model, args.compile, not args.no_bf16, args.aot, args.size, args.workdir)
    if args.no_dynamic:
        cands.pop("int8-dynamic")
    if args.ort:
        more, more_setup = ort_candidates(model, args.arch, json.loads(args.model_args), args.size,
                                          synthetic_frames(args.size, args.calibration_frames), args.workdir)
        cands.update(more)
        setup.update(more_setup)
    if args.pt2e:
        cands["pt2e-int8-static"], setup["pt2e-int8-static"] = pt2e_candidate(
            model, synthetic_frames(args.size, args.calibration_frames), args.batch)
    batch = frames[: args.batch] if len(frames) >= args.batch else frames.repeat(args.batch // len(frames) + 1, 1, 1,
                                                                                1, 1)[: args.batch]
    best = {k: float("inf") for k in cands}
    with torch.inference_mode():
        for name, fn in cands.items():  # warm-up (compiles the compiled one, timed apart)
            t = time.perf_counter()
            fn(batch)
            if name == "fp32-compiled":
                setup[name] = time.perf_counter() - t
        for _ in range(args.repeats):
            for name, fn in cands.items():
                t = time.perf_counter()
                fn(batch)
                best[name] = min(best[name], time.perf_counter() - t)
        probs = {name: torch.cat([torch.softmax(fn(frames[i:i + args.batch]).float(), 1)
                                  for i in range(0, len(frames), args.batch)]) for name, fn in cands.items()}
    cpu = cpu_info()
    ref = probs["fp32"]
    lines = []
    for name in cands:
        fps = args.batch / best[name]
        lines.append({"candidate": name, "arch": args.arch, "model_args": json.loads(args.model_args),
                      "batch": args.batch, "frames_per_s": round(fps, 3),
                      "vs_fp32": round(fps / (args.batch / best["fp32"]), 3),
                      "top1_agreement": round(float((probs[name].argmax(1) == ref.argmax(1)).float().mean()), 4),
                      "max_abs_dp": round(float((probs[name] - ref).abs().max()), 5), "parity_frames": n,
                      "setup_s": round(setup.get(name, 0.0), 2), "threads": torch.get_num_threads(), "cpu": cpu,
                      "torch": torch.__version__, "repeats": args.repeats})
    print(f"{args.arch} batch {args.batch}, {torch.get_num_threads()} threads, {cpu['model']} "
          f"({' '.join(cpu['flags']) or 'no recorded flags'}); parity on {n} real frames (random weights)")
    print(f"{'candidate':<16}{'frames/s':>10}{'vs fp32':>9}{'top-1 agree':>13}{'max|dp|':>10}{'setup s':>9}")
    for ln in lines:
        print(f"{ln['candidate']:<16}{ln['frames_per_s']:>10.2f}{ln['vs_fp32']:>8.2f}x{ln['top1_agreement']:>13.4f}"
              f"{ln['max_abs_dp']:>10.4f}{ln['setup_s']:>9.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as f:
            for ln in lines:
                f.write(json.dumps(ln) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
