"""`capsule-batch run`: classify whole recordings into HDF5 study files (capsule_batch.run.runner.run_recordings)."""

from __future__ import annotations

import logging
import sys
import threading
from functools import partial
from pathlib import Path
from typing import Any

import click

from capsule_batch.cli.options import (
    apply_log_options,
    dataclass_default,
    emit_json,
    engine_options,
    env_name,
    existing_path,
    json_option,
    log_options,
    resolve_batch_size,
)

_logger = logging.getLogger(__name__)


def _check_shard(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A malformed --shard is a usage error (exit 2), found before any recording is opened."""
    from capsule_batch.run.runner import parse_shard

    if value is not None:
        try:
            parse_shard(value)
        except ValueError as e:
            raise click.BadParameter(f"{value!r}: {e}") from None
    return value


def study_options(f: Any) -> Any:
    """What `run` and `watch` share: the model, the output folder, the engine, how studies are made and reused, and
    the logs. `run_options(**kwargs)` turns them into RunOptions. The defaults are RunOptions' and TriageConfig's
    own: written once, there."""
    from capsule_batch.run.pipeline import RunOptions
    from capsule_batch.study.triage import TriageConfig

    run, triage = partial(dataclass_default, RunOptions), partial(dataclass_default, TriageConfig)
    for opt in reversed([
        click.option("-m", "--model", "bundle_path", required=True, type=existing_path(), envvar=env_name("model"),
                     show_envvar=True, help="Model bundle folder."),
        click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
                     envvar=env_name("output"), show_envvar=True,
                     help="Folder for the study files (OUTDIR/<name>.h5: the recording's name, its parent's too where "
                          "the name says nothing, e.g. a/images -> a_images.h5); created if missing."),
        engine_options,
        click.option("--resume/--overwrite", default=run("resume"), show_default=True,
                     help="Continue a partial study file (default), or start every study over, finished ones "
                          "included (the old ones are not kept)."),
        click.option("--reuse", type=click.Choice(["same", "never", "any"]), default=run("reuse"), show_default=True,
                     envvar=env_name("reuse"), show_envvar=True,
                     help="A finished study is skipped when it answers the same question (same: the same recording "
                          "content, bundle weights, triage settings and precision class), never, or whenever it "
                          "exists (any). A study redone is kept beside the new one as <name>.<created>.h5."),
        click.option("--top-k", type=click.IntRange(min=1), default=triage("top_k"),
                     help="Keep only the K highest-scoring events."),
        click.option("--merge-gap", type=click.IntRange(min=0), default=triage("merge_gap"), show_default=True,
                     help="Flagged frames of one class at most this many frames apart form one event."),
        click.option("--min-run", type=click.IntRange(min=1), default=triage("min_run"), show_default=True,
                     help="Drop events with fewer flagged frames (off by default: validate per class first)."),
        click.option("--smooth", type=click.IntRange(min=1), default=triage("smooth"), show_default=True,
                     help="Moving average of the probabilities over this many frames before flagging (1: off)."),
        click.option("--per-class-events", is_flag=True,
                     help="One event per class; by default neighbouring runs of different classes are one event "
                          "(one stop per finding), led by the strongest peak."),
        click.option("--probs-dtype", type=click.Choice(["float16", "float32"]), default=run("probs_dtype"),
                     show_default=True,
                     help="Storage type of frames/probs."),
        click.option("--block-frames", type=click.IntRange(min=1), default=run("block_frames"), show_default=True,
                     help="Frames per flushed block: the most a crash can lose."),
        click.option("--thumbs-per-event", type=click.IntRange(min=1), default=run("thumbs_per_event"),
                     show_default=True),
        click.option("--max-thumbs", type=click.IntRange(min=0), default=run("max_thumbs"), show_default=True,
                     help="Thumbnails per study at most (events with the highest peaks first)."),
        click.option("--progress/--no-progress", default=run("progress"),
                     help="Progress bar on stderr (default: when a terminal)."),
        click.option("--decode-timeout", type=click.FloatRange(min=0), default=run("decode_timeout"), show_default=True,
                     help="Fail a recording whose decoder yields no frames for this many seconds (0: wait forever)."),
        click.option("--engine-timeout", type=click.FloatRange(min=0), default=run("engine_timeout"), show_default=True,
                     help="Fail the recording and end the process when one engine call takes this many seconds (a "
                          "hung GPU or driver; with a worker the next recordings go on in a new one; 0: wait "
                          "forever)."),
        click.option("--inflight", type=click.IntRange(min=1), default=run("inflight"), show_default=True,
                     help="Batches queued on the device at once: the next batch is launched before the last one's "
                          "results are waited for (1: one at a time)."),
        click.option("--fps", type=click.FloatRange(min=0, min_open=True), default=run("fps"),
                     help="Frame folders: the capture rate in frames/s, for the frames' times (stored in the study). "
                          "Without it a folder's frames have no times, and none are shown. Videos carry their own."),
        click.option("--exclude", multiple=True, metavar="PATTERN",
                     help="Frame folders: file names that are not frames (shell pattern, repeatable; replaces the "
                          "default mask/label patterns, e.g. *_mask.*; --exclude '' leaves nothing out). "
                          "docs/sources.md."),
        log_options,
    ]):
        f = opt(f)
    return f


def run_options(*, source: str, device: str, batch_size: int | None, resume: bool, reuse: str, top_k: int | None,
                merge_gap: int, min_run: int, smooth: int, per_class_events: bool, probs_dtype: str,
                block_frames: int, thumbs_per_event: int, max_thumbs: int, progress: bool | None,
                decode_timeout: float, engine_timeout: float, inflight: int,
                fps: float | None, exclude: tuple[str, ...], log_file: Path | None, log_format: str,
                progress_every: float, sub_verbose: int, sub_quiet: bool, shard: str = "0/1", **_: Any) -> Any:
    """RunOptions from `study_options`' values (the log options applied on the way)."""
    from capsule_batch.run.pipeline import RunOptions

    apply_log_options(log_file, log_format, sub_verbose, sub_quiet)
    return RunOptions(source=source, batch_size=resolve_batch_size(batch_size, device), resume=resume,
                      overwrite=not resume, reuse=reuse, progress_every=progress_every, probs_dtype=probs_dtype,
                      block_frames=block_frames,
                      triage_rules={"merge_gap": merge_gap, "min_run": min_run, "smooth": smooth, "top_k": top_k,
                                    "merge_classes": not per_class_events},
                      thumbs_per_event=thumbs_per_event, max_thumbs=max_thumbs, progress=progress,
                      argv=sys.argv[:], shard=shard, decode_timeout=decode_timeout or None,
                      engine_timeout=engine_timeout or None, inflight=inflight, fps=fps,
                      exclude=tuple(p for p in exclude if p) if exclude else None)


@click.command("run")
@click.argument("recordings", nargs=-1, required=True, type=existing_path())
@study_options
@click.option("--shard", default=None, metavar="I/N", callback=_check_shard,
              help="Process only recordings i with i % N == I (sorted); default: torchrun's RANK/WORLD_SIZE.")
@click.option("--isolate/--no-isolate", default=None,
              help="Run in a worker process, so that a native decoder crash fails one recording, not the batch "
                   "(default: when there is more than one recording).")
@json_option
def command(recordings: tuple[Path, ...], bundle_path: Path, out_dir: Path, engine: str, device: str,
            precision: str, shard: str | None, isolate: bool | None, as_json: bool, **kw: Any) -> None:
    """Decode and classify every frame of each RECORDING (video file or frame folder) into OUTDIR/<name>.h5.

    Exit 0 when all succeed, 1 when any failed, 130 when interrupted (rerun the command to resume).
    """
    from capsule_batch.exits import exit_process
    from capsule_batch.run.runner import (
        EngineSpec,
        StopOnSignals,
        output_problem,
        preflight,
        resolve_shard,
        run_recordings,
    )

    rank, world = resolve_shard(shard)
    opts = run_options(device=device, shard=f"{rank}/{world}", **kw)
    problem = output_problem(out_dir)
    if problem:
        raise click.ClickException(f"{out_dir}: {problem}")
    usable, failed = preflight(recordings)
    if not usable:
        _summarise(failed, rank, world, as_json)
        exit_process(1)
    stop = threading.Event()
    with StopOnSignals(stop):
        batch = run_recordings(usable, bundle_path, out_dir, engine=EngineSpec(engine, device, precision),
                               options=opts, stop=stop, shard=(rank, world), isolate=isolate)
    if batch.worker_exit is None:  # else the worker that could not start said why
        _summarise(failed + batch.results, rank, world, as_json)
    exit_process(1 if failed and batch.exit_code == 0 else batch.exit_code)


def _summarise(results: list[Any], rank: int, world: int, as_json: bool) -> None:
    """Print the outcome (and how to resume an interrupted run)."""
    failed = [r for r in results if r.status == "failed"]
    interrupted = [r for r in results if r.status == "interrupted"]
    if as_json:
        emit_json({"rank": rank, "world_size": world, "recordings": [r.to_json() for r in results],
                   "failed": len(failed), "interrupted": len(interrupted)})
    else:
        for r in results:
            split = f" ({r.time_split()})" if r.status == "done" and r.time_split() else ""
            what = r.error if r.error else (f"{r.frames} frames, {r.flagged_frames} flagged, {r.events} events, "
                                            f"{r.fps:.1f} frames/s{split}")
            click.echo(f"{r.status:11s} {r.recording}" + (f" -> {r.output}" if r.output else "") + f": {what}")
    if interrupted:
        click.echo("interrupted: run the same command again to resume from the last flushed block", err=True)
