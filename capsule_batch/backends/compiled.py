"""torch on a CPU, compiled ahead of time: the bundle's model as an AOTInductor package in the engine store.

`--engine torch --compile` on a CPU (and the CPU choice's `compiled` candidates, cpu_choice.py) runs the model
compiled by TorchInductor with `freezing` (weights folded in as constants, linear layers on oneDNN's pre-packed
kernels, element-wise chains fused into C++ loops) and packaged by AOTInductor (`torch._inductor.
aoti_compile_and_package`): a `.pt2` file holding the generated shared library and the weights. The compile costs
tens of seconds (eva02_tiny at 224 px: ~30 s, eva02_base: ~35 s on 2 Zen 3 cores; `compile_seconds` in the
entry's meta.json) and is paid once per bundle, precision, CPU and torch version: every later process loads the
package in well under a second instead of compiling again, as `torch.compile` in the process would.

The package takes any batch from 1 to `MAX_BATCH` (a dynamic batch dimension: no padding, one package per
bundle). What it depends on is its identity (`identity`): the bundle, the precision (fp32, or bf16/fp16 with the
model cast), the CPU model and the flags that decide which vector kernels get generated, torch's thread count (the
OpenMP loops are generated for it) and the torch version; any change builds another entry (`aoti-<precision>-
<digest of the CPU, threads and torch>`), so one store can serve several machines.

A package is machine code: like a TensorRT plan, it is loaded only from the engine store, after its bytes are
checked against its meta.json (engine_store.py). Do not copy packages between machines you do not control.

No copy of a model is left in the temporary directory. Left to itself, torch leaves two things there: every load
extracts the package (generated library and weights: ~330 MB for eva02_base) into `$TMPDIR/aotinductor_*` and
removes it only when the loaded model is destroyed, which a process that exits, is killed or is interrupted does
not do, so each run left a copy behind; and every compile writes its generated code and a copy of the weights into
inductor's cache (`$TMPDIR/torchinductor_$USER`, ~345 MB per eva02_base bundle). Here a load extracts into a
private directory removed as soon as the library is mapped (the mapping outlives the files on POSIX), and a compile
uses a private inductor cache removed afterwards (~3 s more per compile than a warm shared cache: eva02_tiny 32.8
vs 29.6 s): the package in the engine store is the cache. What stays is inductor's precompiled C++ headers
(`$TMPDIR/torchinductor_$USER/precompiled_headers`, ~150 MB per compiler configuration, shared by every bundle).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from capsule_batch.errors import EngineError
from capsule_batch.model.bundle import ModelBundle

_logger = logging.getLogger(__name__)

ENTRY_PREFIX = "aoti-"
PACKAGE_FILE = "model.pt2"
#: the largest batch a package takes (its batch dimension is dynamic from 1 to this)
MAX_BATCH = 4096
#: inductor settings the package is compiled with (part of its identity)
INDUCTOR_CONFIGS = {"freezing": True}


def compiler_available() -> tuple[bool, str]:
    """Whether inductor finds the C++ compiler it needs (g++ or $CXX), and why not."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return True, get_cpp_compiler()
    except Exception as e:  # InvalidCxxCompiler, or an inductor that moved the function
        return False, f"no C++ compiler for TorchInductor ({type(e).__name__}; install g++ or set CXX)"


def identity(bundle: ModelBundle, precision: str) -> dict[str, Any]:
    """What a package built from `bundle` in `precision` on this machine depends on."""
    import torch

    from capsule_batch.backends.cpu_choice import cpu_info
    from capsule_batch.backends.engine_store import bundle_identity

    cpu = cpu_info()
    return {"kind": "aoti", **bundle_identity(bundle), "precision": precision, "cast": precision != "fp32",
            "cpu": {"model": cpu["model"], "flags": cpu["flags"]}, "threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "inductor_configs": INDUCTOR_CONFIGS, "max_batch": MAX_BATCH}


def entry_name(ident: dict[str, Any]) -> str:
    machine = json.dumps([ident["cpu"], ident["threads"], ident["torch_version"]], sort_keys=True)
    return f"{ENTRY_PREFIX}{ident['precision']}-{hashlib.sha256(machine.encode()).hexdigest()[:10]}"


def compile_package(module: Any, input_size: int, dtype: Any, out: Path) -> float:
    """Export `module` (eval mode, already in `dtype`) with a dynamic batch and write its AOTInductor package to
    `out`; returns the seconds it took."""
    import torch

    t0 = time.perf_counter()
    example = torch.randn((2, 3, input_size, input_size), dtype=dtype)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    # not under torch.no_grad(): exported there, eva02_base's package ran at 2.2-2.3 frames/s instead of 3.4 (eager
    # 2.8-2.9; Zen 3, 2 threads, batch 16; measured, the cause not traced further)
    exported = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    with _private_dir("TORCHINDUCTOR_CACHE_DIR", "capsule-batch-inductor-"):
        torch._inductor.aoti_compile_and_package(exported, package_path=str(out),
                                                 inductor_configs=dict(INDUCTOR_CONFIGS))
    return time.perf_counter() - t0


def ensure_package(bundle: ModelBundle, store: Any, precision: str, *, policy: str = "auto",
                   model: Any = None) -> tuple[Path, dict[str, Any]]:
    """(package path, meta) of the bundle's compiled model in `precision`, compiled on first use."""
    from capsule_batch.devices import torch_dtype

    ok, why = compiler_available()
    if not ok:
        raise EngineError(f"torch --compile on a CPU: {why}")
    ident = identity(bundle, precision)
    dtype = torch_dtype(precision)

    def build(tmp: Path) -> tuple[str, dict[str, Any]]:
        module = (model if model is not None else bundle.create_model()).eval().to("cpu", dtype)
        _logger.info("compiling %s (%s) with TorchInductor for this CPU (once per bundle, CPU and torch version; "
                     "tens of seconds)", bundle.name, precision)
        with _quiet_inductor():
            seconds = compile_package(module, bundle.preprocess.input_size, dtype, tmp / PACKAGE_FILE)
        _logger.info("compiled %s in %.1f s", bundle.name, seconds)
        return PACKAGE_FILE, {"backend": "torch-aoti", "backend_version": ident["torch_version"],
                              "compile_seconds": round(seconds, 1)}

    return store.ensure(bundle, entry_name(ident), ident, build, policy)


@contextlib.contextmanager
def _private_dir(variable: str, prefix: str) -> Iterator[Path]:
    """A fresh directory named by environment `variable` for the duration (for torch's C++ and Python alike), then
    the variable as it was and the directory removed. The variable is process-wide: another thread that reads it
    meanwhile sees the private directory, which exists until the block ends."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    before = os.environ.get(variable)
    os.environ[variable] = str(path)
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = before
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _quiet_inductor() -> Iterator[None]:
    """torch's C++ extension helper warns 'No CUDA runtime is found' on every CPU-only compile: not news here."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def load_package(path: Path) -> Any:
    """The callable compiled model in a package (checked against its meta.json by the store before)."""
    import torch

    try:
        # the loader extracts the package under $TMPDIR (std::filesystem::temp_directory_path); the library is
        # mapped and the weights read by the time it returns, so the extracted files can go at once
        with _private_dir("TMPDIR", "capsule-batch-aoti-"):
            return torch._inductor.aoti_load_package(str(path))
    except Exception as e:  # a package from another torch, or a damaged one
        raise EngineError(f"{path}: torch cannot load this compiled package ({type(e).__name__}: "
                          f"{str(e)[:300]}); rebuild it with `capsule-batch engine build --compile --force`") from e


__all__ = ["ENTRY_PREFIX", "INDUCTOR_CONFIGS", "MAX_BATCH", "compile_package", "compiler_available", "ensure_package",
           "entry_name", "identity", "load_package"]
