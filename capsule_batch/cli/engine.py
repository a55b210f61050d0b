"""`capsule-batch engine build|list`: build engines into the engine store and show what it holds."""

from __future__ import annotations

from pathlib import Path

import click

from capsule_batch.cli.options import emit_json, existing_path, json_option

engines_option = click.option("--engine-dir", "engines_dir", type=click.Path(path_type=Path, file_okay=False),
                              default=None, help="Engine store folder (default: $CAPSULE_BATCH_ENGINES or ./engines).")


@click.group("engine")
def command() -> None:
    """Build compiled engines (ONNX exports, TensorRT plans) and list the engine store."""


@command.command("build")
@click.option("-m", "--model", "bundle", required=True, type=existing_path(), help="Model bundle folder.")
@click.option("--backend", type=click.Choice(["auto", "tensorrt", "onnxruntime", "torch"]), default="auto",
              show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16", "int8"]), default="auto",
              show_default=True)
@click.option("--max-batch", type=click.IntRange(1, 65536), default=256, show_default=True,
              help="Largest batch the engine accepts (TensorRT profile max).")
@click.option("--opt-batch", type=click.IntRange(1, 65536), default=None,
              help="TensorRT profile opt batch (default: --max-batch).")
@click.option("--compile", "compile_", is_flag=True,
              help="--backend torch on a CPU: compile the model ahead of time with TorchInductor (an AOTInductor "
                   "package in the engine store, which later runs load instead of compiling).")
@click.option("--force", is_flag=True, help="Rebuild even if an up-to-date engine exists (on a CPU: measure the "
              "choice again).")
@click.option("--parity-frames", type=click.IntRange(16, 100_000), default=None,
              help="CPU choice: frames each candidate is checked against fp32 on (default 256).")
@click.option("--calibration", type=existing_path(), default=None,
              help="int8: frames to calibrate on and check parity with fp32 on, a recording or frame folder like "
                   "what the model will read (best: the bundle's validation frames); default: synthetic "
                   "capsule-like frames.")
@click.option("--calibration-frames", type=click.IntRange(4, 4096), default=None,
              help="int8: frames taken from the calibration recording (default 64; half calibrate, half check).")
@engines_option
@json_option
def build_cmd(bundle: Path, backend: str, device: str, precision: str, max_batch: int, opt_batch: int | None,
              compile_: bool, force: bool, parity_frames: int | None, calibration: Path | None,
              calibration_frames: int | None, engines_dir: Path | None, as_json: bool) -> None:
    """Build (or check) the engine for BUNDLE on this machine; a stale engine is rebuilt.

    On a CPU, `auto` backend or precision is measured: every configuration this CPU runs natively is checked
    against fp32 and timed, and the fastest that passes is stored and used by later runs."""
    from capsule_batch.backends import create_engine
    from capsule_batch.backends.engine_store import EngineStore
    from capsule_batch.backends.int8 import DEFAULT_CALIBRATION_FRAMES
    from capsule_batch.model.bundle import ModelBundle

    b = ModelBundle.load(bundle)
    kwargs: dict = {"opt_batch": opt_batch} if opt_batch else {}
    if compile_:
        if backend != "torch":
            raise click.UsageError("--compile is for --backend torch")
        kwargs.update(compile=True, cast=precision in ("bf16", "fp16"))
    if calibration is not None or calibration_frames is not None:
        if precision != "int8":
            raise click.UsageError("--calibration and --calibration-frames are for --precision int8")
        kwargs.update(calibration=str(calibration) if calibration else None,
                      calibration_frames=calibration_frames or DEFAULT_CALIBRATION_FRAMES)
    engine = create_engine(b, backend=backend, device=device, precision=precision, max_batch=max_batch,
                           store=EngineStore(engines_dir), rebuild="force" if force else "auto",
                           parity_frames=parity_frames, **kwargs)
    info = engine.describe()
    choice = engine.choice
    engine.close()
    if as_json:
        emit_json({**info, "choice": choice} if choice else info)
        return
    if choice:
        echo_choice(choice)
    if "artifact" in info:
        click.echo(f"{info['backend']} {info['precision']} engine on {info['device']}: {info['artifact']}")
    if info.get("compile_seconds") is not None:
        click.echo(f"compiled ahead of time in {info['compile_seconds']:.1f} s (once; later runs load the package)")
    if info.get("int8_parity"):
        par, calib = info["int8_parity"], info.get("calibration") or {}
        click.echo(f"int8 against fp32 on {par['frames']} held-out frames of {calib.get('source')}: top-1 agreement "
                   f"{100 * par['top1_agreement']:.2f} %, max |dp| {par['max_abs_dp']:.4f} — "
                   + ("meets the Fidelity bounds: `auto` considers it" if par["passed"] else
                      "misses the Fidelity bounds (top-1 >= 99.9 %, max |dp| <= 0.01): used only with "
                      "--precision int8"))
    if "artifact" not in info:
        click.echo(f"{info['backend']} {info['precision']} on {info['device']}: built in-process at run time, "
                   "nothing to store")


def echo_choice(choice: dict) -> None:
    """The CPU choice: what won, why, and each candidate's parity and speed."""
    how = "measured now" if choice.get("measured_now") else "stored"
    click.echo(f"CPU choice ({how}, {choice.get('stored')}): {choice['label']} — {choice['reason']}")
    for label, ev in sorted(choice.get("evidence", {}).items()):
        if "error" in ev:
            click.echo(f"  {label:<26} cannot run here: {ev['error']}")
            continue
        rate = ev.get("best_frames_per_s", max(ev.get("frames_per_s") or [0]))
        verdict = "reference" if ev.get("reference") else "passes" if ev["passed"] else "FAILS"
        click.echo(f"  {label:<26} {rate:9.1f} frames/s  top-1 {100 * ev['top1_agreement']:6.2f} %  "
                   f"max |dp| {ev['max_abs_dp']:.4f}  {verdict}")


@command.command("list")
@engines_option
@click.option("--verify", is_flag=True, help="Hash every engine file against its meta.json (slow for large ones).")
@json_option
def list_cmd(engines_dir: Path | None, verify: bool, as_json: bool) -> None:
    """List the engines in the store with what they were built from and whether they are usable."""
    from capsule_batch.backends.engine_store import EngineStore

    store = EngineStore(engines_dir)
    rows = store.entries(verify=verify)
    if as_json:
        for r in rows:
            emit_json(r)
        return
    if not rows:
        click.echo(f"{store.root}: no engines")
        return
    for r in rows:
        if r.get("backend") == "cpu-choice":
            cpu = r.get("cpu") or {}
            click.echo(f"{r['path']}  cpu choice: {r.get('chosen')}  on {cpu.get('model')} ({cpu.get('cores')} cores, "
                       f"{' '.join(cpu.get('flags') or []) or 'no AVX'})  bundle {str(r.get('bundle_sha256'))[:12]}  "
                       f"{r['status']}")
            continue
        gpu = r.get("gpu") or {}
        if gpu:
            where = f"{gpu.get('name')} sm{gpu.get('capability')}"
        elif r.get("kind") == "aoti":  # a compiled CPU package: machine code for one CPU and thread count
            where = f"{(r.get('cpu') or {}).get('model')} ({r.get('threads')} threads)"
        else:
            where = "any device"
        batch = r.get("batch")
        prof = f" batch {batch['min']}/{batch['opt']}/{batch['max']}" if isinstance(batch, dict) else ""
        prec = r.get("precision") or r.get("dtype")
        size = f"{r['bytes'] / 1e6:.1f} MB" if isinstance(r.get("bytes"), int) else "?"
        click.echo(f"{r['path']}  {r.get('backend')} {r.get('backend_version')}  {prec}  {where}{prof}  {size}  "
                   f"bundle {str(r.get('bundle_sha256'))[:12]}  {r['status']}")
