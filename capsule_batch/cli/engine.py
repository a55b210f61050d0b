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
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--max-batch", type=click.IntRange(1, 65536), default=256, show_default=True,
              help="Largest batch the engine accepts (TensorRT profile max).")
@click.option("--opt-batch", type=click.IntRange(1, 65536), default=None,
              help="TensorRT profile opt batch (default: --max-batch).")
@click.option("--force", is_flag=True, help="Rebuild even if an up-to-date engine exists.")
@engines_option
@json_option
def build_cmd(bundle: Path, backend: str, device: str, precision: str, max_batch: int, opt_batch: int | None,
              force: bool, engines_dir: Path | None, as_json: bool) -> None:
    """Build (or check) the engine for BUNDLE on this machine; a stale engine is rebuilt."""
    from capsule_batch.backends import create_engine
    from capsule_batch.bundle import ModelBundle
    from capsule_batch.engine_store import EngineStore

    b = ModelBundle.load(bundle)
    kwargs = {"opt_batch": opt_batch} if opt_batch else {}
    engine = create_engine(b, backend=backend, device=device, precision=precision, max_batch=max_batch,
                           store=EngineStore(engines_dir), rebuild="force" if force else "auto", **kwargs)
    info = engine.describe()
    engine.close()
    if as_json:
        emit_json(info)
    elif "artifact" in info:
        click.echo(f"{info['backend']} {info['precision']} engine on {info['device']}: {info['artifact']}")
    else:
        click.echo(f"{info['backend']} {info['precision']} on {info['device']}: built in-process at run time, "
                   "nothing to store")


@command.command("list")
@engines_option
@click.option("--verify", is_flag=True, help="Hash every engine file against its meta.json (slow for large ones).")
@json_option
def list_cmd(engines_dir: Path | None, verify: bool, as_json: bool) -> None:
    """List the engines in the store with what they were built from and whether they are usable."""
    from capsule_batch.engine_store import EngineStore

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
        gpu = r.get("gpu") or {}
        where = f"{gpu.get('name')} sm{gpu.get('capability')}" if gpu else "any device"
        batch = r.get("batch")
        prof = f" batch {batch['min']}/{batch['opt']}/{batch['max']}" if isinstance(batch, dict) else ""
        prec = r.get("precision") or r.get("dtype")
        size = f"{r['bytes'] / 1e6:.1f} MB" if isinstance(r.get("bytes"), int) else "?"
        click.echo(f"{r['path']}  {r.get('backend')} {r.get('backend_version')}  {prec}  {where}{prof}  {size}  "
                   f"bundle {str(r.get('bundle_sha256'))[:12]}  {r['status']}")
