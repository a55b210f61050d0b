"""The `torch` backend: the bundle's timm model, eager or `torch.compile`, CPU or CUDA.

fp32 runs the model exactly as built (no autocast: it is the reference every other backend is checked
against); on CUDA with TF32 off for its calls (`exact_fp32`), since torch lets cuDNN convolutions use TF32 by
default (`torch.backends.cudnn.allow_tf32` is True), which rounds the patch embedding's inputs to 10 mantissa bits.
bf16/fp16 run under autocast with fp32 weights, which keeps LayerNorm and softmax in fp32; with `cast` the model
and its input are cast to bf16/fp16 instead (no autocast: every op in the low precision, the fastest on CPUs with
AMX, and the furthest from fp32 — the CPU choice, cpu_choice.py, uses it only where it passes parity).
On CUDA, `cuda_graphs` captures one graph at `max_batch` (smaller batches are padded into its static
input) or, with `compile`, uses torch.compile's `reduce-overhead` mode, which manages graphs itself.
On CUDA a compiled engine is warmed up (compiled) when it is built, outside any run's engine watch, and pads every
call to `max_batch`, so a run never compiles again for the shorter last batch; `compile_options` go to
torch.compile as they are (e.g. {"mode": "max-autotune"}).
On a CPU, `compile` loads the bundle's AOTInductor package from the engine store, compiled there on first use
(compiled.py): fp32, or bf16/fp16 with `cast`; the compile is paid once per bundle, CPU and torch version, not once
per process. With `compile_options` (torch.compile's own, for experiments) a CPU engine is compiled in the process
as on CUDA.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from capsule_batch.backends.base import BACKENDS, Engine, is_out_of_memory
from capsule_batch.devices import torch_dtype
from capsule_batch.errors import EngineError
from capsule_batch.model.bundle import ModelBundle

_logger = logging.getLogger(__name__)

#: calls made while a compiled engine is built: torch.compile compiles on the first, reduce-overhead records its
#: CUDA graphs on the following ones
COMPILE_WARMUP_CALLS = 3


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for cuBLAS matrix products and cuDNN convolutions while inside, restored after (the flags are the
    process's; only the engine's thread runs products and convolutions in a run)."""
    import torch

    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


@BACKENDS.register("torch")
class TorchEngine(Engine):
    # fp16 first on CUDA: the same tensor-core rate as bf16 on Ampere and later, three more mantissa bits (closer
    # to the fp32 reference), and the seed trained with fp16 mixed precision, so its activations fit fp16 under
    # autocast; docs/gpu.md says how the measured choice replaces this
    precisions = {"cuda": ("fp16", "bf16", "fp32"), "cpu": ("fp32", "bf16", "fp16")}
    uses_store = True  # a compiled CPU engine's package

    def __init__(self, bundle: ModelBundle, *, device: Any, precision: str, max_batch: int,
                 compile: bool = False, cuda_graphs: bool = False, compile_options: dict[str, Any] | None = None,
                 model: Any = None, cast: bool = False, store: Any = None, rebuild: str = "auto"):
        import torch

        super().__init__(bundle, device=device, precision=precision, max_batch=max_batch)
        if cuda_graphs and self.device.type != "cuda":
            raise EngineError("torch engine: CUDA graphs need a CUDA device")
        self.compiled = bool(compile)
        self.cuda_graphs = bool(cuda_graphs)
        self._dtype = torch_dtype(precision)
        if cast and precision == "fp32":
            raise EngineError("torch engine: `cast` needs a bf16 or fp16 precision")
        self.cast = bool(cast)
        self.package: tuple[Any, dict[str, Any]] | None = None  # (path, meta) of a compiled CPU engine
        if compile and self.device.type == "cpu" and not compile_options:
            self._load_package(model, store, rebuild)
            return
        # one conversion to the device (and the cast precision): each weight is copied once, never cast on the host
        module = (model if model is not None else bundle.create_model()).eval()
        module = module.to(self.device, self._dtype) if self.cast else module.to(self.device)
        self._module = module
        if compile:
            options = {"mode": "reduce-overhead" if cuda_graphs else "default", **(compile_options or {})}
            self._fn = torch.compile(module, **options)
        else:
            self._fn = module
        self._graph: tuple[Any, Any, Any] | None = None
        if cuda_graphs and not compile:
            self._capture_backing_off()
        elif compile:
            self._warm_up()

    def _load_package(self, model: Any, store: Any, rebuild: str) -> None:
        from capsule_batch.backends.compiled import MAX_BATCH, ensure_package, load_package
        from capsule_batch.backends.engine_store import EngineStore

        if self.precision != "fp32" and not self.cast:
            raise EngineError(f"torch engine: compiled {self.precision} on a CPU needs `cast` (the model in "
                              f"{self.precision}); autocast is not compiled")
        store = EngineStore.of(store)
        if self.max_batch > MAX_BATCH:
            _logger.info("compiled engine: batch capped at %d (the package's largest)", MAX_BATCH)
            self.max_batch = MAX_BATCH
        self.package = ensure_package(self.bundle, store, self.precision, policy=rebuild, model=model)
        self._module = None
        self._fn = load_package(self.package[0])
        self._graph = None

    @property
    def dtype(self) -> Any:
        return self._dtype

    @staticmethod
    def numerics(device_type: str, precision: str, dtype: Any, cast: bool = False) -> Any:
        """The context a forward pass runs in: autocast for bf16/fp16 (nothing when the model is `cast`); for fp32
        on CUDA, TF32 off (parity is the point of an fp32 engine); nothing for fp32 on a CPU."""
        import torch

        if cast:
            return contextlib.nullcontext()
        if precision == "fp32":
            return exact_fp32() if device_type == "cuda" else contextlib.nullcontext()
        # no weight-cast cache: each weight is used once per forward, and CUDA graph capture needs it off
        return torch.autocast(device_type, dtype=dtype, cache_enabled=False)

    def _run(self, pixels: Any) -> Any:
        import torch

        with torch.inference_mode(), self.numerics(self.device.type, self.precision, self._dtype, self.cast):
            return self._fn(pixels)

    def _static_input(self) -> Any:
        import torch

        size = self.bundle.preprocess.input_size
        return torch.randn((self.max_batch, 3, size, size), device=self.device).to(self._dtype)  # never zeros

    def _warm_up(self) -> None:
        """Compile now, at the one shape every call will have (see `logits`)."""
        x = self._static_input()
        for _ in range(COMPILE_WARMUP_CALLS):
            self._run(x)

    def _capture_backing_off(self) -> None:
        """Capture the graph; out of device memory, at half the batch (as `Engine.infer` backs off)."""
        while True:
            try:
                self._capture()
                return
            except Exception as e:
                if not is_out_of_memory(e) or self.max_batch == 1:
                    raise
                reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            self._graph = None
            self._back_off(self.max_batch, f"capturing the CUDA graph: {reason}")

    def _capture(self) -> None:
        """Record one CUDA graph at max_batch after a warm-up on a side stream (torch's recipe), captured on that
        stream of this engine's GPU: torch.cuda.graph's default capture stream is made once per process on whatever
        GPU was current then (torch/cuda/graphs.py, `default_capture_stream`)."""
        import torch

        static_in = self._static_input()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._run(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side), torch.inference_mode(), self.numerics(
                self.device.type, self.precision, self._dtype, self.cast):
            static_out = self._fn(static_in)
        self._graph = (graph, static_in, static_out)

    def logits(self, pixels: Any) -> Any:
        import torch

        n = int(pixels.shape[0])
        if self._graph is not None:
            graph, static_in, static_out = self._graph
            static_in[:n].copy_(pixels)
            graph.replay()
            return static_out[:n].clone()
        if self.compiled and self.package is None and n < self.max_batch:
            # one shape only: a shorter batch would make torch.compile compile again, inside a watched call
            pad = pixels.new_zeros((self.max_batch - n, *pixels.shape[1:]))
            return self._run(torch.cat([pixels, pad]))[:n]
        return self._run(pixels)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(compile=self.compiled, cuda_graphs=self.cuda_graphs, cast=self.cast,
                 autocast=self.precision != "fp32" and not self.cast)
        if self.device.type == "cuda" and self.precision == "fp32":
            d["tf32"] = False
        if self.package is not None:
            path, meta = self.package
            d.update(artifact=str(path), compile_seconds=meta.get("compile_seconds"), aot=True)
        return d
