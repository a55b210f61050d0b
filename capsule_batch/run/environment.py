"""What this machine can do: package versions, devices, and which sources/backends work here and why not."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import platform
import sys
from typing import Any

from capsule_batch import __version__

#: (import name, distribution names to ask for a version, what it is for)
PACKAGES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("torch", ("torch",), "inference and training"),
    ("torchvision", ("torchvision",), "needed by timm"),
    ("timm", ("timm",), "EVA-02 models"),
    ("numpy", ("numpy",), ""),
    ("h5py", ("h5py",), "study files"),
    ("av", ("av",), "synthetic recordings, reference decode"),
    ("decord", ("decord",), "CPU video decode"),
    ("nvidia.dali", ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"), "GPU/CPU decode"),
    ("tensorrt", ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"), "TensorRT engines"),
    ("onnx", ("onnx",), "ONNX export"),
    ("onnxruntime", ("onnxruntime", "onnxruntime-gpu"), "ONNX Runtime engines"),
    ("flask", ("flask",), "review app"),
)


def _version(dists: tuple[str, ...]) -> str | None:
    for d in dists:
        try:
            return md.version(d)
        except md.PackageNotFoundError:
            continue
    return None


def package_report() -> list[dict[str, Any]]:
    out = []
    for mod, dists, purpose in PACKAGES:
        ver = _version(dists)
        entry: dict[str, Any] = {"package": mod, "version": ver, "purpose": purpose, "importable": False}
        if ver is not None:
            try:
                importlib.import_module(mod)
                entry["importable"] = True
            except Exception as e:  # any import failure is a fact to report, not a crash
                entry["error"] = f"{type(e).__name__}: {e}"[:200]
        out.append(entry)
    return out


def device_report() -> dict[str, Any]:
    import torch

    from capsule_batch.backends.cpu_choice import FORCE_ENV, cpu_info

    d: dict[str, Any] = {"torch_cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                         "cpu_threads": torch.get_num_threads(), "cpu": cpu_info(),
                         "cpu_choice_forced": os.environ.get(FORCE_ENV) or None, "gpus": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            d["gpus"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                              "memory_gib": round(p.total_memory / 2**30, 1)})
    return d


def registry_report() -> dict[str, list[dict[str, Any]]]:
    from capsule_batch.backends import BACKENDS
    from capsule_batch.sources import SOURCES

    out: dict[str, list[dict[str, Any]]] = {}
    for kind, reg in (("sources", SOURCES), ("backends", BACKENDS)):
        rows = []
        for name, cls in reg.items():
            ok, why = cls.available()
            rows.append({"name": name, "available": ok, "reason": why})
        out[kind] = rows
    return out


#: What of the GPU code has run where (docs/gpu.md, "What has run where"). Update it with the run that changes it.
GPU_VERIFICATION: dict[str, str] = {
    "real_gpu": "nothing yet: no part of capsule-batch has run on a real GPU (no TensorRT, DALI GPU decoding, NVDEC "
                "or GPU timing has been measured)",
    "fake_cuda": "every torch-side GPU path, on a fake CUDA device in the test suite (tests/test_fake_cuda.py): run "
                 "and bench on --device cuda (fp16/bf16/fp32, autocast and cast, CUDA graphs on and off), decoding "
                 "to the GPU, the GPU suite's torch parts, fine-tune/pre-train/adapt with AMP, DDP on 2 ranks under "
                 "NCCL's rules; it checks placement, dtypes and call order, not numbers or speed",
}


def environment_report() -> dict[str, Any]:
    return {
        "gpu_verification": GPU_VERIFICATION,
        "capsule_batch": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_report(),
        "devices": device_report(),
        **registry_report(),
    }
