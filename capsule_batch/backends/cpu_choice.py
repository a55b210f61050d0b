"""What `--engine auto` / `--precision auto` mean on a CPU: a measured choice, per bundle and per CPU.

The candidates are the configurations this CPU runs natively:

* torch fp32: the reference every other candidate is checked against;
* torch fp32 compiled (where inductor finds a C++ compiler): the AOTInductor package of the bundle in the engine
  store (compiled.py), compiled on its first use (tens of seconds, once per bundle, CPU and torch version);
* onnxruntime fp32 (when installed): the same numbers within float rounding, often faster or slower by 10-40 %
  depending on the CPU and the model;
* only where the CPU has native bf16 (`amx_bf16` or `avx512_bf16` in /proc/cpuinfo), or when bf16 is asked for:
  torch bf16 with the model and input cast to bf16 (`cast`: the fastest on AMX), and torch bf16 under autocast
  (fp32 weights; LayerNorm and softmax stay fp32: closer to fp32, slower); and torch bf16 cast compiled;
* only for `auto` precision and only where the engine store holds an int8 engine of this bundle whose parity with
  fp32 on its held-out calibration frames met the Fidelity bounds (`engine build --precision int8 --calibration
  FRAMES`, int8.py): onnxruntime int8 with that engine's calibration. `auto` never quantises on its own.

Each candidate runs the same `parity_frames` capsule-like frames (synth.Scene: mucosa texture, folds, vignette,
findings) as the reference; it passes when its top-1 agrees with fp32 on >= 99.9 % of them and no probability
moves by more than 0.01 (docs/engines.md, "Fidelity"). The same calls time it, then a second, shorter pass in the
reverse order times every candidate again (the better of the two rates counts, so that a candidate is not
penalised for running while the machine was busy). The fastest candidate that passes wins; a bf16 candidate that
fails stays out with its reason logged.

The decision is stored in the engine store (`cpu-choice-<backend>-<precision>/choice.json`) with what it depends
on: the bundle's identity, the CPU model and its flags, the cores and torch's threads, and the torch, onnxruntime
and timm versions. A later build on the same machine reuses it; any change (another CPU, a retrained bundle, an
upgrade) measures again. `engine build` prints it and `engine list` shows it.

`CAPSULE_BATCH_CPU_CHOICE=<candidate>` (`torch-fp32`, `torch-fp32-compiled`, `onnxruntime-fp32`, `torch-bf16-cast`,
`torch-bf16-cast-compiled`, `torch-bf16-autocast`)
forces what `auto` picks wherever that candidate fits the request, without measuring or storing anything: bf16 then
runs on any x86-64 CPU (emulated, slowly, where the CPU has no native bf16). The test suite runs its number-comparing
tests once per candidate this way (Makefile, `make test`), so that a bound that holds for one candidate only fails on
every machine, not only on the CPU whose `auto` picks the other one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

from capsule_batch.errors import EngineError
from capsule_batch.model.bundle import ModelBundle

_logger = logging.getLogger(__name__)

#: parity bounds of a candidate against the fp32 reference (docs/engines.md, "Fidelity")
MIN_TOP1_AGREEMENT = 0.999
MAX_ABS_DP = 0.01
#: what two fp32 backends (torch, onnxruntime) may differ by in probabilities: float rounding only
FP32_MAX_ABS_DP = 1e-4
DEFAULT_PARITY_FRAMES = 256
#: CPU flags that make bf16 native (AMX tiles; AVX-512 BF16 dot products)
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
#: flags recorded with a decision (what the kernels torch and onnxruntime pick depend on)
RECORDED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                  "amx_int8")
CHOICE_FILE = "choice.json"
#: forces the CPU choice (see the module docstring); its values are `Candidate.key`s
FORCE_ENV = "CAPSULE_BATCH_CPU_CHOICE"


def cpu_info() -> dict[str, Any]:
    """The CPU a decision is made on: model name, the flags that matter, usable cores."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and value.strip():
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return {"model": model, "flags": sorted(f for f in RECORDED_FLAGS if f in flags), "cores": cores}


def native_bf16(cpu: dict[str, Any]) -> bool:
    return any(f in cpu["flags"] for f in BF16_FLAGS)


@dataclasses.dataclass(frozen=True)
class Candidate:
    backend: str
    precision: str
    cast: bool = False  # torch bf16: model and input in bf16 (else autocast, fp32 weights)
    compiled: bool = False  # torch: the AOTInductor package from the engine store (compiled.py)

    @property
    def label(self) -> str:
        label = f"{self.backend} {self.precision}"
        if self.backend == "torch" and self.precision == "bf16":
            label += " cast" if self.cast else " autocast"
        return label + (" compiled" if self.compiled else "")

    @property
    def key(self) -> str:
        """The label as one word: what CAPSULE_BATCH_CPU_CHOICE takes (`torch-bf16-cast`)."""
        return self.label.replace(" ", "-")

    @property
    def parity_bound(self) -> float:
        """The max |dp| against torch fp32 that this candidate is held to: float rounding for an fp32 backend,
        the Fidelity bound for bf16. A test that compares a run's probabilities with fp32 uses this bound."""
        return FP32_MAX_ABS_DP if self.precision == "fp32" else MAX_ABS_DP

    @property
    def options(self) -> dict[str, Any]:
        """Keyword arguments of the backend beyond backend and precision."""
        return {**({"cast": True} if self.cast else {}), **({"compile": True} if self.compiled else {})}

    @classmethod
    def from_decision(cls, decision: dict[str, Any]) -> Candidate:
        options = decision.get("options") or {}
        return cls(decision["backend"], decision["precision"], bool(options.get("cast")), bool(options.get("compile")))


REFERENCE = Candidate("torch", "fp32")
FP32_COMPILED = Candidate("torch", "fp32", compiled=True)
BF16_CAST = Candidate("torch", "bf16", cast=True)
BF16_CAST_COMPILED = Candidate("torch", "bf16", cast=True, compiled=True)
#: every candidate there is, by key
ALL_CANDIDATES = {c.key: c for c in (REFERENCE, FP32_COMPILED, Candidate("onnxruntime", "fp32"), BF16_CAST,
                                     BF16_CAST_COMPILED, Candidate("torch", "bf16"))}


def forced_candidate() -> Candidate | None:
    """The candidate CAPSULE_BATCH_CPU_CHOICE forces (None: not set); an unknown value is an error."""
    value = os.environ.get(FORCE_ENV, "").strip()
    if not value:
        return None
    key = value.replace(" ", "-").replace("/", "-")
    if key not in ALL_CANDIDATES:
        raise EngineError(f"{FORCE_ENV}={value!r} is not a CPU candidate (choose from {', '.join(ALL_CANDIDATES)})")
    return ALL_CANDIDATES[key]


def int8_candidates(bundle: ModelBundle, store: Any) -> list[Candidate]:
    """onnxruntime int8, where the store holds an int8 engine of `bundle` that passed parity (int8.py); its engine is
    that stored one (an int8 engine built without calibration frames takes the stored engine, passing ones first)."""
    from capsule_batch.backends.int8 import passing_int8_entries

    return [Candidate("onnxruntime", "int8")] if passing_int8_entries(bundle, store) else []


def candidates(backend: str, precision: str, cpu: dict[str, Any], ort_available: bool,
               int8: list[Candidate] | None = None, compiler: bool = False) -> list[Candidate]:
    """What `backend` x `precision` (either may be `auto`) can mean on this CPU; the reference first when allowed.
    `int8`: the int8 candidates the engine store offers (int8_candidates), considered for `auto` precision only;
    `compiler`: a C++ compiler is there for inductor, so the compiled candidates join their eager siblings."""
    out: list[Candidate] = []
    if precision in ("auto", "fp32"):
        if backend in ("auto", "torch"):
            out += [REFERENCE, FP32_COMPILED] if compiler else [REFERENCE]
        # asked for by name, it is a candidate even when missing: its build says what to install
        if backend == "onnxruntime" or (backend == "auto" and ort_available):
            out.append(Candidate("onnxruntime", "fp32"))
    if backend in ("auto", "torch") and (precision == "bf16" or (precision == "auto" and native_bf16(cpu))):
        out += [BF16_CAST, BF16_CAST_COMPILED] if compiler else [BF16_CAST]
        out.append(Candidate("torch", "bf16"))
    if precision == "auto" and backend in ("auto", "onnxruntime") and ort_available:
        out += list(int8 or [])
    return out


def parity_pixels(bundle: ModelBundle, n: int, seed: int = 0) -> Any:
    """`n` preprocessed capsule-like frames (synth.Scene at the bundle's input size, findings included)."""
    import numpy as np
    import torch

    from capsule_batch.model.preprocess import preprocess_batch
    from capsule_batch.sources.synthesize import Scene

    size = max(bundle.preprocess.input_size, 64)
    # frames spread over a long recording (camera moved between them), one finding every ~8 frames
    scene = Scene(size, n * 8, seed=seed, fps=2.0, findings_per_1000=40.0)
    frames = np.stack([scene.render(i * 8 + 4) for i in range(n)])
    return preprocess_batch(torch.from_numpy(frames), bundle.preprocess)


def within_fidelity(top1_agreement: float, max_abs_dp: float) -> bool:
    """The Fidelity bounds: what any faster configuration (CPU bf16, GPU fp16/bf16) must meet against fp32."""
    return top1_agreement >= MIN_TOP1_AGREEMENT and max_abs_dp <= MAX_ABS_DP


def compare(ref: Any, probs: Any) -> dict[str, Any]:
    """Top-1 agreement and max |dp| of `probs` against the reference; `passed` by the Fidelity bounds."""
    agree = float((ref.argmax(1) == probs.argmax(1)).float().mean())
    dp = float((ref - probs).abs().max())
    return {"top1_agreement": round(agree, 5), "max_abs_dp": round(dp, 6), "passed": within_fidelity(agree, dp)}


def infer_timed(engine: Any, pixels: Any, batch: int) -> tuple[Any, float]:
    """(probabilities of all `pixels`, frames/s over every call but the first, a warm-up)."""
    import torch

    outs, t0, timed = [], 0.0, 0
    for i, lo in enumerate(range(0, int(pixels.shape[0]), batch)):
        if i == 1:
            t0 = time.perf_counter()
        chunk = pixels[lo:lo + batch]
        outs.append(engine.infer(chunk).float().cpu())
        if i >= 1:
            timed += int(chunk.shape[0])
    rate = timed / (time.perf_counter() - t0) if timed else 0.0
    return torch.cat(outs), rate


def measure_rate(engine: Any, pixels: Any, batch: int, min_calls: int = 2, min_seconds: float = 1.0) -> float:
    """frames/s at `batch` after one warm-up call, over at least `min_calls` calls and `min_seconds`."""
    x = pixels[:batch]
    engine.infer(x)
    calls, t0 = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - t0 < min_seconds:
        engine.infer(x)
        calls += 1
    return calls * int(x.shape[0]) / (time.perf_counter() - t0)


def identity(bundle: ModelBundle, cpu: dict[str, Any], parity_frames: int, cands: list[Candidate]) -> dict[str, Any]:
    """What a stored decision depends on: any change measures again."""
    import timm
    import torch

    from capsule_batch.backends.engine_store import bundle_identity

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return {**bundle_identity(bundle), "backend": "cpu-choice", "cpu": cpu, "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "onnxruntime_version": ort_version, "timm_version": timm.__version__,
            "parity_frames": parity_frames, "candidates": [c.label for c in cands]}


def decide(bundle: ModelBundle, cands: list[Candidate], build: Any, max_batch: int, parity_frames: int,
           ) -> tuple[dict[str, Any], dict[Candidate, Any]]:
    """Measure every candidate; returns (decision, the engines built, by candidate). `build(candidate)` makes one."""
    pixels = parity_pixels(bundle, parity_frames)
    batch = max(1, min(max_batch, 16, parity_frames))
    engines: dict[Candidate, Any] = {}
    evidence: dict[str, dict[str, Any]] = {}
    reference = None
    order = [REFERENCE] + [c for c in cands if c != REFERENCE]
    for c in order:
        _logger.info("CPU choice: measuring %s on %d frames", c.label, parity_frames)
        try:
            engines[c] = build(c)
            probs, rate = infer_timed(engines[c], pixels, batch)
        except Exception as e:  # a candidate that cannot run here is a finding, not the end of the choice
            if c == REFERENCE:
                raise
            evidence[c.label] = {"error": f"{type(e).__name__}: {e}"[:300], "passed": False}
            _logger.warning("CPU choice: %s cannot run here: %s", c.label, evidence[c.label]["error"])
            engines.pop(c, None)
            continue
        if reference is None:
            reference = probs
            evidence[c.label] = {"top1_agreement": 1.0, "max_abs_dp": 0.0, "passed": True, "reference": True}
        else:
            evidence[c.label] = compare(reference, probs)
        evidence[c.label]["frames_per_s"] = [round(rate, 2)]
    for c in reversed(order):  # the second pass, in the other order
        if c in engines:
            evidence[c.label]["frames_per_s"].append(round(measure_rate(engines[c], pixels, batch), 2))
    for c in cands:
        ev = evidence[c.label]
        if "frames_per_s" in ev:
            ev["best_frames_per_s"] = max(ev["frames_per_s"])
        if not ev["passed"] and "error" not in ev:
            _logger.warning("CPU choice: %s fails parity with fp32 on %s (top-1 agreement %.2f %%, max |dp| %.4f; "
                            "needs >= %.1f %% and <= %g): not used", c.label, bundle.name, 100 * ev["top1_agreement"],
                            ev["max_abs_dp"], 100 * MIN_TOP1_AGREEMENT, MAX_ABS_DP)
    passing = [c for c in cands if evidence[c.label]["passed"]]
    if not passing:  # only an explicit bf16 gets here: give what was asked for, the closer of the two to fp32
        chosen = cands[-1]
        reason = f"no candidate passed parity; {chosen.label} (the closest to fp32) as asked"
        _logger.warning("CPU choice: %s", reason)
    else:
        chosen = max(passing, key=lambda c: evidence[c.label]["best_frames_per_s"])
        reason = f"fastest of {len(passing)} that pass parity" if len(passing) > 1 else "the only one that passes"
    failed = [c.label for c in cands if not evidence[c.label]["passed"]]
    if failed and passing:
        reason += f" ({', '.join(failed)} failed it)"
    decision = {"backend": chosen.backend, "precision": chosen.precision, "options": chosen.options,
                "label": chosen.label, "reason": reason, "batch": batch, "evidence": evidence}
    return decision, engines


def choose(bundle: ModelBundle, *, backend: str, precision: str, max_batch: int, store: Any = None,
           rebuild: str = "auto", parity_frames: int | None = None, build: Any) -> tuple[Any, dict[str, Any] | None]:
    """The engine for `backend` x `precision` on this CPU and the decision behind it (None: nothing to choose).

    `build(candidate)` creates a candidate's engine at `max_batch`. The decision is loaded from the store when its
    identity matches (policy `auto`), measured and stored otherwise (`force`: always measured; `never`: refused)."""
    from capsule_batch.backends.base import BACKENDS
    from capsule_batch.backends.compiled import compiler_available
    from capsule_batch.backends.engine_store import EngineStore

    ort_ok = BACKENDS.get("onnxruntime").available()[0]
    cpu = cpu_info()
    forced = forced_candidate()
    if forced is not None and forced in candidates(backend, precision, {**cpu, "flags": list(BF16_FLAGS)}, True,
                                                   compiler=True):
        _logger.warning("CPU choice for %s forced by %s: %s (not measured; its parity bound is max |dp| <= %g)",
                        bundle.name, FORCE_ENV, forced.label, forced.parity_bound)
        decision = {"backend": forced.backend, "precision": forced.precision, "options": forced.options,
                    "label": forced.label, "reason": f"forced by {FORCE_ENV}", "forced": True, "evidence": {},
                    "measured_now": False, "stored": None}
        return build(forced), decision
    store = EngineStore.of(store)
    cands = candidates(backend, precision, cpu, ort_ok,
                       int8_candidates(bundle, store) if ort_ok and precision == "auto" else [],
                       compiler=compiler_available()[0])
    if not cands:
        raise EngineError(f"backend {backend} with precision {precision} has nothing to run on this CPU")
    if len(cands) == 1:
        return build(cands[0]), None
    n = int(parity_frames or DEFAULT_PARITY_FRAMES)
    built: dict[Candidate, Any] = {}

    def measure(tmp: Path) -> tuple[str, dict[str, Any]]:
        decision, engines = decide(bundle, cands, build, max_batch, n)
        built.update(engines)
        (tmp / CHOICE_FILE).write_text(json.dumps(decision, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return CHOICE_FILE, {"precision": decision["precision"], "chosen": decision["label"]}

    entry = f"cpu-choice-{backend}-{precision}"
    path, meta = store.ensure(bundle, entry, identity(bundle, cpu, n, cands), measure, policy=rebuild)
    decision = json.loads(Path(path).read_text(encoding="utf-8"))
    chosen = Candidate.from_decision(decision)
    decision["measured_now"] = bool(built)
    decision["stored"] = str(Path(path).parent)
    engine = built.pop(chosen, None)
    for other in built.values():
        other.close()
    if engine is None:
        _logger.info("CPU choice for %s (stored %s): %s — %s", bundle.name, meta.get("created"), chosen.label,
                     decision["reason"])
        engine = build(chosen)
    else:
        _logger.info("CPU choice for %s: %s — %s", bundle.name, chosen.label, decision["reason"])
    return engine, decision


def parity_bound(engine: Any) -> float:
    """The max |dp| against torch fp32 that a built engine is held to (`Candidate.parity_bound`), from what it is."""
    desc = engine.describe()
    return FP32_MAX_ABS_DP if desc.get("precision") == "fp32" else MAX_ABS_DP  # bf16, and int8 chosen by auto


__all__ = ["ALL_CANDIDATES", "BF16_CAST", "BF16_CAST_COMPILED", "BF16_FLAGS", "Candidate", "DEFAULT_PARITY_FRAMES",
           "FORCE_ENV", "FP32_COMPILED", "FP32_MAX_ABS_DP", "MAX_ABS_DP", "MIN_TOP1_AGREEMENT", "REFERENCE",
           "candidates", "choose", "compare", "cpu_info", "forced_candidate", "native_bf16", "parity_bound",
           "parity_pixels", "within_fidelity"]
