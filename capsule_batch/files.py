"""Small file-system helpers shared by the artefact writers (bundles, engine store, studies, recordings)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def publish_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; when the block succeeds it replaces `final` in one rename
    (an existing `final` is removed first), when it fails it is removed. Readers never see a half-written folder."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def unwritable(folder: str | os.PathLike, *, create: bool = False) -> str | None:
    """Why no file can be written in `folder`, or None when one can: the one writability check of every
    command, made before any work. With `create`, the folder (and its parents) is created first. It writes a
    real probe file, because `os.access` says yes to root on a read-only mount."""
    folder = Path(folder)
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return e.strerror or str(e)
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".capsule-write-probe-") as f:
            f.write(b"probe")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.strerror or str(e)
    return None


def output_folder_problem(folder: str | os.PathLike) -> str | None:
    """What stops an output from being written into the existing `folder` ("output folder does not exist",
    "not writable (<reason>)"), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return "output folder does not exist"
    why = unwritable(folder)
    return f"not writable ({why})" if why else None
