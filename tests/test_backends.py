"""Engines on CPU: registry and `auto` order, precision rules, parity against eager fp32 torch, ONNX
export checks, and the out-of-memory back-off."""

from __future__ import annotations

import importlib.util
import logging
import warnings

import pytest
import torch

from capsule_batch.backends import BACKENDS, create_engine
from capsule_batch.backends.base import Engine, is_out_of_memory
from capsule_batch.backends.engine_store import EngineStore
from capsule_batch.backends.onnx_export import check_onnx, export_onnx, onnx_opset
from capsule_batch.backends.ort_engine import OrtEngine
from capsule_batch.backends.select import AUTO_ORDER, choose_backend
from capsule_batch.backends.torch_engine import TorchEngine
from capsule_batch.backends.trt_engine import TensorRTEngine
from capsule_batch.errors import EngineError, MissingPackageError
from capsule_batch.model.bundle import create_model, save_bundle
from capsule_batch.model.classes import CE24_CLASSES
from capsule_batch.model.preprocess import Preprocess

ARCH = "eva02_tiny_patch14_224"
ARGS = {"depth": 2, "img_size": 56}


def make_bundle(path, seed: int = 0):
    """A 2-block EVA-02 at 56 px whose head is scaled up, so logits are O(10), not O(0.01)."""
    torch.manual_seed(seed)
    model = create_model(ARCH, len(CE24_CLASSES), ARGS)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight, std=0.5)
        model.head.bias.zero_()
    return save_bundle(path, model.state_dict(), arch=ARCH, class_names=list(CE24_CLASSES),
                       preprocess=Preprocess(input_size=56, resize=56), model_args=ARGS, overwrite=True)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return EngineStore(tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="module")
def inputs():
    return torch.randn(400, 3, 56, 56, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(bundle, inputs):
    with torch.inference_mode():
        return bundle.create_model()(inputs)


def test_registry_and_auto_order(monkeypatch):
    assert {"torch", "onnxruntime", "tensorrt"} <= set(BACKENDS.names())
    # on a CPU the measured choice (test_cpu_choice.py) decides auto/fp32/bf16; the order serves fp16 only
    assert AUTO_ORDER[0] == ("tensorrt", "cuda")
    assert [b for b, d in AUTO_ORDER if d == "cpu"] == ["torch", "onnxruntime"]
    assert choose_backend("cpu") == "torch"
    monkeypatch.setattr(TorchEngine, "requires", (("no_such_package_xyz", "torch"),))
    assert choose_backend("cpu") == "onnxruntime"
    monkeypatch.setattr(TorchEngine, "requires", ())
    monkeypatch.setattr(TensorRTEngine, "requires", ())
    assert choose_backend("cuda") == "tensorrt"
    monkeypatch.setattr(TensorRTEngine, "requires", (("no_such_package_xyz", "tensorrt"),))
    assert choose_backend("cuda") == "torch"


def test_missing_package_names_the_extra(bundle, monkeypatch):
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(MissingPackageError, match=r"capsule-batch\[tensorrt\]"):
            create_engine(bundle, backend="tensorrt", device="cpu")
    monkeypatch.setattr(OrtEngine, "requires", (("no_such_package_xyz", "onnx"),))
    with pytest.raises(MissingPackageError, match=r"no_such_package_xyz.*capsule-batch\[onnx\]"):
        create_engine(bundle, backend="onnxruntime", device="cpu")
    ok, why = OrtEngine.available()
    assert not ok and "capsule-batch[onnx]" in why


@pytest.mark.cpu_choice
def test_precision_and_device_rules(bundle, store):
    auto = create_engine(bundle, backend="torch", device="cpu")  # fp32, or bf16 where the CPU choice picks it
    assert auto.precision == (auto.choice["precision"] if auto.choice else "fp32")
    with pytest.raises(EngineError, match="runs fp32, int8, not bf16"):
        create_engine(bundle, backend="onnxruntime", device="cpu", precision="bf16", store=store)
    with pytest.raises(EngineError, match="runs fp32, bf16, fp16, not int8"):
        create_engine(bundle, backend="torch", device="cpu", precision="int8")
    with pytest.raises(EngineError, match="unknown precision"):
        create_engine(bundle, backend="torch", device="cpu", precision="int4")
    with pytest.raises(EngineError, match="unknown backend"):
        create_engine(bundle, backend="jax", device="cpu")
    ok, why = TensorRTEngine.supports("cpu")
    assert not ok and "cuda" in why
    with pytest.raises(EngineError, match="CUDA graphs need a CUDA device"):
        create_engine(bundle, backend="torch", device="cpu", cuda_graphs=True)


def test_torch_fp32_is_exact_eager(bundle, inputs, reference):
    engine = create_engine(bundle, backend="torch", device="cpu", precision="fp32", max_batch=64)
    assert engine.dtype == torch.float32 and engine.device == torch.device("cpu")
    probs = engine.infer(inputs[:100])  # chunks of 64 and 36
    assert probs.shape == (100, len(CE24_CLASSES)) and probs.dtype == torch.float32
    # eager at the same chunks: the same kernels, so the same numbers on any CPU (see test_torch_compile_path)
    with torch.inference_mode():
        model = bundle.create_model()
        eager = torch.cat([model(inputs[:64]), model(inputs[64:100])]).softmax(-1)
    assert torch.allclose(probs, eager, atol=1e-6, rtol=0)
    assert torch.allclose(probs, reference[:100].softmax(-1), atol=1e-4, rtol=0)  # and any batch, to fp32 noise
    assert reference.abs().max() > 5, "the test head must give logits that are not tiny"
    assert engine.describe()["backend"] == "torch"


def test_onnxruntime_matches_eager_fp32(bundle, store, inputs, reference):
    engine = create_engine(bundle, backend="onnxruntime", device="cpu", precision="auto", max_batch=32,
                           store=store, threads=1)
    assert engine.precision == "fp32" and engine.describe()["artifact"].endswith("model.onnx")
    logits = torch.cat([engine.logits(inputs[i:i + 32]) for i in range(0, 96, 32)])
    assert (logits - reference[:96]).abs().max().item() <= 1e-3
    probs = engine.infer(inputs[:70])  # 70 is not a multiple of max_batch: chunked
    assert probs.shape == (70, 10)
    assert (probs - reference[:70].softmax(-1)).abs().max().item() <= 1e-4
    assert (probs.argmax(1) == reference[:70].argmax(1)).all()


def test_torch_bf16_top1_agreement(bundle, inputs, reference):
    engine = create_engine(bundle, backend="torch", device="cpu", precision="bf16", max_batch=200)
    assert engine.dtype == torch.bfloat16 and engine.describe()["autocast"]
    probs = engine.infer(inputs)
    agree = (probs.argmax(1) == reference.argmax(1)).float().mean().item()
    assert agree >= 0.99, agree


def test_onnx_export_interface(bundle, tmp_path):
    path = export_onnx(bundle, tmp_path / "m.onnx", dtype="fp16")  # what TensorRT 11 parses
    proto = check_onnx(path)
    assert onnx_opset(proto) >= 17
    assert proto.graph.input[0].type.tensor_type.elem_type == 10  # FLOAT16
    assert not proto.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    with pytest.raises(EngineError, match="opset 13 is too old"):
        export_onnx(bundle, tmp_path / "old.onnx", opset=13)
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(EngineError, match="junk.onnx: not a valid ONNX model"):
        check_onnx(tmp_path / "junk.onnx")


def test_half_export_keeps_layernorm_and_softmax_in_fp32(bundle, tmp_path, inputs, reference):
    """TensorRT 11 builds strongly typed networks: each op runs in the type the graph gives it. The fp16 export
    casts every LayerNormalization's and Softmax's inputs to fp32 and its result back (as torch's autocast keeps
    them fp32), and everything else stays fp16; ONNX Runtime runs the graph as it is, close to eager fp32."""
    import onnx
    import onnxruntime as ort

    path = export_onnx(bundle, tmp_path / "h.onnx", dtype="fp16")
    graph = onnx.load(str(path)).graph
    made_by = {o: n for n in graph.node for o in n.output}
    kept = [n for n in graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert {n.op_type for n in kept} == {"LayerNormalization", "Softmax"}  # 5 and 2 in this 2-block model
    for node in kept:
        for name in [i for i in node.input if i]:
            cast = made_by[name]
            assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT, (node.name, name)
        users = [n for n in graph.node if node.output[0] in n.input]
        assert [(u.op_type, u.attribute[0].i) for u in users] == [("Cast", onnx.TensorProto.FLOAT16)]
    matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    assert matmuls and not any(made_by.get(i) is not None and made_by[i].op_type == "Cast"
                               and made_by[i].attribute[0].i == onnx.TensorProto.FLOAT
                               for n in matmuls for i in n.input)  # the products stay half
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {"pixels": inputs[:64].half().numpy()})[0]).float()
    assert (out.argmax(1) == reference[:64].argmax(1)).all()
    assert (out - reference[:64]).abs().max().item() <= 0.05  # fp16 rounding of logits of scale ~10


def test_dynamo_exporter_matches(bundle, tmp_path, inputs, reference):
    import onnxruntime as ort

    path = export_onnx(bundle, tmp_path / "d.onnx", exporter="dynamo")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"pixels": inputs[:5].numpy()})[0]
    assert abs(out - reference[:5].numpy()).max() <= 1e-3


class FlakyEngine(Engine):
    """Behaves like a GPU engine that runs out of memory above `limit` frames."""

    name = "flaky"

    def __init__(self, bundle, limit: int, error: BaseException | None = None, **kw):
        super().__init__(bundle, device=torch.device("cpu"), precision="fp32", **kw)
        self.limit, self.error, self.calls = limit, error, []

    @property
    def dtype(self):
        return torch.float32

    def logits(self, pixels):
        self.calls.append(int(pixels.shape[0]))
        if pixels.shape[0] > self.limit:
            raise self.error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return pixels.mean(dim=(2, 3)).repeat(1, 4)[:, :10]


def test_out_of_memory_backs_off_and_says_so(bundle, caplog):
    x = torch.randn(21, 3, 56, 56)
    engine = FlakyEngine(bundle, limit=5, max_batch=16)
    with caplog.at_level(logging.WARNING):
        probs = engine.infer(x)
        engine.infer(x)
    expected = torch.softmax(x.mean(dim=(2, 3)).repeat(1, 4)[:, :10], -1)
    assert torch.allclose(probs, expected)
    assert engine.max_batch == 4
    assert engine.calls[:3] == [16, 8, 4]
    warnings = [r for r in caplog.records if "ran out of memory" in r.getMessage()]
    assert len(warnings) == 1 and "continuing with batch" in warnings[0].getMessage()


def test_illegal_memory_access_is_never_retried(bundle):
    err = RuntimeError("CUDA error: an illegal memory access was encountered")
    engine = FlakyEngine(bundle, limit=0, error=err, max_batch=8)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        engine.infer(torch.randn(8, 3, 56, 56))
    assert engine.calls == [8] and engine.max_batch == 8
    assert not is_out_of_memory(RuntimeError("out of memory after an illegal memory access"))
    assert is_out_of_memory(RuntimeError("Failed to allocate memory for requested buffer of size 123"))
    with pytest.raises(torch.OutOfMemoryError):  # batch 1 cannot shrink further
        FlakyEngine(bundle, limit=0, max_batch=1).infer(torch.randn(1, 3, 56, 56))


@pytest.mark.cpu_choice
def test_wrong_input_shape_is_refused(bundle):
    engine = create_engine(bundle, backend="torch", device="cpu")
    with pytest.raises(EngineError, match=r"expected pixels \(N, 3, 56, 56\)"):
        engine.infer(torch.randn(2, 3, 64, 64))
    assert engine.infer(torch.randn(0, 3, 56, 56)).shape == (0, 10)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_torch_cuda_precisions_and_graphs(bundle, inputs, reference):
    ref = reference.softmax(-1)
    fp32 = create_engine(bundle, backend="torch", device="cuda", precision="fp32", max_batch=128)
    assert (fp32.infer(inputs.cuda()).cpu() - ref).abs().max() <= 1e-4
    for prec in ("bf16", "fp16"):
        for graphs in (False, True):
            eng = create_engine(bundle, backend="torch", device="cuda", precision=prec, max_batch=128,
                                cuda_graphs=graphs)
            probs = eng.infer(inputs.cuda().to(eng.dtype)).cpu()
            assert (probs.argmax(1) == ref.argmax(1)).float().mean() >= 0.99


def test_an_engine_on_cuda_n_makes_gpu_n_current(bundle, monkeypatch):
    """cudaSetDevice is per thread: without it, on every torchrun rank but 0, the engine's result events and CUDA
    graph captures would be made on GPU 0. The decode thread's side stream is made on its GPU too."""
    import capsule_batch.devices as devices

    calls: list = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    Engine(bundle, device=torch.device("cuda", 3), precision="fp16", max_batch=4)
    assert calls == [("set_device", 3)]
    Engine(bundle, device=torch.device("cpu"), precision="fp32", max_batch=4)
    assert calls == [("set_device", 3)]  # nothing for a CPU engine

    made: list = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: made.append(device) or object())
    monkeypatch.setattr(devices, "_local", __import__("threading").local())
    first = devices.side_stream(torch.device("cuda", 2))
    assert devices.side_stream(torch.device("cuda", 2)) is first  # one per thread and GPU
    assert calls[1:] == [("set_device", 2), ("set_device", 2)] and made == [torch.device("cuda", 2)]


def test_fp32_engines_run_with_tf32_off_on_cuda():
    """torch lets cuDNN convolutions (EVA-02's patch embedding) use TF32 by default: an fp32 engine is the parity
    reference, so its calls run with TF32 off for convolutions and matrix products, and the flags come back."""
    from capsule_batch.backends.torch_engine import TorchEngine

    assert torch.backends.cudnn.allow_tf32  # torch's default, the reason for this
    before = torch.backends.cuda.matmul.allow_tf32
    with TorchEngine.numerics("cuda", "fp32", torch.float32):
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32 == before
    with TorchEngine.numerics("cpu", "fp32", torch.float32):
        assert torch.backends.cudnn.allow_tf32  # a CPU has no TF32: left alone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available ... Disabling autocast" on a machine without one
        assert isinstance(TorchEngine.numerics("cuda", "fp16", torch.float16), torch.autocast)


def test_auto_on_cuda_is_what_the_gpu_suite_measures_as_run(bundle, monkeypatch):
    """`run` with nothing given on a GPU: the torch backend (no TensorRT here) in fp16 with CUDA graphs, batch 256
    (backends.select.CUDA_AUTO_OPTIONS / AUTO_BATCH_SIZE); an option given explicitly wins."""
    import capsule_batch.backends.select as select
    from capsule_batch.backends.torch_engine import TorchEngine
    from capsule_batch.cli.options import resolve_batch_size

    built: list = []

    class Built(Exception):
        pass

    def record(self, bundle, **kw):
        built.append(kw)
        raise Built

    monkeypatch.setattr(select, "resolve_device", lambda spec: torch.device("cuda", 0))
    monkeypatch.setattr(TensorRTEngine, "requires", (("no_such_package_xyz", "tensorrt"),))
    monkeypatch.setattr(TorchEngine, "__init__", record)
    for kwargs in ({}, {"cuda_graphs": False}):
        with pytest.raises(Built):
            create_engine(bundle, device="cuda", **kwargs)
    assert built == [{"device": torch.device("cuda", 0), "precision": "fp16", "max_batch": 64, "cuda_graphs": True},
                     {"device": torch.device("cuda", 0), "precision": "fp16", "max_batch": 64, "cuda_graphs": False}]
    assert resolve_batch_size(None, "cpu") == 64 and resolve_batch_size(32, "cpu") == 32
    monkeypatch.setattr("capsule_batch.run.runner.run_device", lambda spec: torch.device("cuda", 1))
    assert resolve_batch_size(None, "auto") == 256 and resolve_batch_size(16, "auto") == 16


def test_a_compiled_engine_compiles_when_built_and_never_in_a_run(bundle, inputs):
    """torch.compile compiles on the first call and again for each new shape (the shorter last batch): inside a
    run that is a call the engine watch may end at --engine-timeout. So it compiles while the engine is built and
    pads every call to max_batch."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    engine = create_engine(bundle, backend="torch", device="cpu", precision="fp32", max_batch=8, compile=True,
                           compile_options={"backend": "eager", "dynamic": False})
    compiled = counters["stats"]["unique_graphs"]
    assert compiled >= 1  # compiled while it was built
    probs = engine.infer(inputs[:11])  # calls of 8 and 3 frames
    assert counters["stats"]["unique_graphs"] == compiled  # the call of 3 did not compile again
    with torch.inference_mode():
        model = bundle.create_model()
        eager = torch.cat([model(inputs[:8]), model(inputs[8:11])]).softmax(-1)
    assert torch.allclose(probs, eager, atol=1e-5, rtol=0)  # the padding rows are not in the result


def test_torch_compile_path(bundle, inputs, reference):
    # dynamo traces the model for real; the "eager" compiler backend skips Inductor's minutes of codegen on CPU
    engine = create_engine(bundle, backend="torch", device="cpu", precision="fp32", max_batch=8, compile=True,
                           compile_options={"backend": "eager", "dynamic": False})
    probs = engine.infer(inputs[:8])
    assert engine.describe()["compile"]
    # Against eager at the same batch: fp32 GEMM kernels are chosen by shape, and a batch of 8 and one of 400
    # round differently on some CPUs (oneDNN on Intel AMX machines: > 1e-6 in probabilities). A wrong trace
    # differs by orders of magnitude more than 1e-5.
    with torch.inference_mode():
        eager = bundle.create_model()(inputs[:8]).softmax(-1)
    assert torch.allclose(probs, eager, atol=1e-5, rtol=0)
