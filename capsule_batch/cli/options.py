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
    """--reading-fps/--event-seconds: the assumptions of every reading-time estimate (capsule_batch.reading)."""
    from capsule_batch.reading import DEFAULT_EVENT_S, DEFAULT_READING_FPS

    f = click.option("--event-seconds", type=click.FloatRange(min=0), default=DEFAULT_EVENT_S, show_default=True,
                     help="Assumed time a reader spends on each event, on top of its frames.")(f)
    return click.option("--reading-fps", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_READING_FPS,
                        show_default=True, help="Assumed reading speed in frames per second.")(f)


def engine_options(f: Any) -> Any:
    """--engine/--source/--device/--precision/--batch-size, shared by run and bench."""
    from capsule_batch.devices import PRECISIONS

    for opt in reversed([
        click.option("--engine", default="auto", show_default=True,
                     help="Inference backend: auto, tensorrt, torch, onnxruntime."),
        click.option("--source", default="auto", show_default=True, help="Frame source: auto, dali, decord, images."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True),
        click.option("--batch-size", type=click.IntRange(min=1), default=None,
                     help="Frames per decode batch and engine call (default: 256 on a GPU, 64 on a CPU)."),
    ]):
        f = opt(f)
    return f


def resolve_batch_size(batch_size: int | None, device: str) -> int:
    """--batch-size, or the auto batch size of the device the run will use (backends.base.AUTO_BATCH_SIZE)."""
    if batch_size is not None:
        return batch_size
    from capsule_batch.backends.base import auto_batch_size
    from capsule_batch.runner import run_device

    return auto_batch_size(run_device(device).type)
