"""torch compiled ahead of time on a CPU (capsule_batch/backends/compiled.py): compiled once into the engine store,
loaded (not compiled) by every later engine, the same numbers as eager fp32, any batch size; one package per
machine; a candidate of the CPU choice, forced like the others; a clear error without a C++ compiler.

Real compiles (TorchInductor + g++, ~15 s each for the 2-block 56 px model): fp32 once and bf16 once per session.
Which candidate is fastest is the CPU's business: where the choice is tested, the speeds are set (`rates`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
from click.testing import CliRunner

from capsule_batch.backends import compiled, cpu_choice, create_engine
from capsule_batch.backends.engine_store import EngineStore
from capsule_batch.cli import cli as cli_main
from capsule_batch.errors import EngineError


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(autouse=True)
def _not_forced(monkeypatch):
    monkeypatch.delenv(cpu_choice.FORCE_ENV, raising=False)


def no_compiling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("compiled again: the stored package should have been loaded")

    monkeypatch.setattr(compiled, "compile_package", refuse)


def eager_fp32(bundle, x):
    return create_engine(bundle, backend="torch", precision="fp32", device="cpu").infer(x)


def test_engine_build_compiles_once_and_later_engines_load_the_package(tiny_bundle, store_dir, tmp_path,
                                                                        monkeypatch):
    # torch left to itself leaves a copy of the package in $TMPDIR per load and the generated code and weights in
    # inductor's cache there per compile: neither may stay in this temporary directory
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    inductor_cache = tmp_path / "inductor"  # where torch.compile in this process keeps what it generates
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache))
    runner = CliRunner()
    args = ["engine", "build", "-m", str(tiny_bundle.path), "--backend", "torch", "--precision", "fp32", "--compile",
            "--device", "cpu", "--max-batch", "16", "--engine-dir", str(store_dir)]
    r = runner.invoke(cli_main, args)
    assert r.exit_code == 0, r.output
    assert "compiled ahead of time in" in r.output and "model.pt2" in r.output
    (entry,) = (store_dir / "tiny").glob("aoti-fp32-*")
    meta = json.loads((entry / "meta.json").read_text())
    cpu = cpu_choice.cpu_info()
    assert meta["kind"] == "aoti" and meta["compile_seconds"] > 0 and meta["inductor_configs"] == {"freezing": True}
    assert meta["cpu"] == {"model": cpu["model"], "flags": cpu["flags"]} and meta["bundle_sha256"] == tiny_bundle.sha256
    assert meta["bytes"] == (entry / "model.pt2").stat().st_size

    no_compiling(monkeypatch)
    r = runner.invoke(cli_main, args)  # built already: loaded
    assert r.exit_code == 0, r.output
    engine = create_engine(tiny_bundle, backend="torch", precision="fp32", device="cpu", max_batch=16, compile=True,
                           store=EngineStore(store_dir))
    d = engine.describe()
    assert d["aot"] and d["artifact"] == str(entry / "model.pt2") and d["compile_seconds"] == meta["compile_seconds"]
    # fp32 numbers (float rounding only) at any batch size: the package's batch dimension is dynamic
    x = cpu_choice.parity_pixels(tiny_bundle, 21, seed=5)
    ref = eager_fp32(tiny_bundle, x)
    assert float((engine.infer(x) - ref).abs().max()) <= cpu_choice.FP32_MAX_ABS_DP  # calls of 16 and 5
    assert float((engine.infer(x[:1]) - ref[:1]).abs().max()) <= cpu_choice.FP32_MAX_ABS_DP
    r = runner.invoke(cli_main, ["engine", "list", "--engine-dir", str(store_dir)])
    assert "torch-aoti" in r.output and f"{cpu['model']} (" in r.output and "ok" in r.output, r.output
    del engine
    # only inductor's precompiled headers may stay (one per compiler configuration, shared by every bundle)
    left = [p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file()]
    assert all(p.parts[0].startswith("torchinductor_") and p.parts[1] == "precompiled_headers" for p in left)
    assert not [p for p in inductor_cache.rglob("*") if p.is_file() and "precompiled_headers" not in p.parts]
    # nor when a process ends without destroying what it loaded (os._exit, as a run whose store could not close,
    # a killed worker, a crash): before, each such load left a copy of the package behind
    code = ("import os; from capsule_batch.backends.compiled import load_package; "
            f"model = load_package({str(entry / 'model.pt2')!r}); os._exit(0)")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TMPDIR": str(tmp)}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not [p for p in tmp.rglob("*") if "aotinductor" in str(p)]


def test_each_machine_gets_its_own_package_and_a_stale_one_is_not_loaded(tiny_bundle, store_dir, monkeypatch):
    here = compiled.identity(tiny_bundle, "fp32")
    monkeypatch.setattr(cpu_choice, "cpu_info", lambda: {"model": "Other CPU", "flags": ["avx2"], "cores": 2})
    other = compiled.identity(tiny_bundle, "fp32")
    assert other["cpu"]["model"] == "Other CPU" and compiled.entry_name(other) != compiled.entry_name(here)
    assert compiled.entry_name(compiled.identity(tiny_bundle, "bf16")) != compiled.entry_name(other)
    monkeypatch.undo()
    # a package whose meta says another torch built it: refused under `never`, never loaded
    (entry,) = (store_dir / "tiny").glob("aoti-fp32-*")
    meta_path = entry / "meta.json"
    saved = meta_path.read_text()
    meta_path.write_text(saved.replace(f'"torch_version": "{here["torch_version"]}"', '"torch_version": "0.0"'))
    try:
        with pytest.raises(EngineError, match="stale engine.*torch_version is 0.0"):
            compiled.ensure_package(tiny_bundle, EngineStore(store_dir), "fp32", policy="never")
    finally:
        meta_path.write_text(saved)


def test_auto_takes_the_compiled_candidate_where_it_is_fastest_and_loads_it_from_the_store(tiny_bundle, store_dir,
                                                                                             monkeypatch):
    seen: list[str] = []

    def label(engine):
        d = engine.describe()
        name = f"{d['backend']} {d['precision']}" + (" cast" if d.get("cast") else "")
        return name + (" autocast" if d.get("autocast") else "") + (" compiled" if d.get("aot") else "")

    def rate(engine):
        seen.append(label(engine))
        return 300.0 if label(engine) == "torch fp32 compiled" else 100.0

    real = cpu_choice.infer_timed
    monkeypatch.setattr(cpu_choice, "infer_timed", lambda e, p, b: (real(e, p, b)[0], rate(e)))
    monkeypatch.setattr(cpu_choice, "measure_rate", lambda e, p, b: rate(e))
    store = EngineStore(store_dir)
    engine = create_engine(tiny_bundle, device="cpu", max_batch=16, store=store, parity_frames=32,
                           backend="auto", precision="fp32")
    assert "torch fp32 compiled" in seen and "torch fp32" in seen
    assert engine.choice["label"] == "torch fp32 compiled" and engine.choice["options"] == {"compile": True}
    ev = engine.choice["evidence"]["torch fp32 compiled"]
    assert ev["passed"] and ev["max_abs_dp"] <= cpu_choice.FP32_MAX_ABS_DP and ev["top1_agreement"] == 1.0
    assert engine.describe()["aot"] and cpu_choice.parity_bound(engine) == cpu_choice.FP32_MAX_ABS_DP
    no_compiling(monkeypatch)
    again = create_engine(tiny_bundle, device="cpu", max_batch=16, store=store, parity_frames=32, backend="auto",
                          precision="fp32")
    assert not again.choice["measured_now"] and again.describe()["aot"]


def test_forced_bf16_cast_compiled_stays_within_the_bf16_bound(tiny_bundle, store_dir, monkeypatch):
    monkeypatch.setenv(cpu_choice.FORCE_ENV, "torch-bf16-cast-compiled")
    engine = create_engine(tiny_bundle, device="cpu", max_batch=16, store=EngineStore(store_dir), backend="auto",
                           precision="auto")
    d = engine.describe()
    assert (d["backend"], d["precision"], d["cast"], d["aot"], d["dtype"]) == ("torch", "bf16", True, True, "bfloat16")
    assert engine.choice["label"] == "torch bf16 cast compiled"
    x = cpu_choice.parity_pixels(tiny_bundle, 16, seed=5)
    assert float((engine.infer(x) - eager_fp32(tiny_bundle, x)).abs().max()) <= cpu_choice.parity_bound(engine)
    with pytest.raises(EngineError, match="needs `cast`"):  # autocast is not compiled
        create_engine(tiny_bundle, backend="torch", precision="bf16", device="cpu", compile=True,
                      store=EngineStore(store_dir))


def test_without_a_compiler_the_choice_leaves_it_out_and_asking_for_it_says_why(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(compiled, "compiler_available", lambda: (False, "no C++ compiler for TorchInductor (test)"))
    r = CliRunner().invoke(cli_main, ["engine", "build", "-m", str(tiny_bundle.path), "--backend", "torch",
                                      "--compile", "--device", "cpu", "--engine-dir", str(tmp_path)])
    assert r.exit_code != 0 and "no C++ compiler for TorchInductor" in r.output, r.output
    assert not list(tmp_path.rglob("*.pt2"))
    r = CliRunner().invoke(cli_main, ["engine", "build", "-m", str(tiny_bundle.path), "--backend", "onnxruntime",
                                      "--compile", "--device", "cpu", "--engine-dir", str(tmp_path)])
    assert r.exit_code != 0 and "--compile is for --backend torch" in r.output
    engine = create_engine(tiny_bundle, device="cpu", max_batch=16, store=EngineStore(tmp_path), parity_frames=16,
                           backend="torch", precision="auto")
    assert not engine.describe().get("aot")  # torch/auto on this CPU: no compiled candidate to measure
