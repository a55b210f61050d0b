"""Device selection shared by sources and engines."""

from __future__ import annotations

from typing import Any

from capsule_batch.errors import CapsuleError


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(spec: str | None) -> Any:
    """`auto` -> first CUDA device if there is one, else CPU; `cpu`, `cuda`, `cuda:N` are checked."""
    import torch

    spec = (spec or "auto").lower()
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise CapsuleError(f"bad device {spec!r}: expected auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CapsuleError(f"device {spec}: no CUDA GPU is visible on this machine")
        idx = dev.index or 0
        if idx >= torch.cuda.device_count():
            raise CapsuleError(f"device {spec}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", idx)
    if dev.type != "cpu":
        raise CapsuleError(f"device {spec}: only cpu and cuda are supported")
    return dev


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def torch_dtype(precision: str) -> Any:
    import torch

    try:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    except KeyError:
        raise CapsuleError(f"unknown precision {precision!r} (fp32, bf16, fp16)") from None
