"""ONNX export of any bundle: logits output, dynamic batch, opset >= 17, checked by `onnx.checker`.

onnxruntime and TensorRT both build from this file (cached in the engine store). The legacy
(TorchScript) exporter is the default: it exports EVA-02 several times faster than the dynamo exporter
(0.2 s vs 3 s for a small test model here) and gives a plain opset-17 graph. It cannot trace fused
attention (`is_causal` is traced to a tensor), so fused attention is switched off on the
exported copy's attention modules only; the math is identical. `exporter="dynamo"` uses
torch.export and handles fused attention as is.
The graph's float type follows `dtype`: fp32 for onnxruntime and TensorRT 10, fp16/bf16 for
TensorRT 11's strongly typed networks, whose precision comes from the graph's types alone. So a half export
states the mixed precision torch's autocast applies: every op in the half type (matrix products and the patch
convolution on tensor cores, elementwise ops) except `FP32_OPS`, which get Cast nodes to fp32 around them
(`fp32_islands`): LayerNormalization squares its input (fp16 overflows above |x| = 256, and a residual stream
after attention reaches that; TensorRT itself warns "Running layernorm after self-attention in FP16 may cause
overflow") and Softmax sums exponentials.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from capsule_batch.errors import EngineError, MissingPackageError
from capsule_batch.model.bundle import ModelBundle

_logger = logging.getLogger(__name__)

INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
MIN_OPSET = 17
DEFAULT_OPSET = 17
EXPORTERS = ("legacy", "dynamo")
ONNX_DTYPES = ("fp32", "fp16", "bf16")
#: ops a half-precision export computes in fp32 (see the module docstring); torch's autocast keeps both in fp32
FP32_OPS = ("LayerNormalization", "Softmax")


def disable_fused_attn(model: Any) -> int:
    """Turn off `F.scaled_dot_product_attention` in timm attention modules; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(getattr(m, "fused_attn", None), bool) and m.fused_attn:
            m.fused_attn = False
            n += 1
    return n


def export_onnx(
    bundle: ModelBundle,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "legacy",
    dtype: str = "fp32",
    model: Any = None,
) -> Path:
    """Write `bundle`'s model as ONNX to `path` (input `pixels` (B,3,S,S), output `logits` (B,C)).

    `model` may pass an already built fp32 module (tests); it is not modified.
    """
    import copy
    import importlib.util

    import torch

    from capsule_batch.devices import torch_dtype

    if importlib.util.find_spec("onnx") is None:
        raise MissingPackageError("onnx", "onnx", "ONNX export")
    if opset < MIN_OPSET:
        raise EngineError(f"ONNX opset {opset} is too old: LayerNormalization needs >= {MIN_OPSET}")
    if exporter not in EXPORTERS:
        raise EngineError(f"unknown ONNX exporter {exporter!r} (choose from {', '.join(EXPORTERS)})")
    if dtype not in ONNX_DTYPES:
        raise EngineError(f"unknown ONNX dtype {dtype!r} (choose from {', '.join(ONNX_DTYPES)})")
    path = Path(path)
    model = copy.deepcopy(model) if model is not None else bundle.create_model()
    model = model.eval().to(torch_dtype(dtype))
    if exporter == "legacy":
        n = disable_fused_attn(model)
        _logger.debug("ONNX export: fused attention off in %d modules for the legacy exporter", n)
    size = bundle.preprocess.input_size
    example = torch.randn(2, 3, size, size).to(torch_dtype(dtype))
    _logger.info("exporting %s (%s, %s) to ONNX opset %d with the %s exporter", bundle.name, bundle.arch, dtype,
                 opset, exporter)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "legacy":
                torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                                  do_constant_folding=True)
            else:
                batch = torch.export.Dim("batch", min=1, max=4096)
                prog = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                         input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                         dynamic_shapes=({0: batch},), optimize=True)
                prog.save(str(path), external_data=False)
    except Exception as e:  # the exporters raise many types; the user needs the model and the reason
        raise EngineError(f"{bundle.path}: ONNX export ({exporter}, opset {opset}, {dtype}) failed: "
                          f"{type(e).__name__}: {str(e)[:500]}") from e
    if dtype != "fp32":
        import onnx

        proto = onnx.load(str(path))
        n = fp32_islands(proto, dtype)
        onnx.save(proto, str(path))
        _logger.debug("ONNX export: %d %s nodes computed in fp32", n, "/".join(FP32_OPS))
    check_onnx(path)
    return path


def fp32_islands(proto: Any, dtype: str, ops: tuple[str, ...] = FP32_OPS) -> int:
    """Make every node of `ops` in a half-precision graph compute in fp32: its float inputs cast to fp32, its first
    output computed in fp32 and cast back to `dtype`. Returns how many nodes were changed."""
    from onnx import TensorProto, helper

    half = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[dtype]
    graph = proto.graph
    int_inputs = {i.name for i in graph.initializer if i.data_type not in (TensorProto.FLOAT16, TensorProto.BFLOAT16)}
    nodes, changed = [], 0
    for node in graph.node:
        if node.op_type not in ops:
            nodes.append(node)
            continue
        tag = f"{node.name or node.op_type}_{changed}"
        inputs = []
        for k, name in enumerate(node.input):
            if not name or name in int_inputs:
                inputs.append(name)
                continue
            wide = f"{name}__fp32_{tag}_{k}"
            nodes.append(helper.make_node("Cast", [name], [wide], to=TensorProto.FLOAT, name=f"{tag}/to_fp32_{k}"))
            inputs.append(wide)
        out = node.output[0]
        wide_out = f"{out}__fp32_{tag}"
        node.input[:] = inputs
        node.output[0] = wide_out
        nodes.append(node)
        nodes.append(helper.make_node("Cast", [wide_out], [out], to=half, name=f"{tag}/to_{dtype}"))
        changed += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return changed


def check_onnx(path: str | os.PathLike) -> Any:
    """Run `onnx.checker` and verify the interface (names, dynamic batch); returns the loaded model proto."""
    import onnx

    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as e:  # onnx raises DecodeError, ValidationError, OSError...
        raise EngineError(f"{path}: not a valid ONNX model ({type(e).__name__}: {str(e)[:300]})") from e
    inputs = [i for i in proto.graph.input]
    outputs = [o for o in proto.graph.output]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in outputs] != [OUTPUT_NAME]:
        raise EngineError(f"{path}: expected one input {INPUT_NAME!r} and one output {OUTPUT_NAME!r}")
    dim0 = inputs[0].type.tensor_type.shape.dim[0]
    if dim0.HasField("dim_value"):
        raise EngineError(f"{path}: the batch dimension is fixed at {dim0.dim_value}, expected dynamic")
    return proto


def onnx_opset(proto: Any) -> int:
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


def ensure_onnx(
    bundle: ModelBundle,
    store: Any,
    *,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    exporter: str = "legacy",
    policy: str = "auto",
) -> tuple[Path, dict[str, Any]]:
    """The bundle's ONNX export from the engine store (keyed by bundle sha256, dtype, opset, exporter),
    exported on first use; onnxruntime and TensorRT share it."""
    from capsule_batch.backends.engine_store import bundle_identity

    expected = {"kind": "onnx", **bundle_identity(bundle), "dtype": dtype, "opset": opset, "exporter": exporter,
                "fp32_ops": [] if dtype == "fp32" else list(FP32_OPS)}

    def build(tmp: Path) -> tuple[str, dict[str, Any]]:
        import onnx

        export_onnx(bundle, tmp / "model.onnx", opset=opset, exporter=exporter, dtype=dtype)
        return "model.onnx", {"backend": "onnx", "backend_version": onnx.__version__,
                              "input": INPUT_NAME, "output": OUTPUT_NAME}

    return store.ensure(bundle, f"onnx-{dtype}-opset{opset}-{exporter}", expected, build, policy)
