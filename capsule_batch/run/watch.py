"""A watched inbox: every recording that appears in a folder is run into a study, once, when it is complete.

`capsule-batch watch INBOX -o OUT -m BUNDLE` polls INBOX (network shares deliver no inotify events, so polling is
the one way that works everywhere) every `poll` seconds. A recording is a video file (by its suffix) or a folder of
frames directly in INBOX. It is complete when

* a marker says so (`marker`, e.g. `.done`: `X.mp4.done` beside a file, or `X.done` or `X/.done` for a folder),
  for uploaders that write one; or else
* its size and modification time (for a folder: its files' count, total size and newest time) have not changed for
  `settle` seconds, counted from when this watcher first saw it so.

A complete recording goes through `Pipeline.run`, with the same reuse rules as `run`: a finished study of the same
recording, bundle and settings is skipped, so a restarted watcher repeats no finished work, and finds every file
that arrived while it was down (the inbox is listed, not followed). A recording interrupted by a crash or SIGKILL
resumes from its partial study. One that fails is reported and left until it changes; the watcher goes on. SIGTERM
or SIGINT stop it after the current batch is flushed (the partial study resumes next time), exit 0. `once` does one
pass (for cron): what is complete is run, what is not yet is left for the next pass, exit code as `run`'s.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsule_batch.run.pipeline import Pipeline, StudyResult, log_result

_logger = logging.getLogger(__name__)

#: names of files still being written by common uploaders and browsers: never a recording
IN_PROGRESS_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", ".filepart", ".download", ".!sync")


@dataclass
class WatchOptions:
    settle: float = 30.0
    poll: float = 10.0
    marker: str | None = None
    once: bool = False


@dataclass
class _Seen:
    state: tuple[Any, ...]
    since: float
    done: bool = False  # run (or failed) in this state: nothing to do until it changes


@dataclass
class Watcher:
    """Polls `inbox` and runs each complete recording through `pipeline` into `out_dir` (see the module docstring)."""

    inbox: Path
    out_dir: Path
    pipeline: Pipeline
    options: WatchOptions = field(default_factory=WatchOptions)
    stop: threading.Event = field(default_factory=threading.Event)
    results: list[StudyResult] = field(default_factory=list)
    _seen: dict[Path, _Seen] = field(default_factory=dict)

    def recordings(self) -> list[Path]:
        """What in the inbox is a recording: video files by suffix, and folders; hidden, partial and marker files
        are not."""
        from capsule_batch.sources.video import VIDEO_SUFFIXES

        out = []
        try:
            entries = sorted(self.inbox.iterdir())
        except OSError as e:
            _logger.error("%s: cannot list the inbox (%s); trying again in %g s", self.inbox, e.strerror or e,
                          self.options.poll)
            return []
        marker = self.options.marker
        for p in entries:
            name = p.name.lower()
            if name.startswith(".") or name.endswith(IN_PROGRESS_SUFFIXES) or (marker and name.endswith(marker)):
                continue
            if p.is_dir() or p.suffix.lower() in VIDEO_SUFFIXES:
                out.append(p)
        return out

    def _state(self, p: Path) -> tuple[Any, ...] | None:
        """What changes while a recording is written: size and mtime (a folder: files, bytes, newest mtime)."""
        try:
            if p.is_dir():
                sts = [e.stat() for e in p.iterdir() if e.is_file()]
                return (len(sts), sum(st.st_size for st in sts), max((st.st_mtime_ns for st in sts), default=0))
            st = p.stat()
            return (st.st_size, st.st_mtime_ns)
        except OSError:
            return None  # gone, or moved while listed

    def _marked(self, p: Path) -> bool:
        m = self.options.marker
        return bool(m) and (p.with_name(p.name + m).exists() or (p.is_dir() and (p / m).exists())
                            or (p.is_dir() and p.with_name(p.name + m).exists()))

    def ready(self, p: Path, now: float) -> bool:
        """Complete and not yet run in its present state (see the module docstring)."""
        state = self._state(p)
        if state is None:
            self._seen.pop(p, None)
            return False
        seen = self._seen.get(p)
        if seen is None or seen.state != state:
            seen = self._seen[p] = _Seen(state, now)
        if seen.done:
            return False
        if self.options.marker:
            return self._marked(p)
        return now - seen.since >= self.options.settle

    def pass_once(self) -> list[StudyResult]:
        """One look at the inbox: each complete recording run; returns their results."""
        out = []
        now = time.monotonic()
        waiting = []
        for p in self.recordings():
            if self.stop.is_set():
                break
            if not self.ready(p, now):
                seen = self._seen.get(p)
                if seen is not None and not seen.done:
                    waiting.append(p.name)
                continue
            res = self.pipeline.run(p, self.out_dir)
            log_result(res)
            if res.status != "interrupted":
                self._seen[p] = _Seen(self._state(p) or (), now, done=True)  # a failure waits for a change
            out.append(res)
        if waiting and (self.options.once or _logger.isEnabledFor(logging.DEBUG)):
            _logger.info("%s: not complete yet (%s): %s", self.inbox,
                         f"no {self.options.marker} marker" if self.options.marker
                         else f"changed in the last {self.options.settle:g} s", ", ".join(waiting))
        self.results += out
        return out

    def run(self) -> int:
        """Poll until `stop` (or one pass with `once`); the exit code: `once` as `run`'s (1 when a recording
        failed, 130 interrupted), else 0 after a clean stop."""
        _logger.info("watching %s -> %s (%s; every %g s)", self.inbox, self.out_dir,
                     f"complete when {self.options.marker} appears" if self.options.marker
                     else f"complete when unchanged for {self.options.settle:g} s", self.options.poll)
        if self.options.once:
            # settle counts from the first look: wait it out once, so that a quiet file is taken on this pass
            self.pass_once() if self.options.marker else self._settle_then_pass()
            if any(r.status == "interrupted" for r in self.results):
                return 130
            return 1 if any(r.status == "failed" for r in self.results) else 0
        while not self.stop.is_set():
            self.pass_once()
            self.stop.wait(self.options.poll)
        _logger.info("watch stopped%s", "; a partial study resumes on the next start"
                     if any(r.status == "interrupted" for r in self.results[-1:]) else "")
        return 0

    def _settle_then_pass(self) -> None:
        now = time.monotonic()
        for p in self.recordings():
            self.ready(p, now)
        if self._seen and not self.stop.wait(self.options.settle):
            self.pass_once()


def inbox_problem(inbox: Path) -> str | None:
    """Why `inbox` cannot be watched (None: it can)."""
    if not inbox.is_dir():
        return "no such folder" if not inbox.exists() else "not a folder"
    if not os.access(inbox, os.R_OK | os.X_OK):
        return "not readable"
    return None


__all__ = ["IN_PROGRESS_SUFFIXES", "WatchOptions", "Watcher", "inbox_problem"]
