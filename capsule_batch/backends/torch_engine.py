"""The `torch` backend: the bundle's timm model, eager or `torch.compile`, CPU or CUDA.

fp32 runs the model exactly as built (no autocast: it is the reference every other backend is checked
against). bf16/fp16 run under autocast with fp32 weights, which keeps LayerNorm and softmax in fp32.
On CUDA, `cuda_graphs` captures one graph at `max_batch` (smaller batches are padded into its static
input) or, with `compile`, uses torch.compile's `reduce-overhead` mode, which manages graphs itself.
`compile_options` go to torch.compile as they are (e.g. {"mode": "max-autotune"}).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from capsule_batch.backends.base import BACKENDS, Engine
from capsule_batch.bundle import ModelBundle
from capsule_batch.devices import torch_dtype
from capsule_batch.errors import EngineError

_logger = logging.getLogger(__name__)


@BACKENDS.register("torch")
class TorchEngine(Engine):
    precisions = {"cuda": ("bf16", "fp16", "fp32"), "cpu": ("fp32", "bf16", "fp16")}

    def __init__(self, bundle: ModelBundle, *, device: Any, precision: str, max_batch: int,
                 compile: bool = False, cuda_graphs: bool = False, compile_options: dict[str, Any] | None = None,
                 model: Any = None):
        import torch

        super().__init__(bundle, device=device, precision=precision, max_batch=max_batch)
        if cuda_graphs and self.device.type != "cuda":
            raise EngineError("torch engine: CUDA graphs need a CUDA device")
        self.compiled = bool(compile)
        self.cuda_graphs = bool(cuda_graphs)
        self._dtype = torch_dtype(precision)
        module = (model if model is not None else bundle.create_model()).eval().to(self.device)
        self._module = module
        if compile:
            options = {"mode": "reduce-overhead" if cuda_graphs else "default", **(compile_options or {})}
            self._fn = torch.compile(module, **options)
        else:
            self._fn = module
        self._graph: tuple[Any, Any, Any] | None = None
        if cuda_graphs and not compile:
            self._capture()

    @classmethod
    def resolve_precision(cls, precision: str, device_type: str) -> str:
        """`auto` on a GPU without bf16 (before Ampere) is fp16."""
        resolved = super().resolve_precision(precision, device_type)
        if precision == "auto" and resolved == "bf16" and device_type == "cuda":
            import torch

            if not torch.cuda.is_bf16_supported():
                return "fp16"
        return resolved

    @property
    def dtype(self) -> Any:
        return self._dtype

    def _autocast(self) -> Any:
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        # no weight-cast cache: each weight is used once per forward, and CUDA graph capture needs it off
        return torch.autocast(self.device.type, dtype=self._dtype, cache_enabled=False)

    def _run(self, pixels: Any) -> Any:
        import torch

        with torch.inference_mode(), self._autocast():
            return self._fn(pixels)

    def _capture(self) -> None:
        """Record one CUDA graph at max_batch after a warm-up on a side stream (torch's recipe)."""
        import torch

        size = self.bundle.preprocess.input_size
        static_in = torch.randn((self.max_batch, 3, size, size), device=self.device).to(self._dtype)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._run(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode(), self._autocast():
            static_out = self._fn(static_in)
        self._graph = (graph, static_in, static_out)

    def logits(self, pixels: Any) -> Any:
        if self._graph is None:
            return self._run(pixels)
        graph, static_in, static_out = self._graph
        n = int(pixels.shape[0])
        static_in[:n].copy_(pixels)
        graph.replay()
        return static_out[:n].clone()

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(compile=self.compiled, cuda_graphs=self.cuda_graphs,
                 autocast=self.precision != "fp32")
        return d
