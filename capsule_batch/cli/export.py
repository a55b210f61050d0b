"""`capsule-batch export`: a study's flagged frames as JPEG files plus CSV of events and per-frame scores; or the
readers' decisions (`--decisions`) and frame labels for training (`--labels`) of one or more studies."""

from __future__ import annotations

from pathlib import Path

import click

from capsule_batch.cli.options import emit_json, existing_path, json_option, overwrite_option


def _studies(paths: tuple[Path, ...]) -> list[Path]:
    """Study files, a folder standing for the finished studies in it."""
    out: list[Path] = []
    for p in paths:
        out += sorted(p.glob("*.h5")) if p.is_dir() else [p]
    if not out:
        raise click.BadParameter(f"no study files in {', '.join(map(str, paths))}", param_hint="STUDY")
    return out


@click.command("export")
@click.argument("studies", nargs=-1, required=True, type=existing_path())
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Folder to write into: thumbs/, events.csv and frames.csv; or decisions.csv (--decisions); or "
                   "<study>.labels.csv and datasets.yaml (--labels).")
@click.option("--decisions", is_flag=True,
              help="The readers' decisions of every STUDY (or folder of studies) as decisions.csv: recording, event, "
                   "frames and times, detected class, decision, class, note, reviewer, time.")
@click.option("--labels", is_flag=True,
              help="Frame labels from the readers' decisions, as `python -m train` reads labelled frames inside "
                   "recordings (confirmed: the event's class; rejected: the class the reader gave, or the normal "
                   "class); datasets.yaml lists one dataset per study (docs/operations.md).")
@overwrite_option
@json_option
def command(studies: tuple[Path, ...], out_dir: Path, decisions: bool, labels: bool, overwrite: bool,
            as_json: bool) -> None:
    """Export STUDY.h5: event thumbnails, events.csv, frames.csv; or with --decisions / --labels, what the readers
    decided in one or more studies."""
    from capsule_batch.study import export

    if decisions or labels:
        found = _studies(studies)
        res: dict = {}
        if decisions:
            res.update(export.export_decisions(found, out_dir))
        if labels:
            res.update(export.export_labels(found, out_dir))
        if as_json:
            emit_json(res)
            return
        if decisions:
            click.echo(f"wrote {res['decisions']} decisions of {res['studies']} studies to {res['decisions_csv']}")
        if labels:
            click.echo(f"wrote {res['frames']} labelled frames of {res['studies']} studies; datasets: "
                       f"{res['datasets_yaml']}")
        return
    if len(studies) != 1:
        raise click.BadParameter("one study at a time (several only with --decisions or --labels)",
                                 param_hint="STUDY")
    res = export.export_study(studies[0], out_dir, overwrite=overwrite)
    if as_json:
        emit_json(res)
    else:
        click.echo(f"exported {res['events']} events, {res['thumbnails']} thumbnails and {res['frames']} frames "
                   f"to {res['output']}")
