"""The `onnxruntime` backend: the bundle's ONNX export (from the engine store) in an InferenceSession.

CPU: fp32, or int8 (the export quantised after training, calibrated on `calibration` frames: int8.py); `threads`
sets intra-op threads (default: onnxruntime's choice). CUDA: needs onnxruntime-gpu
(the CUDA execution provider); fp16 runs an fp16 export; inputs and outputs stay on the GPU through
I/O binding on torch tensors, and the session runs on the torch stream that was current when the
engine was created (`user_compute_stream`).
"""

from __future__ import annotations

import logging
from typing import Any

from capsule_batch.backends.base import BACKENDS, Engine
from capsule_batch.backends.engine_store import EngineStore
from capsule_batch.backends.onnx_export import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, ensure_onnx
from capsule_batch.devices import torch_dtype
from capsule_batch.errors import EngineError
from capsule_batch.model.bundle import ModelBundle

_logger = logging.getLogger(__name__)

CUDA_EP = "CUDAExecutionProvider"


@BACKENDS.register("onnxruntime")
class OrtEngine(Engine):
    requires = (("onnxruntime", "onnx"), ("onnx", "onnx"))
    precisions = {"cpu": ("fp32", "int8"), "cuda": ("fp16", "fp32")}
    uses_store = True

    @classmethod
    def supports(cls, device_type: str) -> tuple[bool, str]:
        ok, why = super().supports(device_type)
        if ok and device_type == "cuda":
            import onnxruntime as ort

            if CUDA_EP not in ort.get_available_providers():
                return False, "onnxruntime has no CUDA execution provider here (install onnxruntime-gpu)"
        return ok, why

    def __init__(self, bundle: ModelBundle, *, device: Any, precision: str, max_batch: int,
                 store: EngineStore | str | None = None, rebuild: str = "auto", threads: int | None = None,
                 opset: int = DEFAULT_OPSET, exporter: str = "legacy", calibration: str | None = None,
                 calibration_frames: int | None = None):
        import onnxruntime as ort

        super().__init__(bundle, device=device, precision=precision, max_batch=max_batch)
        store = EngineStore.of(store)
        if precision == "int8":
            from capsule_batch.backends.int8 import DEFAULT_CALIBRATION_FRAMES, ensure_int8_onnx, stored_int8_engine

            stored = (stored_int8_engine(bundle, store)
                      if calibration is None and calibration_frames is None and rebuild == "auto" else None)
            if stored is not None:
                self.onnx_path, self.meta = stored
                _logger.info("int8: the stored engine %s (calibrated on %s)", self.onnx_path,
                             (self.meta.get("calibration") or {}).get("source"))
            else:
                self.onnx_path, self.meta = ensure_int8_onnx(
                    bundle, store, calibration=calibration, frames=calibration_frames or DEFAULT_CALIBRATION_FRAMES,
                    opset=opset, exporter=exporter, policy=rebuild, threads=threads)
        else:
            self.onnx_path, self.meta = ensure_onnx(bundle, store, dtype=precision, opset=opset, exporter=exporter,
                                                    policy=rebuild)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.threads = threads
        if self.device.type == "cuda":
            import torch

            stream = torch.cuda.current_stream(self.device).cuda_stream
            providers: list[Any] = [(CUDA_EP, {"device_id": self.device.index or 0,
                                               "user_compute_stream": str(stream)}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(str(self.onnx_path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise EngineError(f"{self.onnx_path}: onnxruntime cannot load it ({type(e).__name__}: {str(e)[:300]})"
                              ) from e
        self._dtype = torch_dtype("fp32" if precision == "int8" else precision)  # int8 takes and gives floats

    @property
    def dtype(self) -> Any:
        return self._dtype

    def logits(self, pixels: Any) -> Any:
        import torch

        if self.device.type == "cpu":
            out = self._session.run([OUTPUT_NAME], {INPUT_NAME: pixels.contiguous().numpy()})[0]
            return torch.from_numpy(out)
        return self._logits_cuda(pixels.contiguous())

    def _logits_cuda(self, pixels: Any) -> Any:
        import numpy as np
        import torch

        np_type = np.float16 if self._dtype == torch.float16 else np.float32
        out = torch.empty((pixels.shape[0], self.bundle.num_classes), dtype=self._dtype, device=self.device)
        idx = self.device.index or 0
        binding = self._session.io_binding()
        binding.bind_input(INPUT_NAME, "cuda", idx, np_type, tuple(pixels.shape), pixels.data_ptr())
        binding.bind_output(OUTPUT_NAME, "cuda", idx, np_type, tuple(out.shape), out.data_ptr())
        self._session.run_with_iobinding(binding)
        return out

    def describe(self) -> dict[str, Any]:
        import onnxruntime as ort

        d = super().describe()
        d.update(backend_version=ort.__version__, providers=self._session.get_providers(), threads=self.threads,
                 artifact=str(self.onnx_path), opset=self.meta.get("opset"), exporter=self.meta.get("exporter"))
        if self.precision == "int8":
            d.update(calibration=self.meta.get("calibration"), int8_parity=self.meta.get("parity"))
        return d
