"""Advisory locks beside a study file, so that two writers never interleave in one file.

`run` holds `NAME.h5.lock` while it writes NAME.h5(.partial); the review app holds `NAME.h5.review.lock`
while a reviewer has the study open. Both are `flock` locks: the kernel drops them when the holding
process dies (SIGKILL included), so a stale lock file never blocks the next run. The holder's pid is
written into the file so that a refusal can name the other process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from capsule_batch.errors import StudyError
from capsule_batch.study.store import LOCK_SUFFIX as RUN_LOCK_SUFFIX
from capsule_batch.study.store import REVIEW_LOCK_SUFFIX, side_files

__all__ = ["RUN_LOCK_SUFFIX", "REVIEW_LOCK_SUFFIX", "acquire", "check_not_in_review", "lock_path", "release",
           "run_lock"]


def lock_path(study: Path, suffix: str) -> Path:
    """The lock file with `suffix` beside `study` (RUN_LOCK_SUFFIX or REVIEW_LOCK_SUFFIX; see store.SideFiles)."""
    files = side_files(study)
    return {RUN_LOCK_SUFFIX: files.lock, REVIEW_LOCK_SUFFIX: files.review_lock}[suffix]


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        return "another process"
    return f"process {pid}" if pid.isdigit() else "another process"


def acquire(lock: Path, busy: str) -> int:
    """flock `lock` (created if missing) without waiting; StudyError `busy` + the holder when it is taken.

    The lock file is removed on release; a process that opened it just before the removal would lock an
    orphaned inode, so after locking, the inode is checked against the path and the attempt repeated.
    """
    import fcntl

    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StudyError(f"{lock.parent}: cannot create the lock file {lock.name} ({e.strerror})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StudyError(f"{busy} ({_holder(lock)} holds the lock {lock.name})") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)


def release(lock: Path, fd: int) -> None:
    lock.unlink(missing_ok=True)
    os.close(fd)


@contextlib.contextmanager
def run_lock(study: Path) -> Iterator[None]:
    """Held while `run` writes `study` (NAME.h5): a second run on the same output is refused, not interleaved."""
    lock = side_files(study).lock
    fd = acquire(lock, f"{study}: another capsule-batch run is writing this study")
    try:
        yield
    finally:
        release(lock, fd)


def check_not_in_review(study: Path) -> None:
    """Refuse to replace a study that a review app has open (its lock is taken); take nothing."""
    import fcntl

    lock = side_files(study).review_lock
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise StudyError(f"{study}: open in a review app ({_holder(lock)} holds {lock.name}); close it "
                         "before --overwrite") from None
    finally:
        os.close(fd)
