"""Where a CPU frame's time goes: torch's profiler over EVA-02 inference, grouped into the model's parts.

Groups (by aten op, self CPU time): GEMMs (linear/addmm/mm/bmm/matmul: the projections, MLP, head, and attention's
products when they are not fused), fused attention (scaled_dot_product_attention and its kernels), softmax,
layer norms, RoPE and other element-wise arithmetic (mul/add/cat/neg/... on the token tensors), SwiGLU's SiLU,
copies and dtype conversions (copy_/to: contiguous copies, and what bf16 cast or autocast adds), layout
(view/permute/reshape/contiguous/clone) and the rest. One process, the machine's threads, after `--warmup` calls;
prints a table and appends one JSON line per precision to `--out`.

    python benchmarks/profile_cpu.py --arch eva02_base_patch14_224 --batch 16 --precisions fp32,bf16 \\
        --out benchmarks/results/profile_cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: (group, substrings of the op name after `aten::`); the first group that matches wins
GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("fused attention", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("GEMM", ("addmm", "mm", "bmm", "matmul", "linear", "baddbmm")),
    ("softmax", ("softmax",)),
    ("layer norm", ("layer_norm",)),
    ("SiLU (SwiGLU)", ("silu",)),
    ("copies / dtype conversion", ("_to_copy", "copy_", "to")),
]
#: exact op names (after `aten::`)
LAYOUT = {"view", "permute", "reshape", "contiguous", "clone", "transpose", "expand", "unbind", "split", "select",
          "slice", "flatten", "unflatten", "as_strided", "t", "empty", "empty_like", "resize_", "_unsafe_view"}
ELEMENTWISE = {"mul", "add", "cat", "neg", "stack", "sub", "div", "gelu", "rsub", "where", "mul_", "add_"}


def group_of(name: str) -> str:
    op = name.split("::")[-1]
    for group, keys in GROUPS:
        if any(k == op or (len(k) > 3 and k in op) for k in keys):
            return group
    if op in LAYOUT:
        return "layout"
    if op in ELEMENTWISE:
        return "RoPE / element-wise"
    return "other"


def profile(arch: str, model_args: dict[str, Any], size: int, batch: int, precision: str, warmup: int,
            calls: int) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from capsule_batch.model.bundle import create_model

    torch.manual_seed(0)
    model = create_model(arch, 10, model_args).eval()
    x = torch.randn(batch, 3, size, size)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
        x = x.to(torch.bfloat16)
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                model(x)
    groups: dict[str, float] = {}
    ops: dict[str, float] = {}
    for ev in prof.key_averages():
        us = float(ev.self_cpu_time_total)
        groups[group_of(ev.key)] = groups.get(group_of(ev.key), 0.0) + us
        ops[ev.key] = us
    total = sum(groups.values())
    frames = batch * calls
    return {"arch": arch, "model_args": model_args, "precision": precision, "batch": batch, "calls": calls,
            "threads": torch.get_num_threads(), "ms_per_frame": round(total / 1000 / frames, 3),
            "groups_ms_per_frame": {g: round(v / 1000 / frames, 3) for g, v in sorted(groups.items(),
                                                                                        key=lambda kv: -kv[1])},
            "top_ops_ms_per_frame": {k: round(v / 1000 / frames, 3) for k, v in sorted(ops.items(),
                                                                                         key=lambda kv: -kv[1])[:12]},
            "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="eva02_base_patch14_224")
    ap.add_argument("--model-args", default="{}")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--precisions", default="fp32")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from capsule_batch.backends.cpu_choice import cpu_info

    cpu = cpu_info()
    for precision in args.precisions.split(","):
        row = {**profile(args.arch, json.loads(args.model_args), args.size, args.batch, precision, args.warmup,
                         args.calls), "cpu": cpu}
        print(f"{args.arch} {precision}, batch {args.batch}, {row['threads']} threads, {cpu['model']} "
              f"({' '.join(cpu['flags']) or 'no recorded flags'}): {row['ms_per_frame']:.1f} ms of CPU per frame")
        for g, ms in row["groups_ms_per_frame"].items():
            print(f"  {g:<22}{ms:9.2f} ms  {100 * ms / row['ms_per_frame']:5.1f} %")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
