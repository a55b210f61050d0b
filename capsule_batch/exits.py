"""How a capsule-batch process ends: normally, or at once without interpreter finalization.

Finalization can crash or hang after everything that matters is saved: HDF5's exit-time clean-up of a study
file whose close failed (disk full) segfaults, gloo's threads in training abort, and an engine call that never
returns (a hung GPU) keeps its thread. Code that knows of such a reason says so with `skip_finalization`;
`exit_process` then ends the process with `exit_now`.
"""

from __future__ import annotations

import logging
import os
import sys

#: why finalization must be skipped (empty: a normal exit is safe)
_REASONS: list[str] = []


def skip_finalization(reason: str) -> None:
    """Make `exit_process` end this process without interpreter finalization."""
    _REASONS.append(reason)


def exit_process(code: int) -> None:
    """sys.exit(code), or `exit_now(code)` when something asked to skip finalization."""
    if _REASONS:
        exit_now(code)
    sys.exit(code)


def exit_now(code: int) -> None:
    """End the process at once with `code`, without interpreter finalization, after flushing the log handlers and
    stdio; the caller has saved what matters."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
