"""The product's GPU paths, run on a fake CUDA device (tests/fake_cuda.py) through the entry points users call.

What these tests check: where tensors are (device), their dtypes and shapes, and the order and kind of the CUDA
calls (uploads pinned and non-blocking, waits on blocking events, graph capture then replay, NCCL's device rule).
They never check speed, and never the model's numbers: a value that crosses from the fake GPU to the host is a
deterministic stand-in (floats 1/C, so every probability row reads 1/10; integers 0; `.item()` 0). Tests that
rely on the stand-ins say so. What only a real GPU can check is listed in docs/gpu.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, TESTS, TINY_SIZE
from fake_cuda import FakeCuda, FakeCudaError, FakeEvent, FakeGraph, FakeStream
from fake_nccl import NcclRuleError
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorDeviceMismatchError

from capsule_batch.cli import cli
from capsule_batch.model.preprocess import Preprocess, preprocess_batch, reference_preprocess, seed_preprocess
from capsule_batch.sources.synthesize import synthesize
from capsule_batch.study.store import StudyReader

#: recordings bigger than the bundle's input, so that frames are resized on the (fake) GPU
FRAME = 96
STAND_IN_PROB = 0.1  # the harness's host value of a probability row over 10 classes (module docstring)


@pytest.fixture(scope="module")
def rec96(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("fake-cuda") / "study.mp4", 70, size=FRAME, seed=3).path


def _uploads(cuda: FakeCuda, dtype: torch.dtype) -> list[dict[str, Any]]:
    return [d for w, _, d in cuda.log if w == "to_device" and d.get("dtype") == dtype]


# ------------------------------------------------------------------------------------------------------------
# the harness itself: CUDA's rules hold, and nothing is left installed


def test_the_fake_device_keeps_cudas_rules() -> None:
    with FakeCuda(devices=2) as cuda:
        assert torch.cuda.is_available() and torch.cuda.device_count() == 2
        assert torch.cuda.get_device_name(0) == "NVIDIA H200" and torch.cuda.get_device_capability() == (9, 0)
        x = torch.ones(4, 3).to("cuda", non_blocking=True)
        assert isinstance(x, FakeTensor) and x.device == torch.device("cuda", 0)
        assert type(torch.ones(2)) is torch.Tensor  # CPU work stays real
        with pytest.raises(FakeTensorDeviceMismatchError):
            x + torch.ones(4, 3)  # a CPU tensor mixed into CUDA work
        with pytest.raises(TypeError, match="Use Tensor.cpu"):
            x.numpy()
        host = torch.empty((4, 3), pin_memory=True)
        assert host.is_pinned() and not torch.ones(1).is_pinned()
        host.copy_(x, non_blocking=True)
        assert np.allclose(host.numpy(), 1 / 3)  # the stand-in: 1/C along the last dimension
        with pytest.raises(FakeCudaError, match="invalid device ordinal"):
            torch.cuda.set_device(2)
        event = FakeEvent()
        event.record(torch.cuda.current_stream(0))
        with pytest.raises(FakeCudaError, match="does not match"):
            event.record(FakeStream(1))
        with pytest.raises(FakeCudaError, match="record_stream"):
            x.record_stream(FakeStream(1))
        graph = FakeGraph()
        default = torch.cuda.current_stream()
        with pytest.raises(FakeCudaError, match="default stream"), torch.cuda.graph(graph, stream=default):
            pass
        with pytest.raises(FakeCudaError, match="capturing"), torch.cuda.graph(graph, stream=FakeStream()):
            torch.cuda.synchronize()
        with pytest.raises(FakeCudaError, match="not captured"):
            graph.replay()
        assert cuda.count("to_host", via="copy_", pinned=True, non_blocking=True) == 1
    assert not torch.cuda.is_available()
    assert type(torch.ones(2) + 1) is torch.Tensor


# ------------------------------------------------------------------------------------------------------------
# capsule-batch run / bench on --device cuda


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_run_on_cuda_end_to_end(tiny_bundle: Any, rec96: Path, tmp_path: Path, precision: str) -> None:
    """`capsule-batch run --device cuda` with the torch backend (autocast, CUDA graphs: what `auto` builds on a
    GPU): frames go up as uint8 through pinned memory, are resized on the GPU, the graph is captured once and
    replayed per engine call, probabilities come back through pinned memory, and every wait is a blocking event.
    The study's probabilities are the harness's stand-ins (1/10 each)."""
    with FakeCuda() as cuda:
        res = CliRunner().invoke(cli, ["run", str(rec96), "--model", str(tiny_bundle.path), "-o", str(tmp_path),
                                       "--device", "cuda", "--engine", "torch", "--precision", precision,
                                       "--batch-size", "32", "--no-isolate"])
    assert res.exit_code == 0, res.output
    with StudyReader(tmp_path / "study.h5") as study:
        probs = study.probs()
        engine = study.attrs["engine"]
    engine = json.loads(engine) if isinstance(engine, str) else engine
    assert engine["device"] == "cuda:0" and engine["precision"] == precision and engine["cuda_graphs"]
    assert probs.shape == (70, 10) and np.allclose(probs, STAND_IN_PROB, atol=1e-3)  # stored as float16
    frames = _uploads(cuda, torch.uint8)
    # the run's three batches first (then the thumbnails' frames, read again: every frame is flagged here)
    assert [d["shape"] for d in frames[:3]] == [(32, FRAME, FRAME, 3), (32, FRAME, FRAME, 3), (6, FRAME, FRAME, 3)]
    assert all(d["shape"][1:] == (FRAME, FRAME, 3) for d in frames)
    assert all(d["pinned"] and d["non_blocking"] for d in frames)
    # no host-side resize: no float frames go up (only weights, and the mean and std once)
    assert not [d for d in _uploads(cuda, torch.float32) if d["shape"][-2:] == (TINY_SIZE, TINY_SIZE)]
    assert cuda.count("graph.capture_end") == 1 and cuda.count("graph.replay") == 3
    copies = cuda.entries("to_host")
    assert [d["shape"] for _, _, d in copies if d["via"] == "copy_"] == [(32, 10), (32, 10), (6, 10)]
    assert all(d["pinned"] and d["non_blocking"] for _, _, d in copies if d["via"] == "copy_")
    waits = cuda.entries("event.synchronize")
    assert waits and all(d["blocking"] and d["recorded"] for _, _, d in waits)  # asleep in the driver, never spin
    assert cuda.count("synchronize") == 1  # the graph capture's own; the run never waits for the whole device
    assert cuda.count("stream.synchronize") == 0


@pytest.mark.parametrize("options", [{"cast": True}, {"cast": True, "cuda_graphs": False}, {"cuda_graphs": False}],
                         ids=["cast-graphs", "cast-eager", "autocast-eager"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_torch_engine_variants_on_cuda(tiny_bundle: Any, precision: str, options: dict[str, Any]) -> None:
    from capsule_batch.backends.select import create_engine

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    with FakeCuda() as cuda:
        engine = create_engine(tiny_bundle, backend="torch", device="cuda", precision=precision,
                               max_batch=16, **options)
        params = {(p.device, p.dtype) for p in engine._module.parameters()}
        assert params == {(torch.device("cuda", 0), dtype if options.get("cast") else torch.float32)}
        out = engine.infer(torch.randn(20, 3, TINY_SIZE, TINY_SIZE).to("cuda"))  # 16 + a short batch of 4
        assert out.device == torch.device("cuda", 0) and out.dtype == torch.float32 and tuple(out.shape) == (20, 10)
        graphs = cuda.count("graph.capture_end")
        # CUDA graphs are on by default on a GPU (what `auto` builds)
        assert graphs == (1 if options.get("cuda_graphs", True) else 0) and cuda.count("graph.replay") == 2 * graphs
        described = engine.describe()
    assert described["cast"] == bool(options.get("cast")) and described["autocast"] == (not options.get("cast"))


def test_fp32_on_cuda_turns_tf32_off_only_inside_its_calls(tiny_bundle: Any) -> None:
    from capsule_batch.backends.select import create_engine

    seen = []
    with FakeCuda():
        engine = create_engine(tiny_bundle, backend="torch", device="cuda", precision="fp32",
                               max_batch=8, cuda_graphs=False)
        hook = engine._module.register_forward_hook(
            lambda *_: seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)))
        engine.infer(torch.randn(3, 3, TINY_SIZE, TINY_SIZE).to("cuda"))
        hook.remove()
        assert engine.describe()["tf32"] is False
    assert seen == [(False, False)]
    assert torch.backends.cudnn.allow_tf32  # restored after the call


@pytest.mark.parametrize("graphs", ["--cuda-graphs", "--no-cuda-graphs"])
def test_bench_stages_on_cuda(tiny_bundle: Any, tmp_path: Path, graphs: str) -> None:
    """`capsule-batch bench --stage all` on cuda: decode, engine and e2e run, and the engine's clock is read only
    after the device is synchronised (the figures themselves are not speed here)."""
    with FakeCuda() as cuda:
        res = CliRunner().invoke(cli, ["bench", "-m", str(tiny_bundle.path), "--device", "cuda", "--engine", "torch",
                                       "--precision", "fp16", "--stage", "all", "--frames", "48", "--batch-size", "16",
                                       "--warmup", "1", "--repeats", "2", "--workdir", str(tmp_path), graphs])
    assert res.exit_code == 0, res.output
    lines = [json.loads(t) for t in res.output.splitlines() if t.startswith("{")]
    assert {ln["stage"] for ln in lines} == {"decode", "engine", "e2e"}
    assert all(ln["config"]["device"] == "cuda:0" and ln["config"]["device_name"] == "NVIDIA H200" for ln in lines)
    assert all(ln["config"]["cuda_graphs"] == (graphs == "--cuda-graphs") for ln in lines)
    assert (cuda.count("graph.capture_end") >= 1) == (graphs == "--cuda-graphs")
    assert cuda.count("synchronize") >= 2  # before and after the timed engine calls


def test_gpu_suite_torch_parts_on_cuda(tmp_path: Path) -> None:
    """benchmarks/gpu_suite.py's torch parts on cuda (engine grid fp16/bf16 x eager/graphs, check, e2e, decode):
    every part runs without an error line. Its correctness check compares the stand-ins with a real CPU reference,
    so its verdict here is meaningless and not asserted."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_suite
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    out = tmp_path / "out.jsonl"
    args = ["--device", "cuda", "--backend", "torch", "--arch", "eva02_tiny_patch14_224", "--frames", "64",
            "--model-args", '{"img_size": 56, "depth": 2}', "--precisions", "fp16,bf16", "--modes", "eager,graphs",
            "--batch-sizes", "16", "--check-precisions", "fp16", "--sample", "16", "--check-frames", "32",
            "--e2e-batch", "16", "--warmup", "1", "--repeats", "2", "--workdir", str(tmp_path / "w"), "--out", str(out)]
    with FakeCuda():
        gpu_suite.main(args)
    lines = [json.loads(t) for t in out.read_text().splitlines()]
    assert not [ln for ln in lines if ln.get("error")], [ln["error"] for ln in lines if ln.get("error")]
    parts = {ln["part"] for ln in lines}
    assert {"env", "engine", "check", "e2e", "decode"} <= parts
    grid = {(ln.get("precision"), ln.get("mode")) for ln in lines if ln["part"] == "engine"}
    assert {("fp16", "eager"), ("fp16", "graphs"), ("bf16", "eager"), ("bf16", "graphs")} <= grid


# ------------------------------------------------------------------------------------------------------------
# decoding on the GPU: uint8 up, resize and normalise on the device, the same numbers as the CPU path


@pytest.mark.parametrize("pre", [seed_preprocess(TINY_SIZE), Preprocess(input_size=TINY_SIZE, resize=64)],
                         ids=["seed-bicubic", "antialiased-crop"])
def test_gpu_preprocessing_uploads_uint8_then_resizes_on_the_device(pre: Preprocess) -> None:
    from capsule_batch.sources.base import to_pixels

    frames = np.random.default_rng(0).integers(0, 256, (8, FRAME, FRAME, 3), dtype=np.uint8)
    with FakeCuda() as cuda:
        pixels = to_pixels(frames, pre, torch.device("cuda", 0), torch.float16)
        assert pixels.device == torch.device("cuda", 0) and pixels.dtype == torch.float16
        assert tuple(pixels.shape) == (8, 3, TINY_SIZE, TINY_SIZE)
    uploads = [d for w, _, d in cuda.log if w == "to_device" and d["shape"][0] == 8]  # (the rest: mean and std)
    assert uploads == [{"shape": (8, FRAME, FRAME, 3), "dtype": torch.uint8, "pinned": True, "non_blocking": True}]
    # the decode thread waits for its own side stream on a blocking event, not the engine's stream
    assert [d["blocking"] for _, _, d in cuda.entries("event.synchronize")] == [True]
    assert cuda.count("synchronize") == 0 and cuda.count("stream.synchronize") == 0


@pytest.mark.parametrize("pre", [seed_preprocess(TINY_SIZE), Preprocess(input_size=TINY_SIZE, resize=64)],
                         ids=["seed-bicubic", "antialiased-crop"])
def test_the_gpu_resize_path_matches_the_reference(pre: Preprocess) -> None:
    """The numbers of the path a GPU takes (float resize, one rounding), run on the CPU with float frames, against
    the reference (PIL / the fixed-kernel numpy resize): within one uint8 level."""
    frames = np.random.default_rng(1).integers(0, 256, (4, FRAME, FRAME, 3), dtype=np.uint8)
    got = preprocess_batch(torch.from_numpy(frames).float(), pre).numpy()
    ref = np.stack([reference_preprocess(f, pre) for f in frames])
    level = 1 / 255 / min(pre.std)
    assert np.abs(got - ref).max() <= level + 1e-5


# ------------------------------------------------------------------------------------------------------------
# training on cuda: AMP, GradScaler, DDP under NCCL's rules, adapt


def _ce24(root: Path) -> Path:
    from train.synthetic_ce24 import make_ce24_folder

    make_ce24_folder(root, per_class=4, recordings=2, size=48, xlsx=False)
    return root


def _train_args(root: Path, run_dir: Path) -> list[str]:
    return ["model.arch=eva02_tiny_patch14_224", "model.model_args={depth: 1, img_size: 32, patch_size: 8}",
            "model.init=random", "data.input_size=32", "data.resize=32", "run.workers=0", "run.device=cuda",
            f"data.train=[{{kind: ce24, root: '{root}', split: training}}]",
            f"data.val=[{{kind: ce24, root: '{root}', split: validation}}]", "data.leakage_check=false",
            f"run.dir={run_dir}", "train.epochs=2", "train.batch_size=8", "train.eval_batch_size=8",
            "train.samples_per_epoch=16"]


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_training_on_cuda_with_amp(tmp_path: Path, stage: str) -> None:
    """`run.precision=auto` on cuda is fp16 autocast with a GradScaler; the model, its gradients and the optimizer
    state live on the GPU; the bundle is written. Losses and metrics are the stand-ins (loss 0, uniform
    probabilities), so only the run's shape is asserted."""
    from capsule_batch.model.bundle import ModelBundle
    from train.config import load_config
    from train.trainer import run_training

    root = _ce24(tmp_path / "ce24")
    with FakeCuda() as cuda:
        summary = run_training(load_config(None, _train_args(root, tmp_path / "run")), stage)
    assert summary["epochs"] == [0, 1]
    history = [json.loads(t) for t in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2  # its sums are on the GPU now: stand-ins on the host (0), not asserted
    assert cuda.count("backward") == 4  # 2 steps of 8 per epoch
    batches = [d for w, _, d in cuda.log if w == "to_device" and d.get("shape", (0,))[0] == 8 and len(d["shape"]) == 4]
    assert batches and all(d["non_blocking"] for d in batches)
    ModelBundle.load(summary["bundle"]).create_model()


def test_ddp_two_ranks_on_cuda_follow_nccls_rules(tmp_path: Path) -> None:
    """torchrun with 2 ranks, each on its own fake GPU, process group `nccl` (NCCL's device rule over real gloo):
    every collective gets CUDA tensors of the rank's device. Before the fix, the epoch's sums were a CPU tensor and
    the first all_reduce failed exactly as NCCL does."""
    root = _ce24(tmp_path / "ce24")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TESTS / "run_with_fake_cuda.py"), "-m", "train", "finetune", *_train_args(root, tmp_path / "run")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = [json.loads(t) for t in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [h["world_size"] for h in history] == [2, 2]


def test_nccl_rule_refuses_what_nccl_refuses() -> None:
    """The rule the DDP test relies on, shown directly (the check comes before any process group is needed)."""
    import contextlib

    import fake_nccl

    with FakeCuda(devices=2) as cuda, contextlib.ExitStack() as stack:
        state = fake_nccl.install(cuda, stack)
        state["backend"] = "nccl"  # as after init_process_group("nccl")
        with pytest.raises(NcclRuleError, match="device type cpu"):
            torch.distributed.all_reduce(torch.zeros(3, dtype=torch.float64))
        torch.distributed.all_reduce(torch.zeros(3, dtype=torch.float64, device="cuda:0"))
        with pytest.raises(NcclRuleError, match="current device is cuda:0"):
            torch.distributed.all_reduce(torch.zeros(3, device="cuda:1"))
        torch.cuda.set_device(1)
        torch.distributed.all_reduce(torch.zeros(3, device="cuda:1"))


def test_adapt_on_cuda(tmp_path: Path) -> None:
    """`python -m train adapt` on cuda: frames decoded by the product's sources go to the GPU, the student trains
    under fp16 autocast against the frozen teacher, the adapted bundle is written (weights: stand-ins)."""
    from test_train_adapt import FAST, _tiny_bundle

    from capsule_batch.model.bundle import ModelBundle
    from train import adapt as A
    from train.config import load_config

    video = synthesize(tmp_path / "hospital_a.mp4", 96, size=FRAME, seed=11).path
    start = _tiny_bundle(tmp_path / "start", 0)
    args = [f"model.init={start}", f"adapt.recordings=['{video}']", f"run.dir={tmp_path / 'run'}", *FAST,
            "train.epochs=1", "run.device=cuda"]
    with FakeCuda() as cuda:
        summary = A.run_adapt(load_config(None, args))
    assert cuda.count("backward") == 1 + 4  # freeze_off_path's probe, then 64 frames in batches of 16
    assert len((tmp_path / "run" / "history.jsonl").read_text().splitlines()) == 1
    ModelBundle.load(summary["bundle"]).create_model()


def test_each_torchrun_rank_runs_on_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from capsule_batch.run.runner import run_device

    monkeypatch.setenv("LOCAL_RANK", "1")
    with FakeCuda(devices=2):
        assert run_device("auto") == torch.device("cuda", 1)
        assert run_device("cuda:0") == torch.device("cuda", 0)  # an explicit device is kept


def test_env_and_device_choice_on_a_gpu_machine() -> None:
    """`capsule-batch env` on a GPU machine lists the GPU, and says what has run on a real GPU and on the fake one;
    `--device auto` is the first GPU; a GPU that is not there is a clear error."""
    from capsule_batch.devices import resolve_device
    from capsule_batch.errors import CapsuleError

    with FakeCuda():
        text = CliRunner().invoke(cli, ["env"]).output
        assert resolve_device("auto") == torch.device("cuda", 0)
        with pytest.raises(CapsuleError, match="only 1 CUDA device"):
            resolve_device("cuda:1")
    assert "cuda:0 NVIDIA H200 (sm 9.0, 141.0 GiB)" in text
    assert "on a real GPU: nothing yet" in text and "on a fake CUDA device: every torch-side GPU path" in text
    assert "on a real GPU: nothing yet" in CliRunner().invoke(cli, ["env"]).output  # said on a CPU machine too


def test_the_coverage_figure_finds_gpu_only_lines(tmp_path: Path) -> None:
    """tests/gpu_coverage.py counts the statements of CUDA-only branches and every torch.cuda call, nothing else."""
    from gpu_coverage import gpu_only_lines

    src = tmp_path / "m.py"
    src.write_text(
        "import torch\n"                                  # 1
        "def f(x, device):\n"                             # 2
        "    y = x + 1\n"                                 # 3
        "    if device.type == 'cuda':\n"                 # 4
        "        y = y.pin_memory()\n"                    # 5
        "        z = 2\n"                                 # 6
        "    if device.type != 'cuda':\n"                 # 7
        "        return y\n"                              # 8
        "    else:\n"                                     # 9
        "        torch.cuda.synchronize()\n"              # 10
        "    s = torch.cuda.Stream()\n"                   # 11
        "    return y\n",                                 # 12
        encoding="utf-8")
    assert gpu_only_lines(src) == {5, 6, 10, 11}


def test_graph_capture_out_of_memory_backs_off_to_half_the_batch(tiny_bundle: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Capturing the CUDA graph at max_batch runs out of device memory once (torch's own error type): the engine
    frees the cache, halves its batch and captures again; runs then go in calls of the smaller batch."""
    from capsule_batch.backends.select import create_engine
    from capsule_batch.backends.torch_engine import TorchEngine

    real, failed = TorchEngine._capture, []

    def capture_once_oom(self: TorchEngine) -> None:
        if not failed:
            failed.append(self.max_batch)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        real(self)

    monkeypatch.setattr(TorchEngine, "_capture", capture_once_oom)
    with FakeCuda() as cuda:
        engine = create_engine(tiny_bundle, backend="torch", device="cuda", precision="fp16", max_batch=16)
        out = engine.infer(torch.randn(20, 3, TINY_SIZE, TINY_SIZE).to("cuda"))
    assert failed == [16] and engine.max_batch == 8 and tuple(out.shape) == (20, 10)
    assert cuda.count("empty_cache") == 1 and cuda.count("graph.capture_end") == 1 and cuda.count("graph.replay") == 3
