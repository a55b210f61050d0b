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


def environment_report() -> dict[str, Any]:
    return {
        "capsule_batch": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_report(),
        "devices": device_report(),
        **registry_report(),
    }
