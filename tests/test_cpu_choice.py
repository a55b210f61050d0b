"""The CPU choice behind `auto`: fp32 without native bf16; bf16 only after it passed parity with fp32 on the
bundle; a bundle whose bf16 outputs fail stays fp32 and says why; the decision is stored, reused, and measured
again when the CPU or the bundle changes.

Parity is real (the bundles' outputs in bf16 and fp32 on this machine's CPU); only the speeds are set by the
tests (`rates`), since which candidate is fastest is the CPU's business, and a test must hold on every CPU.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from click.testing import CliRunner

from capsule_batch.backends import cpu_choice, create_engine
from capsule_batch.backends.engine_store import EngineStore
from capsule_batch.cli import cli as cli_main
from capsule_batch.errors import EngineError
from capsule_batch.model.bundle import create_model, save_bundle
from capsule_batch.model.classes import CE24_CLASSES
from capsule_batch.model.preprocess import Preprocess

ARCH = "eva02_tiny_patch14_224"
ARGS = {"depth": 2, "img_size": 56}
PARITY_FRAMES = 64
NO_BF16 = {"model": "Test CPU without bf16", "flags": ["avx2", "fma"], "cores": 2}
WITH_BF16 = {"model": "Test CPU with AMX", "flags": ["amx_bf16", "amx_tile", "avx2", "avx512_bf16", "avx512f"],
             "cores": 2}


def make_bundle(path, kind: str, seed: int = 0):
    """`soft`: one class dominates every frame by a wide margin (bf16 rounding moves nothing that matters);
    `sharp`: logits O(100) that depend on every feature, so bf16 rounding flips top-1 and moves probabilities."""
    torch.manual_seed(seed)
    model = create_model(ARCH, len(CE24_CLASSES), ARGS)
    with torch.no_grad():
        if kind == "soft":
            model.head.weight.normal_(0.0, 0.01)
            model.head.bias.zero_()
            model.head.bias[3] = 4.0
        else:
            model.head.weight.normal_(0.0, 8.0)
            model.head.bias.zero_()
    return save_bundle(path, model.state_dict(), arch=ARCH, class_names=list(CE24_CLASSES),
                       preprocess=Preprocess(input_size=56, resize=56), model_args=ARGS, overwrite=True)


@pytest.fixture(autouse=True)
def _measured_not_forced(monkeypatch):
    """These tests are about the measured choice: a forced candidate (make test's reruns) must not replace it."""
    monkeypatch.delenv(cpu_choice.FORCE_ENV, raising=False)


@pytest.fixture(autouse=True)
def _no_compiler(monkeypatch):
    """The rules here hold with or without the compiled candidates; without them each test saves the ~15 s
    compile of its fresh store. tests/test_compiled.py compiles for real and checks how they join the choice."""
    monkeypatch.setattr("capsule_batch.backends.compiled.compiler_available", lambda: (False, "not in these tests"))


@pytest.fixture(scope="module")
def soft(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("soft") / "soft", "soft")


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("sharp") / "sharp", "sharp")


@pytest.fixture
def rates(monkeypatch):
    """Set each candidate's measured speed (frames/s) by label; records which candidates were measured."""
    table = {"torch fp32": 100.0, "onnxruntime fp32": 110.0, "torch bf16 cast": 400.0, "torch bf16 autocast": 250.0}
    measured: list[str] = []
    real_infer_timed = cpu_choice.infer_timed

    def label(engine):
        d = engine.describe()
        if d["backend"] == "torch" and d["precision"] == "bf16":
            return "torch bf16 cast" if d["cast"] else "torch bf16 autocast"
        return f"{d['backend']} {d['precision']}"

    def infer_timed(engine, pixels, batch):
        probs, _ = real_infer_timed(engine, pixels, batch)
        measured.append(label(engine))
        return probs, table[label(engine)]

    monkeypatch.setattr(cpu_choice, "infer_timed", infer_timed)
    monkeypatch.setattr(cpu_choice, "measure_rate", lambda engine, pixels, batch: table[label(engine)])
    return table, measured


def on_cpu(monkeypatch, cpu):
    monkeypatch.setattr(cpu_choice, "cpu_info", lambda: dict(cpu))


def auto(bundle, store, **kw):
    return create_engine(bundle, device="cpu", max_batch=16, store=store, parity_frames=PARITY_FRAMES, **kw)


def test_candidates_follow_the_cpu_and_the_request():
    labels = lambda *a: [c.label for c in cpu_choice.candidates(*a)]  # noqa: E731
    assert labels("auto", "auto", NO_BF16, True) == ["torch fp32", "onnxruntime fp32"]
    assert labels("auto", "auto", WITH_BF16, True) == ["torch fp32", "onnxruntime fp32", "torch bf16 cast",
                                                       "torch bf16 autocast"]
    assert labels("auto", "auto", NO_BF16, False) == ["torch fp32"]
    assert labels("torch", "auto", NO_BF16, True) == ["torch fp32"]  # one candidate: nothing to measure
    assert labels("auto", "bf16", NO_BF16, True) == ["torch bf16 cast", "torch bf16 autocast"]  # asked for
    assert labels("onnxruntime", "auto", WITH_BF16, True) == ["onnxruntime fp32"]
    # with a C++ compiler for inductor, each eager torch candidate but autocast gets a compiled sibling
    assert labels("auto", "auto", NO_BF16, True, [], True) == ["torch fp32", "torch fp32 compiled", "onnxruntime fp32"]
    assert labels("auto", "auto", WITH_BF16, True, [], True) == [
        "torch fp32", "torch fp32 compiled", "onnxruntime fp32", "torch bf16 cast", "torch bf16 cast compiled",
        "torch bf16 autocast"]
    assert labels("onnxruntime", "auto", WITH_BF16, True, [], True) == ["onnxruntime fp32"]
    assert cpu_choice.native_bf16(WITH_BF16) and not cpu_choice.native_bf16(NO_BF16)
    info = cpu_choice.cpu_info()
    assert info["model"] and info["cores"] >= 1 and set(info["flags"]) <= set(cpu_choice.RECORDED_FLAGS)


def test_without_native_bf16_auto_is_fp32_whatever_bf16_would_run_at(soft, tmp_path, monkeypatch, rates):
    on_cpu(monkeypatch, NO_BF16)
    table, measured = rates
    engine = auto(soft, EngineStore(tmp_path))
    assert engine.precision == "fp32" and engine.name == "onnxruntime"  # the faster of the two fp32 backends
    assert sorted(set(measured)) == ["onnxruntime fp32", "torch fp32"]  # bf16 not even tried
    assert engine.choice["label"] == "onnxruntime fp32" and engine.choice["measured_now"]
    assert engine.describe()["choice"]["label"] == "onnxruntime fp32"
    table["torch fp32"] = 200.0  # on another machine torch is faster: a fresh store measures that
    assert auto(soft, EngineStore(tmp_path / "other")).name == "torch"


def test_bf16_is_chosen_only_after_passing_parity(soft, tmp_path, monkeypatch, rates):
    on_cpu(monkeypatch, WITH_BF16)
    engine = auto(soft, EngineStore(tmp_path))
    assert (engine.name, engine.precision, engine.describe()["cast"]) == ("torch", "bf16", True)
    ev = engine.choice["evidence"]
    assert ev["torch bf16 cast"]["passed"] and ev["torch bf16 cast"]["top1_agreement"] >= 0.999
    assert ev["torch bf16 cast"]["max_abs_dp"] <= 0.01 and ev["torch fp32"]["reference"]
    assert "fastest of 4 that pass parity" in engine.choice["reason"]
    # the engine it returns is the bf16 model: its outputs are within the parity bound of fp32 on other frames too
    x = cpu_choice.parity_pixels(soft, 16, seed=5)
    fp32 = create_engine(soft, backend="torch", precision="fp32", device="cpu")
    assert float((engine.infer(x) - fp32.infer(x)).abs().max()) <= 0.01


def test_a_bundle_whose_bf16_outputs_fail_parity_stays_fp32_and_says_why(sharp, tmp_path, monkeypatch, rates, caplog):
    on_cpu(monkeypatch, WITH_BF16)
    with caplog.at_level(logging.WARNING, logger="capsule_batch.backends.cpu_choice"):
        engine = auto(sharp, EngineStore(tmp_path))
    assert engine.precision == "fp32" and engine.name == "onnxruntime"  # bf16 was 4x faster, and not taken
    ev = engine.choice["evidence"]
    assert not ev["torch bf16 cast"]["passed"] and not ev["torch bf16 autocast"]["passed"]
    assert ev["torch bf16 cast"]["max_abs_dp"] > 0.01 or ev["torch bf16 cast"]["top1_agreement"] < 0.999
    assert "torch bf16 cast, torch bf16 autocast failed it" in engine.choice["reason"]
    assert "torch bf16 cast fails parity with fp32 on sharp" in caplog.text
    # bf16 asked for explicitly on that bundle: given (the closer of the two to fp32), with the warning
    explicit = auto(sharp, EngineStore(tmp_path), precision="bf16")
    assert explicit.precision == "bf16" and not explicit.describe()["cast"]
    assert "no candidate passed parity" in explicit.choice["reason"]


def test_the_decision_is_stored_reused_and_measured_again_when_cpu_or_bundle_change(soft, tmp_path, monkeypatch,
                                                                                    rates, caplog):
    table, measured = rates
    store = EngineStore(tmp_path)
    on_cpu(monkeypatch, WITH_BF16)
    first = auto(soft, store)
    meta = json.loads((tmp_path / "soft" / "cpu-choice-auto-auto" / "meta.json").read_text())
    assert meta["cpu"] == WITH_BF16 and meta["chosen"] == "torch bf16 cast" and meta["bundle_sha256"] == soft.sha256
    assert meta["parity_frames"] == PARITY_FRAMES and meta["torch_version"] == torch.__version__
    n = len(measured)
    again = auto(soft, store)  # same CPU, same bundle: loaded, nothing measured
    assert len(measured) == n and not again.choice["measured_now"] and again.choice["label"] == first.choice["label"]
    assert again.describe()["cast"]
    on_cpu(monkeypatch, {**WITH_BF16, "model": "Another CPU"})  # the store moved to another machine
    with caplog.at_level(logging.WARNING, logger="capsule_batch.backends.engine_store"):
        moved = auto(soft, store)
    assert moved.choice["measured_now"] and len(measured) > n
    assert "stale engine" in caplog.text and "cpu is" in caplog.text
    n = len(measured)
    (tmp_path / "b2").mkdir()
    retrained = make_bundle(tmp_path / "b2" / "soft", "soft", seed=1)  # same name, other weights
    assert retrained.sha256 != soft.sha256
    assert auto(retrained, store).choice["measured_now"] and len(measured) > n
    n = len(measured)
    assert auto(retrained, store, rebuild="force").choice["measured_now"] and len(measured) > n


def test_engine_build_and_list_show_the_choice(soft, tmp_path, monkeypatch, rates):
    on_cpu(monkeypatch, NO_BF16)
    runner = CliRunner()
    args = ["engine", "build", "-m", str(soft.path), "--device", "cpu", "--max-batch", "16", "--parity-frames",
            str(PARITY_FRAMES), "--engine-dir", str(tmp_path)]
    r = runner.invoke(cli_main, args)
    assert r.exit_code == 0, r.output
    assert "CPU choice (measured now" in r.output and "onnxruntime fp32 — fastest of 2 that pass parity" in r.output
    assert "torch fp32" in r.output and "reference" in r.output and "passes" in r.output
    r = runner.invoke(cli_main, args)
    assert r.exit_code == 0 and "CPU choice (stored" in r.output, r.output
    r = runner.invoke(cli_main, [*args, "--json"])
    assert json.loads(r.output.strip().splitlines()[-1])["choice"]["label"] == "onnxruntime fp32"
    r = runner.invoke(cli_main, ["engine", "list", "--engine-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "cpu choice: onnxruntime fp32  on Test CPU without bf16 (2 cores, avx2 fma)" in r.output
    assert "onnxruntime" in r.output and "ok" in r.output


def test_a_forced_candidate_is_what_auto_picks_on_any_cpu_and_nothing_is_stored(soft, tmp_path, monkeypatch, rates,
                                                                                caplog):
    """CAPSULE_BATCH_CPU_CHOICE (make test's reruns): bf16 on a CPU without native bf16 (emulated), without measuring
    or storing; a request the candidate does not fit is chosen as usual; a pinned request is never forced."""
    on_cpu(monkeypatch, NO_BF16)
    _, measured = rates
    monkeypatch.setenv(cpu_choice.FORCE_ENV, "torch-bf16-cast")
    store = EngineStore(tmp_path / "store")
    engine = auto(soft, store)
    d = engine.describe()
    assert (d["backend"], d["precision"], d["cast"]) == ("torch", "bf16", True)
    assert engine.choice["forced"] and engine.choice["reason"] == f"forced by {cpu_choice.FORCE_ENV}"
    assert measured == [] and not list(store.root.rglob("choice.json"))
    assert any("forced by CAPSULE_BATCH_CPU_CHOICE" in r.getMessage() for r in caplog.records)
    assert cpu_choice.parity_bound(engine) == cpu_choice.MAX_ABS_DP
    assert auto(soft, store, backend="torch").describe()["precision"] == "bf16"  # torch/auto fits it
    assert auto(soft, store, backend="onnxruntime").name == "onnxruntime"  # does not fit: as usual
    assert auto(soft, store, backend="torch", precision="fp32").describe()["precision"] == "fp32"  # pinned
    monkeypatch.setenv(cpu_choice.FORCE_ENV, "onnxruntime-fp32")
    engine = auto(soft, store)
    assert engine.name == "onnxruntime" and cpu_choice.parity_bound(engine) == cpu_choice.FP32_MAX_ABS_DP
    monkeypatch.setenv(cpu_choice.FORCE_ENV, "torch-int3")
    with pytest.raises(EngineError, match="not a CPU candidate"):
        auto(soft, store)
    assert sorted(cpu_choice.ALL_CANDIDATES) == ["onnxruntime-fp32", "torch-bf16-autocast", "torch-bf16-cast",
                                                 "torch-bf16-cast-compiled", "torch-fp32", "torch-fp32-compiled"]
