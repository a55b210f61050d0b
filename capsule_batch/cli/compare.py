"""`capsule-batch compare`: what a study's events caught, how late, and what reading them costs, for one study
or a folder of studies (capsule_batch.evaluation.groundtruth, capsule_batch.evaluation.burden)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from capsule_batch.cli.options import (
    check_writable_parent,
    emit_json,
    existing_path,
    json_option,
    output_path,
    reading_options,
)
from capsule_batch.evaluation.reading_time import clock
from capsule_batch.evaluation.stats import DEFAULT_BOOTSTRAP


@click.command("compare")
@click.argument("studies", type=existing_path())
@click.argument("findings", type=existing_path(), required=False)
@reading_options
@click.option("--bootstrap", "draws", type=click.IntRange(min=0), default=DEFAULT_BOOTSTRAP, show_default=True,
              help="Resamples of the studies for the intervals of rates (0: none).")
@click.option("--plot", type=output_path(), default=None,
              help="Write an SVG chart: findings caught against frames to read, per class.")
@json_option
def command(studies: Path, findings: Path | None, reading_fps: float, event_seconds: float, draws: int,
            plot: Path | None, as_json: bool) -> None:
    """Compare STUDY.h5's events with FINDINGS.csv (finding, class, start_frame, end_frame), or every study in
    a folder with FINDINGS/<stem>.findings.csv (FINDINGS defaults to the study's folder).

    A finding is caught when an event overlaps its frames; `synth` writes such a file beside each recording.
    Reports lesion-level sensitivity per class, detection delays, false alerts per hour, frames to read and an
    estimated reading time (definitions: docs/evaluation.md).
    """
    from capsule_batch.evaluation.burden import curve_svg, summarise
    from capsule_batch.evaluation.groundtruth import compare, pair_studies
    from capsule_batch.evaluation.reading_time import ReadingModel
    from capsule_batch.review.report import class_colours

    if plot is not None:
        if plot.suffix.lower() != ".svg":
            raise click.BadParameter(f"{plot}: the chart is written as SVG; name it *.svg", param_hint="--plot")
        check_writable_parent(plot)
    model = ReadingModel(reading_fps, event_seconds)
    pairs = pair_studies(studies, findings)
    comparisons = [compare(s, f, model) for s, f in pairs]
    summary = summarise(comparisons, model, draws=draws)
    if plot is not None:
        title = comparisons[0].study if len(comparisons) == 1 else f"{len(comparisons)} studies"
        plot.write_text(curve_svg(summary.curve, class_colours(comparisons[0].class_names), Path(title).name),
                        encoding="utf-8")
    if as_json:
        if len(comparisons) == 1 and not studies.is_dir():
            emit_json({**comparisons[0].to_json(), "summary": summary.to_json()})
        else:
            emit_json({"studies": [c.to_json() for c in comparisons], "summary": summary.to_json()})
        return
    if len(comparisons) == 1 and not studies.is_dir():
        _echo_study(comparisons[0])
    else:
        _echo_studies(comparisons)
    _echo_table(summary)
    s = summary.overall
    click.echo(f"assumptions: {model.describe()}; reading the whole recording takes "
               f"{clock(summary.full_reading_min * 60)} per study; 95% intervals: "
               + (f"for sensitivity Wilson joined with a bootstrap over the {summary.studies} studies (findings "
                  f"clustered by study), for rates the bootstrap ({summary.bootstrap} resamples)"
                  if summary.bootstrap and summary.studies > 1 else "Wilson for sensitivity"))
    c = comparisons[0] if len(comparisons) == 1 else None
    flagged = sum(x.flagged_frames for x in comparisons)
    frames = sum(x.frames for x in comparisons)
    events = sum(x.events for x in comparisons)
    click.echo(f"caught {s.caught}/{s.findings} findings ({s.caught_class} with the right class); "
               f"{events} events, {s.false_alerts} on no finding; "
               f"{flagged}/{frames} frames flagged ({100 * flagged / max(1, frames):.1f}%)"
               + (f" in {len(comparisons)} studies" if c is None else ""))
    if plot is not None:
        click.echo(f"chart written to {plot}")


def _delay(r: Any) -> str:
    secs = f", +{r.delay_s:.1f} s" if r.delay_s is not None else ""
    return f"detected at frame {r.detected_frame}: +{r.delay_frames} frames{secs}"


def _echo_study(c: Any) -> None:
    click.echo(f"{Path(c.study).name}: {c.frames} frames ({clock(c.duration_s) or 'duration unknown'}), "
               f"{c.events} events")
    for r in c.rows:
        got = f"caught ({', '.join(r.event_classes)}), {_delay(r)}" if r.caught else "missed"
        click.echo(f"{r.finding:>5} {r.cls:18s} frames {r.start}-{r.end}: {got}")
    if c.reading is not None:
        click.echo("reading: " + c.reading.describe())


def _echo_studies(comparisons: list[Any]) -> None:
    click.echo(f"{'study':24s} {'frames':>8} {'duration':>9} {'caught':>8} {'false alerts':>12} "
               f"{'frames to read':>14} {'reading':>8}")
    for c in comparisons:
        r = c.reading
        click.echo(f"{Path(c.study).name[:24]:24s} {c.frames:8d} {clock(c.duration_s) or '?':>9} "
                   f"{f'{c.caught}/{c.findings}':>8} {c.false_events:12d} {r.frames_to_read:14d} "
                   f"{clock(r.reading_s):>8}")
    for c in comparisons:
        for r in c.misses:
            click.echo(f"missed: {Path(c.study).name} finding {r.finding} ({r.cls}, frames {r.start}-{r.end})")


def _ci(ci: Any, fmt: str) -> str:
    return f" ({fmt.format(ci[0])}-{fmt.format(ci[1])})" if ci else ""


def _echo_table(summary: Any) -> None:
    per_study = " per study" if summary.studies > 1 else ""
    click.echo(f"{'class':18s} {'findings':>8} {'caught':>6} {'sensitivity (95% CI)':>21} {'class ok':>8} "
               f"{'false alerts':>12} {'per hour':>19} {'frames to read' + per_study:>24} "
               f"{'reading min' + per_study:>22} {'median delay':>12}")
    rows = [*summary.per_class.items(), ("all", summary.overall)]
    for name, f in rows:
        sens = f"{f.sensitivity:.2f}{_ci(f.sensitivity_ci, '{:.2f}')}" if f.sensitivity is not None else "-"
        hour = f"{f.false_alerts_per_hour:.1f}{_ci(f.false_alerts_per_hour_ci, '{:.1f}')}" \
            if f.false_alerts_per_hour is not None else "-"
        delay = f"{f.delay_s_median:.1f} s" if f.delay_s_median is not None else "-"
        frames = f"{f.frames_to_read:.0f}" + _ci(f.frames_to_read_ci, "{:.0f}")
        minutes = f"{f.reading_min:.1f}" + _ci(f.reading_min_ci, "{:.1f}")
        click.echo(f"{name[:18]:18s} {f.findings:8d} {f.caught:6d} {sens:>21} {f.caught_class:8d} "
                   f"{f.false_alerts:12d} {hour:>19} {frames:>24} {minutes:>22} {delay:>12}")
