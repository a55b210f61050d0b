"""Options and helpers shared by several commands, validated in one place."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an existing output.")


def existing_path(**kw: Any) -> click.Path:
    """An input path. Existence is checked by the library, so a missing file is a run error (exit 1)
    with the file named, not a usage error."""
    return click.Path(path_type=Path, **kw)


def output_path() -> click.Path:
    return click.Path(path_type=Path, dir_okay=True, file_okay=True)


def check_writable_parent(path: Path) -> None:
    """Fail before any work when the folder an output goes into is missing or read-only (files.unwritable)."""
    from capsule_batch.files import output_folder_problem

    parent = path.parent if str(path.parent) else Path(".")
    why = output_folder_problem(parent)
    if why:
        raise click.ClickException(f"{parent}: {why}")


def parse_key_values(items: tuple[str, ...], what: str) -> dict[str, Any]:
    """`key=value` pairs; values parsed as JSON where they are valid JSON (numbers, booleans), else strings."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"expected key=value, got {item!r}", param_hint=what)
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def reading_options(f: Any) -> Any:
    """--reading-fps/--event-seconds: the assumptions of every reading-time estimate
    (capsule_batch.evaluation.reading_time)."""
    from capsule_batch.evaluation.reading_time import DEFAULT_EVENT_S, DEFAULT_READING_FPS

    f = click.option("--event-seconds", type=click.FloatRange(min=0), default=DEFAULT_EVENT_S, show_default=True,
                     help="Assumed time a reader spends on each event, on top of its frames.")(f)
    return click.option("--reading-fps", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_READING_FPS,
                        show_default=True, help="Assumed reading speed in frames per second.")(f)


#: the environment variable a service sets instead of an option (click shows it in --help)
def env_name(option: str) -> str:
    return "CAPSULE_BATCH_" + option.upper().replace("-", "_")


def engine_options(f: Any) -> Any:
    """--engine/--source/--device/--precision/--batch-size, shared by run, watch and bench; each also read from
    CAPSULE_BATCH_<NAME> (e.g. CAPSULE_BATCH_DEVICE)."""
    from capsule_batch.devices import PRECISIONS

    env = {"envvar": None, "show_envvar": True}
    for opt in reversed([
        click.option("--engine", default="auto", show_default=True, **{**env, "envvar": env_name("engine")},
                     help="Inference backend: auto, tensorrt, torch, onnxruntime."),
        click.option("--source", default="auto", show_default=True, **{**env, "envvar": env_name("source")},
                     help="Frame source: auto, dali, decord, pyav, images."),
        click.option("--device", default="auto", show_default=True, **{**env, "envvar": env_name("device")},
                     help="auto, cpu, cuda or cuda:N."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                     **{**env, "envvar": env_name("precision")}),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Frames per decode batch and engine call (default: 256 on a GPU, 64 on a CPU)."),
    ]):
        f = opt(f)
    return f


def dataclass_default(cls: Any, name: str) -> Any:
    """The default of field `name` of the dataclass `cls`: an option's default is written once, on the options
    dataclass the command fills (RunOptions, TriageConfig), and the CLI shows it from there."""
    import dataclasses

    f = {x.name: x for x in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def log_options(f: Any) -> Any:
    """-v/-q (also after the subcommand), --log-file, --log-format, --progress-every: for runs nobody watches."""
    from capsule_batch.logs import LOG_FORMATS
    from capsule_batch.run.pipeline import RunOptions

    for opt in reversed([
        click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     envvar=env_name("log-file"), show_envvar=True,
                     help="Also append the log to this file, each line timestamped (docs/operations.md)."),
        click.option("--log-format", type=click.Choice(LOG_FORMATS), default="text", show_default=True,
                     envvar=env_name("log-format"), show_envvar=True,
                     help="The log file's lines: text, or one JSON object per line for a log collector."),
        click.option("--progress-every", type=click.FloatRange(min=0),
                     default=dataclass_default(RunOptions, "progress_every"), show_default=True,
                     help="Where stderr is not a terminal (cron, SLURM, a service): a progress line every this many "
                          "seconds (0: none); on a terminal the bar."),
        click.option("-v", "--verbose", "sub_verbose", count=True, help="More log output (-vv for debug)."),
        click.option("-q", "--quiet", "sub_quiet", is_flag=True, help="Only warnings and errors on stderr."),
    ]):
        f = opt(f)
    return f


def apply_log_options(log_file: Path | None, log_format: str, verbose: int, quiet: bool) -> None:
    """What `log_options` asks for: the stderr level (as the group's -v/-q) and the log file, which always gets
    INFO and up (DEBUG with -vv) whatever stderr shows."""
    import logging

    from capsule_batch.logs import add_log_file, stderr_handlers

    root = logging.getLogger()
    stderr = stderr_handlers()
    if verbose:
        root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    shown = logging.WARNING if quiet else root.level
    for h in stderr:
        h.setLevel(shown)
    if log_file is not None:
        root.setLevel(min(root.level, logging.INFO))
        try:
            add_log_file(log_file, log_format, level=root.level)
        except OSError as e:
            raise click.BadParameter(f"{log_file}: cannot write the log file ({e.strerror or e})",
                                     param_hint="--log-file") from None


def resolve_batch_size(batch_size: int | None, device: str) -> int:
    """--batch-size, or the auto batch size of the device the run will use (backends.select.AUTO_BATCH_SIZE)."""
    if batch_size is not None:
        return batch_size
    from capsule_batch.backends.select import auto_batch_size
    from capsule_batch.run.runner import run_device

    return auto_batch_size(run_device(device).type)
