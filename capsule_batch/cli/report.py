"""`capsule-batch report`: one self-contained HTML file for a study (provenance, counts, timeline, events)."""

from __future__ import annotations

from pathlib import Path

import click

from capsule_batch.cli.options import (
    check_writable_parent,
    emit_json,
    existing_path,
    json_option,
    output_path,
    reading_options,
)


@click.command("report")
@click.argument("study", type=existing_path())
@click.option("-o", "--output", "out", required=True, type=output_path(), help="The HTML file to write.")
@click.option("--thumbs-per-event", type=click.IntRange(0, 50), default=3, show_default=True,
              help="Thumbnails embedded per event (the peak first).")
@click.option("--max-image-mb", type=click.FloatRange(0.1, 500), default=12.0, show_default=True,
              help="Budget for embedded images; beyond it the report says how many were left out.")
@click.option("--findings", type=existing_path(), default=None,
              help="A findings CSV (finding, class, start_frame, end_frame) of this recording: the report then shows "
                   "what was caught, per finding and per class, as `compare` computes it.")
@reading_options
@json_option
def command(study: Path, out: Path, thumbs_per_event: int, max_image_mb: float, findings: Path | None,
            reading_fps: float, event_seconds: float, as_json: bool) -> None:
    """Write a self-contained HTML report of STUDY.h5 (with its reading estimate; --findings adds what was caught)."""
    from capsule_batch.evaluation.reading_time import ReadingModel
    from capsule_batch.review.report import write_report

    check_writable_parent(out)
    path = write_report(study, out, thumbs_per_event, int(max_image_mb * 1024 * 1024), findings,
                        ReadingModel(reading_fps, event_seconds))
    size = path.stat().st_size
    if as_json:
        emit_json({"output": str(path), "bytes": size})
    else:
        click.echo(f"report written to {path} ({size / 1e6:.1f} MB)")
