"""`capsule-batch synth`: write a synthetic capsule-like recording with ground truth."""

from __future__ import annotations

from pathlib import Path

import click

from capsule_batch.cli.options import check_writable_parent, emit_json, json_option, output_path, overwrite_option


@click.command("synth")
@click.option("-o", "--output", "out", required=True, type=output_path(),
              help="Recording to write: .mp4 (h264), .avi (mjpeg), .webm (vp9), or a folder for frames.")
@click.option("--frames", type=click.IntRange(min=1), required=True, help="Number of frames.")
@click.option("--codec", type=click.Choice(["h264", "mjpeg", "vp9", "png", "jpg"]), default=None,
              help="Default: from the output's suffix; a folder gets PNG frames.")
@click.option("--size", type=click.IntRange(32, 2048), default=336, show_default=True, help="Frame side in px.")
@click.option("--fps", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--stamp", is_flag=True, help="Draw the frame number as a binary code in the top-left corner.")
@click.option("--findings-per-1000", type=click.FloatRange(min=0), default=15.0, show_default=True,
              help="Injected findings per 1000 frames.")
@click.option("--classes", default=None, help="Comma-separated finding classes to inject (default: all nine).")
@click.option("--vfr", is_flag=True, help="Variable frame rate (h264/vp9): irregular timestamps.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes rendering frames (output is identical for any number).")
@click.option("--lighting", type=click.FloatRange(0, 4, min_open=True), default=1.0, show_default=True,
              help="Style: illumination gain (0.6 is a dimmer capsule).")
@click.option("--color-cast", default="1,1,1", show_default=True, metavar="R,G,B",
              help="Style: per-channel gains, another sensor's white balance (e.g. 0.9,1.1,1.1).")
@click.option("--texture-scale", type=click.FloatRange(0.25, 8), default=1.0, show_default=True,
              help="Style: magnification of the mucosa texture (2: coarser, a closer camera).")
@click.option("--vignette", type=click.FloatRange(0, 4), default=1.0, show_default=True,
              help="Style: strength of the edge darkening (0: none, 2: twice the default).")
@overwrite_option
@json_option
def command(out: Path, frames: int, codec: str | None, size: int, fps: float, seed: int, stamp: bool,
            findings_per_1000: float, classes: str | None, vfr: bool, workers: int, lighting: float,
            color_cast: str, texture_scale: float, vignette: float, overwrite: bool, as_json: bool) -> None:
    """Write a synthetic recording, `<stem>.labels.csv` (frame -> class) and `<stem>.findings.csv`.

    The style options render the same scene (same findings on the same frames) in another visual domain.
    """
    from capsule_batch.run.progress import Progress
    from capsule_batch.sources.synthesize import FINDING_CLASSES, Style, synthesize

    check_writable_parent(out)
    cls = tuple(c.strip() for c in classes.split(",")) if classes else FINDING_CLASSES
    style = Style(lighting=lighting, color_cast=_gains(color_cast), texture_scale=texture_scale, vignette=vignette)
    bar = Progress(frames, "synth")
    res = synthesize(out, frames, codec=codec, size=size, fps=fps, seed=seed, stamp=stamp, style=style,
                     findings_per_1000=findings_per_1000, classes=cls, vfr=vfr, overwrite=overwrite, workers=workers,
                     progress=lambda i, n: bar.set(i))
    bar.close()
    summary = {"recording": str(res.path), "labels": str(res.labels_csv), "findings_csv": str(res.findings_csv),
               "frames": res.frames, "fps": res.fps, "findings": len(res.findings), "style": style.to_dict()}
    if as_json:
        emit_json(summary)
    else:
        click.echo(f"wrote {res.path}: {res.frames} frames, {len(res.findings)} findings; "
                   f"labels in {res.labels_csv.name}, findings in {res.findings_csv.name}")


def _gains(text: str) -> tuple[float, float, float]:
    parts = text.split(",")
    try:
        r, g, b = (float(c) for c in parts)
    except ValueError:
        raise click.BadParameter(f"expected three numbers R,G,B, got {text!r}", param_hint="--color-cast") from None
    return r, g, b
