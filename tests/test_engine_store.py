"""The engine store: build, list, load, stale/mismatch detection, corrupt files; the TensorRT build and run
logic against a stand-in `tensorrt` module (which flags for TensorRT 10 vs 11, profile shapes, timing
cache, meta.json refusal); and the real TensorRT parity test, which skips without TensorRT and a GPU."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from capsule_batch.backends import create_engine
from capsule_batch.backends.engine_store import EngineStore, default_root, mismatches
from capsule_batch.backends.trt_engine import PLAN_FILE, batch_profile, ensure_plan, trt_recipe
from capsule_batch.cli import cli
from capsule_batch.errors import EngineError
from capsule_batch.model.bundle import create_model, save_bundle
from capsule_batch.model.classes import CE24_CLASSES
from capsule_batch.model.preprocess import Preprocess

ARCH = "eva02_tiny_patch14_224"
ARGS = {"depth": 1, "img_size": 56}
GPU = {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0"}


def make_bundle(path, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model(ARCH, len(CE24_CLASSES), ARGS)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight, std=0.5)
    return save_bundle(path, model.state_dict(), arch=ARCH, class_names=list(CE24_CLASSES),
                       preprocess=Preprocess(input_size=56, resize=56), model_args=ARGS, overwrite=True)


def test_round_trip_build_list_load(tmp_path):
    bundle = make_bundle(tmp_path / "tiny")
    root = tmp_path / "engines"
    runner = CliRunner()
    res = runner.invoke(cli, ["engine", "build", "-m", str(bundle.path), "--backend", "onnxruntime",
                              "--device", "cpu", "--engine-dir", str(root), "--json"])
    assert res.exit_code == 0, res.output
    built = json.loads(res.stdout.strip().splitlines()[-1])
    assert built["backend"] == "onnxruntime" and os.path.isfile(built["artifact"])

    res = runner.invoke(cli, ["engine", "list", "--engine-dir", str(root), "--json", "--verify"])
    rows = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert len(rows) == 1 and rows[0]["status"] == "ok"
    meta = rows[0]
    assert meta["bundle_sha256"] == bundle.sha256 and meta["opset"] >= 17 and meta["dtype"] == "fp32"
    res = runner.invoke(cli, ["engine", "list", "--engine-dir", str(root)])
    assert "onnx-fp32-opset17-legacy" in res.stdout and res.stdout.rstrip().endswith("ok")

    # loading with rebuilding forbidden proves the stored entry is used as is
    engine = create_engine(bundle, backend="onnxruntime", device="cpu", store=EngineStore(root), rebuild="never")
    assert engine.meta["created"] == meta["created"] and engine.meta["sha256"] == meta["sha256"]
    x = torch.randn(3, 3, 56, 56)
    with torch.inference_mode():
        ref = bundle.create_model()(x)
    assert (engine.logits(x) - ref).abs().max() <= 1e-3

    res = runner.invoke(cli, ["engine", "list", "--engine-dir", str(tmp_path / "empty")])
    assert res.exit_code == 0 and "no engines" in res.stdout


def test_changed_bundle_is_refused_or_rebuilt(tmp_path, caplog):
    store = EngineStore(tmp_path / "engines")
    bundle = make_bundle(tmp_path / "tiny", seed=0)
    first = create_engine(bundle, backend="onnxruntime", device="cpu", store=store)
    changed = make_bundle(tmp_path / "tiny", seed=1)  # same folder, new weights
    assert changed.sha256 != bundle.sha256
    with pytest.raises(EngineError, match=r"stale engine, not loaded: bundle_sha256 is [0-9a-f]{12}\.\.\., needed"):
        create_engine(changed, backend="onnxruntime", device="cpu", store=store, rebuild="never")
    with caplog.at_level(logging.WARNING):
        rebuilt = create_engine(changed, backend="onnxruntime", device="cpu", store=store)
    assert any("stale engine" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    assert rebuilt.meta["bundle_sha256"] == changed.sha256 and rebuilt.meta["sha256"] != first.meta["sha256"]
    x = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        assert (rebuilt.logits(x) - changed.create_model()(x)).abs().max() <= 1e-3
    assert len(store.entries()) == 1  # replaced, not accumulated


def test_corrupt_engine_file_is_a_clear_error(tmp_path):
    store = EngineStore(tmp_path / "engines")
    bundle = make_bundle(tmp_path / "tiny")
    engine = create_engine(bundle, backend="onnxruntime", device="cpu", store=store)
    path = engine.onnx_path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(EngineError, match=r"model\.onnx: corrupt engine file: sha256 .* does not match meta\.json"):
        create_engine(bundle, backend="onnxruntime", device="cpu", store=store)
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(EngineError, match=r"corrupt engine file: 100 bytes"):
        create_engine(bundle, backend="onnxruntime", device="cpu", store=store)
    assert store.entries()[0]["status"].startswith("bad:")
    (path.parent / "meta.json").write_text("{not json")
    with pytest.raises(EngineError, match=r"meta\.json: not valid JSON"):
        create_engine(bundle, backend="onnxruntime", device="cpu", store=store)
    forced = create_engine(bundle, backend="onnxruntime", device="cpu", store=store, rebuild="force")
    assert forced.meta["bundle_sha256"] == bundle.sha256 and store.entries()[0]["status"] == "ok"


def test_store_root_and_mismatch_reasons(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPSULE_BATCH_ENGINES", str(tmp_path / "elsewhere"))
    assert default_root() == tmp_path / "elsewhere"
    monkeypatch.delenv("CAPSULE_BATCH_ENGINES")
    # from a checkout: its engines/ folder, wherever the command is started
    monkeypatch.chdir(tmp_path)
    assert default_root() == Path(__file__).resolve().parents[1] / "engines"
    reasons = mismatches({"gpu": GPU, "precision": "fp16"}, {"gpu": {**GPU, "capability": "8.0"}, "precision": "fp16"})
    assert len(reasons) == 1 and reasons[0].startswith("gpu is") and '"8.0"' in reasons[0]


# ---------------------------------------------------------------------------------------------
# TensorRT build logic against a stand-in module. It proves the code around TensorRT (flags per
# version, profile shapes, timing cache, store identity); it is not TensorRT and proves nothing about it.


def fake_tensorrt(version: str, calls: list, *, parse_ok: bool = True) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = version
    major = int(version.split(".")[0])

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Flags:
        pass

    flags = Flags()
    if major < 11:  # TensorRT 11 removed the precision builder flags
        flags.FP16, flags.BF16 = "FLAG_FP16", "FLAG_BF16"
    flags.TF32 = "FLAG_TF32"
    trt.Logger = Logger
    trt.BuilderFlag = flags
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

    class Cache:
        def __init__(self, data):
            self.data = data

        def serialize(self):
            return self.data + b"+timings"

    class Config:
        def __init__(self):
            self.cache = None

        def set_flag(self, flag):
            calls.append(("set_flag", flag))

        def clear_flag(self, flag):
            calls.append(("clear_flag", flag))

        def set_memory_pool_limit(self, pool, size):
            calls.append(("pool", pool, size))

        def add_optimization_profile(self, profile):
            calls.append(("profile", profile.shapes))

        def create_timing_cache(self, data):
            calls.append(("timing_cache_in", bytes(data)))
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            self.shapes = (name, mn, opt, mx)

    class Parser:
        def __init__(self, network, logger):
            self.num_errors = 0 if parse_ok else 1

        def parse_from_file(self, path):
            import onnx

            elem = onnx.load(path).graph.input[0].type.tensor_type.elem_type
            calls.append(("parse", {1: "fp32", 10: "fp16", 16: "bf16"}[elem]))
            return parse_ok

        def get_error(self, i):
            return "In node 7 (Softmax): unsupported"

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("network_flags", flags))
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"PLAN-" + version.encode()

    trt.Builder, trt.OnnxParser = Builder, Parser
    trt.DataType = types.SimpleNamespace(FLOAT="DT_FLOAT", HALF="DT_HALF", BF16="DT_BF16")
    trt.Runtime = lambda logger: FakeRuntime(calls, "DT_FLOAT" if major < 11 else "DT_HALF")
    return trt


def _view(ptr: int, shape: tuple, np_dtype) -> np.ndarray:
    """The array at a raw address, as the engine would see it."""
    count = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
    return np.frombuffer((ctypes.c_char * count).from_address(ptr), dtype=np_dtype).reshape(shape)


class FakeRuntime:
    """Deserializes to an 'engine' that computes per-channel means through the raw tensor addresses."""

    def __init__(self, calls, io_type):
        self.calls, self.io_type = calls, io_type

    def deserialize_cuda_engine(self, data):
        self.calls.append(("deserialize", bytes(data)))
        calls, io_type = self.calls, self.io_type

        class Context:
            def __init__(self):
                self.shape, self.addr = None, {}

            def set_input_shape(self, name, shape):
                self.shape = shape

            def set_tensor_address(self, name, ptr):
                self.addr[name] = ptr

            def get_tensor_shape(self, name):
                return (self.shape[0], 10)

            def execute_async_v3(self, stream):
                calls.append(("execute", self.shape, stream))
                np_type = np.float32 if io_type == "DT_FLOAT" else np.float16
                x = _view(self.addr["pixels"], self.shape, np_type)
                out = _view(self.addr["logits"], (self.shape[0], 10), np_type)
                out[:] = np.tile(x.mean(axis=(2, 3)), 4)[:, :10]
                return True

        return types.SimpleNamespace(get_tensor_dtype=lambda name: io_type, create_execution_context=Context)


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("trt") / "tiny")


def test_trt_recipe_per_version():
    calls: list = []
    # strongly typed on 10 and 11: the export's float type is the engine's; no deprecated weak-typing flags
    r10 = trt_recipe(fake_tensorrt("10.13.0", calls), "fp16")
    assert (r10.strongly_typed, r10.network_flags, r10.builder_flags, r10.onnx_dtype) == (True, 2, (), "fp16")
    assert trt_recipe(fake_tensorrt("10.13.0", calls), "bf16").onnx_dtype == "bf16"
    r32 = trt_recipe(fake_tensorrt("10.13.0", calls), "fp32")
    assert (r32.builder_flags, r32.cleared_flags, r32.onnx_dtype) == ((), ("TF32",), "fp32")  # fp32 is fp32, no TF32
    r11 = trt_recipe(fake_tensorrt("11.4.1", calls), "bf16")
    assert (r11.strongly_typed, r11.network_flags, r11.builder_flags, r11.onnx_dtype) == (True, 2, (), "bf16")
    with pytest.raises(EngineError, match="not supported"):
        trt_recipe(fake_tensorrt("8.6.1", calls), "fp16")
    assert batch_profile(512) == {"min": 1, "opt": 512, "max": 512}
    with pytest.raises(EngineError, match="opt batch 600"):
        batch_profile(512, 600)


@pytest.mark.parametrize("version,expect_flags,expect_net,expect_onnx", [
    ("10.13.0", [], 2, "fp16"),
    ("11.4.1", [], 2, "fp16"),
])
def test_trt_build_flags_profile_cache_and_meta(tmp_path, trt_bundle, version, expect_flags, expect_net,
                                                expect_onnx):
    calls: list = []
    trt = fake_tensorrt(version, calls)
    store = EngineStore(tmp_path / "engines")
    profile = batch_profile(256, 128)
    path, meta = ensure_plan(trt_bundle, store, trt, precision="fp16", profile=profile, gpu=GPU,
                             workspace_bytes=1 << 30)
    assert path.name == PLAN_FILE and path.read_bytes() == b"PLAN-" + version.encode()
    assert [c for c in calls if c[0] == "set_flag"] == expect_flags
    assert ("network_flags", expect_net) in calls and ("parse", expect_onnx) in calls
    assert ("profile", ("pixels", (1, 3, 56, 56), (128, 3, 56, 56), (256, 3, 56, 56))) in calls
    assert ("pool", "WORKSPACE", 1 << 30) in calls
    assert meta["gpu"] == GPU and meta["backend_version"] == version and meta["batch"] == profile
    assert meta["strongly_typed"] and meta["onnx_dtype"] == expect_onnx
    assert json.loads((path.parent / "meta.json").read_text())["sha256"] == meta["sha256"]
    caches = list((store.root / "timing-cache").iterdir())
    assert len(caches) == 1 and caches[0].read_bytes() == b"+timings"

    # up to date: loaded without building; a rebuild (--force) starts from the saved timing cache
    calls.clear()
    assert ensure_plan(trt_bundle, store, trt, precision="fp16", profile=profile, gpu=GPU)[1] == meta
    assert calls == []
    ensure_plan(trt_bundle, store, trt, precision="fp16", profile=profile, gpu=GPU, policy="force")
    assert ("timing_cache_in", b"+timings") in calls

    # another TensorRT version or GPU: refused with the reason, or rebuilt
    newer = fake_tensorrt(version.rsplit(".", 1)[0] + ".9", calls)
    with pytest.raises(EngineError, match=f"backend_version is {version}, needed"):
        ensure_plan(trt_bundle, store, newer, precision="fp16", profile=profile, gpu=GPU, policy="never")
    _, rebuilt = ensure_plan(trt_bundle, store, newer, precision="fp16", profile=profile, gpu=GPU)
    assert rebuilt["backend_version"] == newer.__version__
    meta_path = path.parent / "meta.json"
    doctored = json.loads(meta_path.read_text())
    doctored["gpu"] = {"name": "NVIDIA A100-SXM4-80GB", "capability": "8.0"}
    meta_path.write_text(json.dumps(doctored))
    with pytest.raises(EngineError, match="gpu is .*A100.*needed .*H100"):
        ensure_plan(trt_bundle, store, newer, precision="fp16", profile=profile, gpu=GPU, policy="never")


def test_trt_parser_errors_are_reported(tmp_path, trt_bundle):
    trt = fake_tensorrt("10.13.0", [], parse_ok=False)
    with pytest.raises(EngineError, match=r"ONNX parser failed: In node 7 \(Softmax\)"):
        ensure_plan(trt_bundle, EngineStore(tmp_path), trt, precision="fp16", profile=batch_profile(8), gpu=GPU)
    assert not any(tmp_path.glob("*/tensorrt-*"))  # a failed build leaves no entry behind


def test_trt_backend_refused_without_gpu(trt_bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.13.0", []))
    with pytest.raises(EngineError, match="backend tensorrt cannot run on cpu"):
        create_engine(trt_bundle, backend="tensorrt", device="cpu")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_cli_names_the_extra_for_a_missing_backend(trt_bundle, tmp_path):
    res = CliRunner().invoke(cli, ["engine", "build", "-m", str(trt_bundle.path), "--backend", "tensorrt",
                                   "--engine-dir", str(tmp_path)])
    assert res.exit_code == 1
    assert "pip install 'capsule-batch[tensorrt]'" in res.output and "Traceback" not in res.output


class FakeStream:
    """A CUDA stream stand-in that records the waits between streams (`log`: (waiting, waited for))."""

    def __init__(self, handle: int, log: list):
        self.cuda_stream, self.log = handle, log

    def wait_stream(self, other: FakeStream) -> None:
        self.log.append(("wait", self.cuda_stream, other.cuda_stream))


@pytest.mark.parametrize("version", ["10.13.0", "11.4.1"])
def test_trt_engine_runs_on_tensor_addresses(tmp_path, trt_bundle, monkeypatch, version):
    """The run path: shapes, addresses, dtype from the engine, stream handle, chunking, softmax. TensorRT runs on
    a stream of its own (not torch's current one: in a run that is the default stream, which TensorRT answers with
    extra device synchronisations), after torch's stream and before it."""
    import capsule_batch.backends.trt_engine as trt_engine

    calls: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, calls))
    monkeypatch.setattr(trt_engine, "gpu_info", lambda device: GPU)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    current = FakeStream(1234, calls)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream(5678, calls))
    engine = trt_engine.TensorRTEngine(trt_bundle, device=torch.device("cpu"), precision="fp16", max_batch=8,
                                       store=EngineStore(tmp_path))
    assert engine.dtype == (torch.float32 if version.startswith("10") else torch.float16)
    assert ("deserialize", b"PLAN-" + version.encode()) in calls
    x = torch.rand(11, 3, 56, 56)
    probs = engine.infer(x)
    expected = torch.softmax(x.to(engine.dtype).float().mean(dim=(2, 3)).repeat(1, 4)[:, :10], -1)
    assert probs.dtype == torch.float32 and probs.shape == (11, 10)
    assert torch.allclose(probs, expected, atol=2e-3)
    assert [c for c in calls if c[0] in ("execute", "wait")] == [
        ("wait", 5678, 1234), ("execute", (8, 3, 56, 56), 5678), ("wait", 1234, 5678),
        ("wait", 5678, 1234), ("execute", (3, 3, 56, 56), 5678), ("wait", 1234, 5678)]
    assert engine.describe()["profile"] == {"min": 1, "opt": 8, "max": 8}


# ---------------------------------------------------------------------------------------------
# Real TensorRT: runs only where TensorRT and a CUDA GPU exist (never on the development machines).


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT is not installed")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tensorrt_fp16_parity_with_eager_fp32(tmp_path, trt_bundle):
    x = torch.randn(1000, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = trt_bundle.create_model()(x).softmax(-1)
    engine = create_engine(trt_bundle, backend="tensorrt", device="cuda", precision="fp16", max_batch=256,
                           store=EngineStore(tmp_path))
    probs = engine.infer(x.cuda().to(engine.dtype)).cpu()
    agree = (probs.argmax(1) == ref.argmax(1)).float().mean().item()
    assert agree >= 0.999, agree
    assert (probs - ref).abs().max().item() <= 0.01
