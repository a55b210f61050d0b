"""The `tensorrt` backend: a serialized TensorRT engine built from the bundle's ONNX export.

Written against NVIDIA's Python API documentation (TensorRT 10 and 11); TensorRT cannot be installed
on the machines this was developed on, so the code around it is tested with a stand-in module and the
real path is covered only by GPU tests marked `tensorrt` (see docs/engines.md for what ran where).

- Build: ONNX parser -> network; one optimization profile (min/opt/max batch); a timing cache kept in
  the engine store per TensorRT version and GPU; `build_serialized_network` -> `model.plan`.
- Precision (`trt_recipe`): strongly typed networks on TensorRT 10 and 11 alike. The network is parsed from an
  export in the engine's own float type (fp16/bf16 with the fp32 islands torch's autocast keeps, onnx_export.py)
  and created with NetworkDefinitionCreationFlag.STRONGLY_TYPED, so the graph's types alone set the precision.
  TensorRT 10's weakly typed alternative (an fp32 export plus BuilderFlag.FP16/BF16, letting the builder pick
  each layer's precision) is deprecated there and removed in 11. An fp32 engine is built with BuilderFlag.TF32
  cleared: TensorRT enables TF32 by default, which rounds matrix-product inputs to 10 mantissa bits, and an fp32
  engine is a parity reference (as the torch backend turns TF32 off for fp32).
- Run: tensors are torch CUDA tensors; their addresses go to `set_tensor_address` and `execute_async_v3` runs
  on the engine's own stream, ordered after torch's current stream (where the pixels were made) and before it
  (where the logits are read) with stream waits, so no copies and no host synchronisation. Not torch's current
  stream itself: in a run that is the legacy default stream (handle 0), and TensorRT documents that it answers
  the default stream with extra `cudaDeviceSynchronize` calls ("Please use non-default stream instead",
  `IExecutionContext.execute_async_v3`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsule_batch.backends.base import BACKENDS, Engine
from capsule_batch.backends.engine_store import EngineStore, bundle_identity, slug
from capsule_batch.backends.onnx_export import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, ensure_onnx
from capsule_batch.errors import EngineError
from capsule_batch.model.bundle import ModelBundle

_logger = logging.getLogger(__name__)

PLAN_FILE = "model.plan"


@dataclass(frozen=True)
class TrtRecipe:
    """How to build for one TensorRT major version and precision."""

    major: int
    strongly_typed: bool
    network_flags: int
    builder_flags: tuple[str, ...]  # names of tensorrt.BuilderFlag members to set
    onnx_dtype: str  # float type of the ONNX export the network is parsed from
    cleared_flags: tuple[str, ...] = ()  # names of tensorrt.BuilderFlag members to clear (where the version has them)


def trt_recipe(trt: Any, precision: str) -> TrtRecipe:
    """The one place where TensorRT 10 and 11 differ for this project."""
    try:
        major = int(str(trt.__version__).split(".")[0])
    except ValueError:
        raise EngineError(f"cannot read the TensorRT version {trt.__version__!r}") from None
    if precision not in ("fp32", "fp16", "bf16"):
        raise EngineError(f"TensorRT precision must be fp32, fp16 or bf16, not {precision!r}")
    if major < 10:
        raise EngineError(f"TensorRT {trt.__version__} is not supported (10.x or 11.x needed)")
    # TensorRT 11 ignores the flag (every network is strongly typed there); 10 needs it
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return TrtRecipe(major, True, flags, (), precision, cleared_flags=("TF32",) if precision == "fp32" else ())


def batch_profile(max_batch: int, opt_batch: int | None = None) -> dict[str, int]:
    """min 1, opt = the batch a run mostly sees (max_batch unless given), max = max_batch."""
    opt = int(opt_batch or max_batch)
    if not 1 <= opt <= max_batch:
        raise EngineError(f"TensorRT profile: opt batch {opt} must be within 1..{max_batch}")
    return {"min": 1, "opt": opt, "max": int(max_batch)}


def gpu_info(device: Any) -> dict[str, str]:
    import torch

    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}"}


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_plan(trt: Any, onnx_path: Path, out_path: Path, recipe: TrtRecipe, profile: dict[str, int],
               input_size: int, timing_cache: Path | None = None, workspace_bytes: int | None = None) -> None:
    """Parse `onnx_path`, build a serialized engine into `out_path`, update the timing cache file."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(recipe.network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors or 'no details'}")
    config = builder.create_builder_config()
    for flag in recipe.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in recipe.cleared_flags:
        if hasattr(trt.BuilderFlag, flag):
            config.clear_flag(getattr(trt.BuilderFlag, flag))
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    shape = (3, input_size, input_size)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(INPUT_NAME, (profile["min"], *shape), (profile["opt"], *shape), (profile["max"], *shape))
    config.add_optimization_profile(opt_profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, False):
        _logger.warning("%s: timing cache does not fit this GPU/TensorRT; starting a new one", timing_cache)
        config.set_timing_cache(config.create_timing_cache(b""), False)
    _logger.info("building TensorRT %s engine (%s, batch %s); this takes minutes", trt.__version__,
                 ("strongly typed " if recipe.strongly_typed else "") + recipe.onnx_dtype
                 + "".join(f", {f} off" for f in recipe.cleared_flags), profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"{onnx_path}: TensorRT failed to build an engine (its log above says why)")
    _write_atomic(out_path, bytes(memoryview(plan)))
    if timing_cache is not None:
        _write_atomic(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))


def ensure_plan(bundle: ModelBundle, store: EngineStore, trt: Any, *, precision: str, profile: dict[str, int],
                gpu: dict[str, str], policy: str = "auto", opset: int = DEFAULT_OPSET, exporter: str = "legacy",
                workspace_bytes: int | None = None) -> tuple[Path, dict[str, Any]]:
    """The TensorRT engine for this bundle, GPU, TensorRT version, precision and profile, built if needed."""
    recipe = trt_recipe(trt, precision)
    expected = {"kind": "tensorrt", **bundle_identity(bundle), "backend": "tensorrt",
                "backend_version": str(trt.__version__), "gpu": gpu, "precision": precision, "batch": profile}
    entry = (f"tensorrt-{precision}-{slug(gpu['name'])}-sm{gpu['capability'].replace('.', '')}"
             f"-b{profile['min']}-{profile['opt']}-{profile['max']}")
    cache = store.timing_cache_path(f"trt{trt.__version__}-{gpu['name']}-sm{gpu['capability']}")

    def build(tmp: Path) -> tuple[str, dict[str, Any]]:
        onnx_path, onnx_meta = ensure_onnx(bundle, store, dtype=recipe.onnx_dtype, opset=opset, exporter=exporter)
        build_plan(trt, onnx_path, tmp / PLAN_FILE, recipe, profile, bundle.preprocess.input_size, cache,
                   workspace_bytes)
        return PLAN_FILE, {"onnx_sha256": onnx_meta["sha256"], "onnx_dtype": recipe.onnx_dtype,
                           "strongly_typed": recipe.strongly_typed, "builder_flags": list(recipe.builder_flags),
                           "input": INPUT_NAME, "output": OUTPUT_NAME}

    return store.ensure(bundle, entry, expected, build, policy)


@BACKENDS.register("tensorrt")
class TensorRTEngine(Engine):
    requires = (("tensorrt", "tensorrt"), ("onnx", "onnx"))
    precisions = {"cuda": ("fp16", "bf16", "fp32")}
    uses_store = True

    def __init__(self, bundle: ModelBundle, *, device: Any, precision: str, max_batch: int,
                 store: EngineStore | str | None = None, rebuild: str = "auto", opt_batch: int | None = None,
                 opset: int = DEFAULT_OPSET, exporter: str = "legacy", workspace_bytes: int | None = None):
        import tensorrt as trt
        import torch

        super().__init__(bundle, device=device, precision=precision, max_batch=max_batch)
        store = EngineStore.of(store)
        self.profile = batch_profile(self.max_batch, opt_batch)
        self.plan_path, self.meta = ensure_plan(bundle, store, trt, precision=precision, profile=self.profile,
                                                gpu=gpu_info(self.device), policy=rebuild, opset=opset,
                                                exporter=exporter, workspace_bytes=workspace_bytes)
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._trt_logger)
            self._engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
            if self._engine is None:
                raise EngineError(f"{self.plan_path}: TensorRT {trt.__version__} could not deserialize it")
            self._context = self._engine.create_execution_context()
        if self._context is None:
            raise EngineError(f"{self.plan_path}: no execution context (out of GPU memory?)")
        to_torch = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                    trt.DataType.BF16: torch.bfloat16}
        self._dtype = to_torch[self._engine.get_tensor_dtype(INPUT_NAME)]
        self._out_dtype = to_torch[self._engine.get_tensor_dtype(OUTPUT_NAME)]
        self._stream = torch.cuda.Stream(self.device)  # non-default (see the module docstring)

    @property
    def dtype(self) -> Any:
        return self._dtype

    def logits(self, pixels: Any) -> Any:
        import torch

        pixels = pixels.contiguous()
        ctx = self._context
        ctx.set_input_shape(INPUT_NAME, tuple(pixels.shape))
        ctx.set_tensor_address(INPUT_NAME, pixels.data_ptr())
        out = torch.empty(tuple(ctx.get_tensor_shape(OUTPUT_NAME)), dtype=self._out_dtype, device=self.device)
        ctx.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)  # the pixels (and `out`'s memory) are ready in torch's order
        if not ctx.execute_async_v3(self._stream.cuda_stream):
            raise EngineError(f"{self.plan_path}: TensorRT execution failed (its log above says why)")
        current.wait_stream(self._stream)  # whoever reads the logits on torch's stream waits for TensorRT
        if pixels.is_cuda:
            pixels.record_stream(self._stream)  # the caller may drop the pixels before TensorRT has read them
        return out

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(backend_version=self.meta.get("backend_version"), artifact=str(self.plan_path),
                 profile=self.profile, strongly_typed=self.meta.get("strongly_typed"))
        return d

    def close(self) -> None:
        self._context = None
        self._engine = None
