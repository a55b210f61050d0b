"""`capsule-batch export`: a study's flagged frames as JPEG files plus CSV of events and per-frame scores."""

from __future__ import annotations

from pathlib import Path

import click

from capsule_batch.cli.options import emit_json, existing_path, json_option, overwrite_option


@click.command("export")
@click.argument("study", type=existing_path())
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Folder to write thumbs/, events.csv and frames.csv into.")
@overwrite_option
@json_option
def command(study: Path, out_dir: Path, overwrite: bool, as_json: bool) -> None:
    """Export STUDY.h5: event thumbnails, events.csv, frames.csv."""
    from capsule_batch.export import export_study

    res = export_study(study, out_dir, overwrite=overwrite)
    if as_json:
        emit_json(res)
    else:
        click.echo(f"exported {res['events']} events, {res['thumbnails']} thumbnails and {res['frames']} frames "
                   f"to {res['output']}")
