"""Shared fixtures: a tiny bundle, small synthetic recordings, and the test source/engine names.

SOURCE/ENGINE are the real CPU implementations the pipeline tests run through; the stand-ins in
capsule_doubles.py remain for what real parts cannot do on demand (a slow engine to interrupt a run
mid-way, a source that raises).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import capsule_doubles  # noqa: F401  (registers the stand-ins)
import pytest

SOURCE = "decord"
ENGINE = "torch"
#: the stand-in engine that sleeps CAPSULE_TEST_ENGINE_DELAY seconds per call, so that a subprocess can be
#: killed or interrupted mid-run; keep it when ENGINE switches to the real one
SLOW_ENGINE = "test-torch"
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TINY_ARCH = "eva02_tiny_patch14_224"
TINY_ARGS = {"img_size": 56, "depth": 2}
TINY_SIZE = 56


def hardware_skips() -> dict[str, str]:
    """marker -> why tests with it cannot run here: `gpu` without a CUDA GPU, `dali` without a usable DALI,
    `tensorrt` without the TensorRT package. Applied to every test carrying the marker (collection below)."""
    import importlib.util

    import torch

    from capsule_batch.sources.dali import DaliSource

    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = "needs a CUDA GPU (none is visible)"
    ok, why = DaliSource.available()
    if not ok:
        skips["dali"] = f"needs DALI: {why}"
    if importlib.util.find_spec("tensorrt") is None:
        skips["tensorrt"] = "needs the TensorRT Python package (pip install 'capsule-batch[tensorrt]')"
    return skips


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skips = hardware_skips()
    for item in items:
        for marker, why in skips.items():
            if item.get_closest_marker(marker) is not None:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(autouse=True)
def _auto_on_a_cpu_needs_the_cpu_choice_marker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """A test that lets `auto` choose a CPU engine that can differ between CPUs (torch fp32 on AVX2, bf16 on AMX)
    must be marked `cpu_choice`, so that `make test` runs it again under every forced candidate
    (CAPSULE_BATCH_CPU_CHOICE). Seen in this process only; tests that run the CLI in a subprocess are marked by
    hand (the list in docs/engines.md#a-suite-that-passes-on-every-cpu)."""
    from capsule_batch.backends import cpu_choice

    requests: list[tuple[str, str]] = []
    real = cpu_choice.choose

    def spy(bundle, *, backend: str, precision: str, **kw):  # noqa: ANN001, ANN202
        requests.append((backend, precision))
        return real(bundle, backend=backend, precision=precision, **kw)

    monkeypatch.setattr(cpu_choice, "choose", spy)
    yield
    free = [r for r in requests if r[0] in ("auto", "torch") and r[1] in ("auto", "bf16")]
    about_the_choice = request.module.__name__ in ("test_cpu_choice", "test_compiled")
    if free and request.node.get_closest_marker("cpu_choice") is None and not about_the_choice:
        pytest.fail(f"this test lets `auto` pick a CPU engine ({free[0][0]}/{free[0][1]}): mark it "
                    "@pytest.mark.cpu_choice, or pin --engine and --precision")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory):
    """A randomly initialised 2-block EVA-02 at 56 px with the CE24 classes (no thresholds)."""
    import torch

    from capsule_batch.model.bundle import create_model, save_bundle
    from capsule_batch.model.classes import CE24_CLASSES
    from capsule_batch.model.preprocess import Preprocess

    torch.manual_seed(0)
    model = create_model(TINY_ARCH, len(CE24_CLASSES), TINY_ARGS)
    with torch.no_grad():  # timm's head init gives near-uniform outputs; spread them so frames differ
        model.head.weight.normal_(0.0, 0.3)
        model.head.bias.normal_(0.0, 0.5)
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    return save_bundle(out, model.state_dict(), arch=TINY_ARCH, class_names=list(CE24_CLASSES),
                       preprocess=Preprocess(input_size=TINY_SIZE, resize=TINY_SIZE), model_args=TINY_ARGS)


def make_recording(path: Path, frames: int, seed: int = 0) -> Path:
    from capsule_batch.sources.synthesize import synthesize

    return synthesize(path, frames, size=TINY_SIZE, seed=seed, findings_per_1000=40.0).path


@pytest.fixture(scope="session")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_recording(tmp_path_factory.mktemp("rec") / "study_a.mp4", 120)


def cli_cmd(*args: str) -> list[str]:
    """argv for `capsule-batch` with the stand-ins registered, in a subprocess."""
    return [sys.executable, str(TESTS / "run_cli_with_doubles.py"), *args]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def signal_other_thread(pid: int, sig: int) -> int:
    """Send `sig` to a thread of process `pid` other than its main thread (as the kernel may do with a signal
    sent to the process); returns that thread's id. A main thread blocked without a timeout never runs the
    Python handler of a signal another thread received."""
    import ctypes

    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    assert tids, f"process {pid} has no thread besides its main thread"
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.tgkill(pid, tids[0], sig) if hasattr(libc, "tgkill") else libc.syscall(234, pid, tids[0], sig)
    assert rc == 0, os.strerror(ctypes.get_errno())
    return tids[0]
