"""`capsule-batch review`: the local review app for one study, on 127.0.0.1 behind a random token."""

from __future__ import annotations

import signal
import sys
import threading
import webbrowser
from pathlib import Path

import click

from capsule_batch.cli.options import existing_path


@click.command("review")
@click.argument("study", type=existing_path())
@click.option("--video", type=existing_path(), default=None,
              help="The recording (video file or frame folder) the study was made from, to show full-resolution "
                   "frames (frame-exact) instead of stored thumbnails.")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="Port (0: any free port).")
@click.option("--reviewer", default="", help="Name recorded with each decision (editable in the page).")
@click.option("--no-browser", is_flag=True, help="Only print the URL; do not open a browser.")
def command(study: Path, video: Path | None, port: int, reviewer: str, no_browser: bool) -> None:
    """Review STUDY.h5's events in the browser; decisions are saved into the study file."""
    from capsule_batch.review.app import ReviewApp, Server

    srv = Server(ReviewApp(study, video, reviewer=reviewer), port).start()
    click.echo(f"Reviewing {study} at {srv.url}\nPress Ctrl-C to stop (decisions are saved as you go).")
    if not no_browser:
        webbrowser.open(srv.url)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # fold the journal on `kill` too, as on Ctrl-C
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
        click.echo(f"Decisions saved in {study}", err=True)
