"""`capsule-batch review`: the local review app for one study, on 127.0.0.1 behind a random token."""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
import webbrowser
from pathlib import Path

import click

from capsule_batch.cli.options import existing_path, reading_options


@click.command("review")
@click.argument("study", type=existing_path())
@click.option("--video", type=existing_path(), default=None,
              help="The recording (video file or frame folder) the study was made from, to show full-resolution "
                   "frames (frame-exact) instead of stored thumbnails.")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="Port (0: any free port).")
@click.option("--reviewer", default="", help="Name recorded with each decision (editable in the page).")
@click.option("--no-browser", is_flag=True, help="Only print the URL; do not open a browser.")
@click.option("--findings", type=existing_path(), default=None,
              help="A findings CSV (finding, class, start_frame, end_frame) of this recording: the page then shows "
                   "which findings the events caught, on the timeline and in a list.")
@reading_options
def command(study: Path, video: Path | None, port: int, reviewer: str, no_browser: bool, findings: Path | None,
            reading_fps: float, event_seconds: float) -> None:
    """Review STUDY.h5's events in the browser; decisions are saved into the study file."""
    from capsule_batch.evaluation.reading_time import ReadingModel
    from capsule_batch.review.app import ReviewApp, Server

    stop = threading.Event()
    _stop_on_signals(stop)  # before anything starts: a signal at any moment from here on is a clean stop
    srv = Server(ReviewApp(study, video, reviewer=reviewer, findings=findings,
                           reading=ReadingModel(reading_fps, event_seconds)), port).start()
    try:
        click.echo(f"Reviewing {study} at {srv.url}\nPress Ctrl-C to stop (decisions are saved as you go).")
        if not no_browser:
            webbrowser.open(srv.url)
        while not stop.wait(0.5):
            pass
    finally:
        # every decision is in the fsync'ed journal already; closing folds it into the study. Should that
        # not finish, print where each thread is and end, rather than leave a terminal hanging.
        faulthandler.dump_traceback_later(SHUTDOWN_LIMIT_S, exit=True)
        srv.stop()
        faulthandler.cancel_dump_traceback_later()
        click.echo(f"Decisions saved in {study}", err=True)


#: seconds the app may take to stop (fold the journal, close the study) before it is ended regardless
SHUTDOWN_LIMIT_S = 30.0


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGINT/SIGTERM set `stop`; a second one ends the process at once (the journal keeps every decision,
    and the next start folds it in)."""

    def handle(signum: int, frame: object) -> None:
        if stop.is_set():
            os.write(2, b"stopping now; decisions stay in the journal and are folded in on the next start\n")
            os._exit(130)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)
