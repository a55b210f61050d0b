"""`capsule-batch watch`: run every recording that arrives in a folder (capsule_batch.run.watch.Watcher)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import click

from capsule_batch.cli.options import env_name
from capsule_batch.cli.run import run_options, study_options
from capsule_batch.run.runner import StopOnSignals


@click.command("watch")
@click.argument("inbox", type=click.Path(path_type=Path, file_okay=False), envvar=env_name("inbox"))
@study_options
@click.option("--settle", type=click.FloatRange(min=0), default=30.0, show_default=True,
              envvar=env_name("settle"), show_envvar=True,
              help="A recording is complete when its size and modification time have not changed for this many "
                   "seconds (unless --marker).")
@click.option("--marker", default=None, metavar="SUFFIX", envvar=env_name("marker"), show_envvar=True,
              help="A recording is complete when its marker exists: X.mp4 + SUFFIX beside a file (e.g. .done: "
                   "X.mp4.done), X + SUFFIX or X/SUFFIX for a folder; for uploaders that write one.")
@click.option("--poll", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              envvar=env_name("poll"), show_envvar=True, help="Seconds between looks at the inbox.")
@click.option("--once", is_flag=True,
              help="One pass (for cron): run what is complete (waiting --settle once), leave the rest; exit code as "
                   "run's (1 when a recording failed).")
def command(inbox: Path, bundle_path: Path, out_dir: Path, engine: str, device: str, precision: str, settle: float,
            marker: str | None, poll: float, once: bool, **kw: Any) -> None:
    """Run every recording (video file or frame folder) that appears in INBOX into OUTDIR/<name>.h5, once it is
    complete; a restart repeats nothing and misses nothing (docs/operations.md).

    Polls the folder (network shares deliver no change events). One bad recording is reported and the watcher goes
    on. SIGTERM or Ctrl-C stop it after the current batch is flushed (exit 0; a partial study resumes next time).
    """
    from capsule_batch.exits import exit_process
    from capsule_batch.run.runner import EngineSpec, open_pipeline
    from capsule_batch.run.watch import Watcher, WatchOptions, inbox_problem

    why = inbox_problem(inbox)
    if why:
        raise click.BadParameter(f"{inbox}: {why}", param_hint="INBOX")
    opts = run_options(device=device, **kw)
    stop = threading.Event()
    with open_pipeline(bundle_path, out_dir, engine=EngineSpec(engine, device, precision), options=opts,
                       stop=stop) as pipeline:
        watcher = Watcher(inbox, out_dir, pipeline, WatchOptions(settle=settle, poll=poll, marker=marker, once=once),
                          stop)
        with StopOnSignals(stop):
            rc = watcher.run()
    exit_process(rc)
