"""`capsule-batch bench`: frames/s by stage (decode, engine, end to end), one JSON line per stage."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from capsule_batch.cli.options import emit_json, engine_options, existing_path, resolve_batch_size


@click.command("bench")
@click.argument("recording", required=False, type=existing_path())
@click.option("-m", "--bundle", "bundle_path", required=True, type=existing_path(), help="Model bundle folder.")
@click.option("--stage", type=click.Choice(["decode", "engine", "e2e", "all"]), default="all", show_default=True)
@click.option("--frames", type=click.IntRange(min=2), default=512, show_default=True,
              help="Frames of the synthetic recording made when none is given; cap on frames timed for decode.")
@engine_options
@click.option("--compile", "compile_", is_flag=True, help="torch backend: torch.compile the model.")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="torch backend on CUDA: replay CUDA graphs (default: on, as `run`).")
@click.option("--inflight", type=click.IntRange(min=1), default=2, show_default=True,
              help="e2e: batches queued on the device at once (as `run --inflight`).")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed engine calls.")
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True, help="Timed engine calls.")
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where the synthetic recording and the e2e study go (default: a temporary folder).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also append the JSON lines to this .jsonl file.")
@click.option("--json", "as_json", is_flag=True, help="Accepted for symmetry: the JSON lines are always printed.")
def command(recording: Path | None, bundle_path: Path, stage: str, frames: int, engine: str, source: str, device: str,
            precision: str, batch_size: int | None, compile_: bool, cuda_graphs: bool | None, inflight: int,
            warmup: int,
            repeats: int,
            workdir: Path | None, out: Path | None, as_json: bool) -> None:
    """Measure frames/s of decode only, engine only and end to end on RECORDING (a synthetic 336x336 H.264
    recording when none is given). Prints one JSON line per stage on stdout with the whole configuration;
    the engine line also carries GFLOP/frame and the achieved TFLOP/s."""
    from capsule_batch.errors import CapsuleError
    from capsule_batch.model.bundle import ModelBundle
    from capsule_batch.run.measure import STAGES, run_benchmarks

    bundle = ModelBundle.load(bundle_path)
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    kw = {}
    if compile_:
        kw["compile"] = True
    if cuda_graphs is not None:
        kw["cuda_graphs"] = cuda_graphs
    try:
        results = run_benchmarks(bundle, recording, stages=STAGES if stage == "all" else (stage,), backend=engine,
                                 source=source, device=device, precision=precision,
                                 batch_size=resolve_batch_size(batch_size, device), frames=frames, warmup=warmup,
                                 repeats=repeats,
                                 workdir=workdir, inflight=inflight, engine_kwargs=kw)
    except RuntimeError as e:
        raise CapsuleError(str(e)) from e
    argv = " ".join(["capsule-batch", *sys.argv[1:]])
    for r in results:
        r["command"] = argv
        emit_json(r)
        click.echo(f"{r['stage']:<7} {r['frames_per_s']:>12,.1f} frames/s"
                   + (f"  {r['tflop_per_s']:.3f} TFLOP/s" if "tflop_per_s" in r else ""), err=True)
    if out is not None:
        with open(out, "a", encoding="utf-8") as fh:
            for r in results:
                fh.write(json.dumps(r, default=str) + "\n")
