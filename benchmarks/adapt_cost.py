"""Cost per frame of `python -m train adapt`: FLOPs counted for one training step, and frames/s measured.

    python benchmarks/adapt_cost.py --arch eva02_base_patch14_224 --batch 8 \
        --out benchmarks/results/adapt_cost_cpu.jsonl
    python benchmarks/adapt_cost.py --arch eva02_tiny_patch14_224 \
        --model-args '{"depth": 3, "img_size": 64, "patch_size": 8}' --batch 32 \
        --out benchmarks/results/adapt_cost_cpu.jsonl

One step is what the stage does per batch (`train.adapt.train_step`): the frozen teacher's forward on the whole
frames, the student's forward with 40 % of the patches block-masked, its backward, the optimizer update.
FLOPs (2 x multiply-accumulates) are counted by torch's FlopCounterMode on one frame with timm's fused attention
switched off, so that the attention products are counted as the matrix products they are (the counter does not
know the CPU's fused attention kernel). The line also carries the classifier's plain forward for comparison and
the frames/s those FLOPs imply on an H100/H200 (989 TFLOP/s dense bf16) at 40 % and 60 % of it. frames/s is
measured on this machine: --warmup untimed steps, then the median of --repeats timed steps on real synthetic
frames (synchronised on CUDA); decoding is not included (the stage reads frames ahead in a thread). One JSON
line per run on stdout (and appended to --out).
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
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP waiters slow a shared CPU down many times

_logger = logging.getLogger("adapt_cost")
PEAK_TFLOPS = 989.0  # H100 SXM / H200 dense FP16/BF16, datasheet


def _models(arch: str, model_args: dict[str, Any], fused: bool) -> tuple[Any, Any, Any]:
    import timm.layers
    import torch

    from capsule_batch.model.bundle import create_model
    from train.mim import freeze_off_path, make_student, make_teacher

    timm.layers.set_fused_attn(fused)
    torch.manual_seed(0)
    model = create_model(arch, 10, model_args)
    teacher = make_teacher(model)
    student = make_student(model)
    size = int(model.patch_embed.img_size[0])
    freeze_off_path(student, size)
    return model, teacher, student


def count_flops(arch: str, model_args: dict[str, Any], mask_ratio: float) -> dict[str, float]:
    """GFLOP per frame of the classifier's forward and of each part of an adapt step."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from train.mim import batch_masks, grid_size, mim_loss, teacher_targets

    model, teacher, student = _models(arch, model_args, fused=False)
    size = int(model.patch_embed.img_size[0])
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    mask = batch_masks(1, grid_size(model), mask_ratio, np.random.default_rng(0), 4)
    out: dict[str, float] = {}
    with torch.no_grad(), FlopCounterMode(display=False) as c:
        model.eval()(x)
    out["classifier_forward"] = c.get_total_flops() / 1e9
    with FlopCounterMode(display=False) as c:
        targets = teacher_targets(teacher, x)
    out["teacher_forward"] = c.get_total_flops() / 1e9
    with FlopCounterMode(display=False) as c:
        loss = mim_loss(student(x, mask), targets, mask)
    out["student_forward"] = c.get_total_flops() / 1e9
    with FlopCounterMode(display=False) as c:
        loss.backward()
    out["student_backward"] = c.get_total_flops() / 1e9
    out["step"] = out["teacher_forward"] + out["student_forward"] + out["student_backward"]
    return {k: round(v, 3) for k, v in out.items()}


def measure(arch: str, model_args: dict[str, Any], batch: int, device: Any, precision: str, warmup: int,
            repeats: int, mask_ratio: float) -> dict[str, Any]:
    """Median seconds of a real adapt step (fused attention as in training) on synthetic capsule frames."""
    import numpy as np
    import torch

    from capsule_batch.model.preprocess import Preprocess, preprocess_batch
    from capsule_batch.sources.synthesize import Scene
    from train.adapt import make_optimizer, train_step
    from train.config import load_config
    from train.mim import batch_masks, grid_size
    from train.trainer import _precision

    model, teacher, student = _models(arch, model_args, fused=True)
    size = int(model.patch_embed.img_size[0])
    teacher.to(device)
    student.to(device)
    scene = Scene(max(64, size), batch, 0, 4.0, 60.0)
    frames = torch.from_numpy(np.stack([scene.render(i) for i in range(batch)]))
    x = preprocess_batch(frames, Preprocess(input_size=size, resize=size), device=device)
    tc = load_config(Path(__file__).resolve().parent.parent / "train/configs/adapt.yaml")["train"]
    optimizer = make_optimizer(student, tc)
    dtype = _precision(precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    params = [p for p in student.parameters() if p.requires_grad]
    rng = np.random.default_rng(0)
    cuda = device.type == "cuda"
    times = []
    for i in range(warmup + repeats):
        mask = batch_masks(batch, grid_size(model), mask_ratio, rng, 4).to(device)
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train_step(student, teacher, optimizer, scaler, x, mask, params, 3.0, dtype)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"median_step_s": round(med, 4), "frames_per_s": round(batch / med, 2), "step_seconds": times,
            "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="eva02_tiny_patch14_224")
    ap.add_argument("--model-args", default="{}", help="timm constructor arguments as JSON")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16 | auto")
    ap.add_argument("--mask-ratio", type=float, default=0.4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-measure", action="store_true", help="count FLOPs only")
    ap.add_argument("--note", default="", help="free text kept in the line (e.g. how loaded the machine was)")
    ap.add_argument("--out", type=Path, default=None, help="also append the JSON line to this file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    import timm
    import torch
    import torchvision

    from capsule_batch.devices import resolve_device

    margs = json.loads(args.model_args)
    flops = count_flops(args.arch, margs, args.mask_ratio)
    line: dict[str, Any] = {
        "bench": "adapt_cost", "arch": args.arch, "model_args": margs, "mask_ratio": args.mask_ratio,
        "gflop_per_frame": flops, "step_over_forward": round(flops["step"] / flops["classifier_forward"], 3),
        "implied_frames_per_s_h100": {f"{u:.0%}": round(u * PEAK_TFLOPS * 1e3 / flops["step"])
                                      for u in (0.4, 0.6)},
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/adapt_cost.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "note": args.note,
    }
    if not args.no_measure:
        device = resolve_device(args.device)
        line.update(batch=args.batch, device=str(device), precision=args.precision,
                    cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count())
        line["measured"] = measure(args.arch, margs, args.batch, device, args.precision, args.warmup, args.repeats,
                                   args.mask_ratio)
        line["measured"]["tflop_per_s"] = round(flops["step"] * line["measured"]["frames_per_s"] / 1e3, 4)
    text = json.dumps(line)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
