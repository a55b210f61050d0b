"""`capsule-batch compare`: which annotated findings a study's events caught (capsule_batch.groundtruth)."""

from __future__ import annotations

from pathlib import Path

import click

from capsule_batch.cli.options import emit_json, existing_path, json_option


@click.command("compare")
@click.argument("study", type=existing_path())
@click.argument("findings", type=existing_path())
@json_option
def command(study: Path, findings: Path, as_json: bool) -> None:
    """Compare STUDY.h5's events with FINDINGS.csv (finding, class, start_frame, end_frame).

    A finding is caught when an event overlaps its frames; `synth` writes such a file beside each recording.
    """
    from capsule_batch.groundtruth import compare

    c = compare(study, findings)
    if as_json:
        emit_json(c.to_json())
        return
    for r in c.rows:
        got = ", ".join(r.event_classes) if r.caught else "missed"
        click.echo(f"{r.finding:>5} {r.cls:18s} frames {r.start}-{r.end}: {got}")
    click.echo(f"caught {c.caught}/{c.findings} findings ({c.caught_class} with the right class); "
               f"{c.events} events, {c.false_events} on no finding; "
               f"{c.flagged_frames}/{c.frames} frames flagged ({100 * c.flag_rate:.1f}%)")
