"""The study file (HDF5, schema `capsule-batch/1`) and the files beside it: this module owns both.

`StudyWriter` fills a study, `StudyReader` reads it, `read_review_log`/`write_review_log` keep its `review`
group; nothing else opens a study file with h5py. `ROOT_ATTRS` is the one definition of its root attributes
(`run_attrs` and `source_attrs` build them from a run), `SideFiles` the one place the names of the files beside
it are made (partial file, run lock, review lock, review journal). The whole layout: docs/design.md#the-study-file.

Layout: root attributes describe the run (source identity, bundle, engine, triage settings as JSON);
`frames/{index,pts,probs,status}` hold one row per frame of the recording, in order; `events` is a table of
flagged runs; `thumbs/{frame,event,jpeg}` hold JPEG bytes of the frames a reviewer needs; `review` holds
reviewer decisions. Datasets are chunked and gzip-compressed (with the shuffle filter), which every HDF5 reader
decodes without plugins.

Crash safety without SWMR: the file is written as `NAME.h5.partial` and renamed to `NAME.h5` when
complete. Rows are appended per block: the datasets are resized and written, the file is flushed,
and only then is the root attribute `frames_done` raised and the file flushed again. A process
killed at any point leaves `frames_done` <= the rows that reached the disk, so a resume truncates
the datasets to `frames_done` and goes on from there. The file is created with HDF5's default
(oldest) format, whose superblock carries no "open for writing" mark, so a file whose writer died
reopens without `h5clear`; when it still cannot be reopened, the run starts over with a warning.
The `review` group is only ever rewritten in a copy that replaces the study in one rename.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from capsule_batch import __version__
from capsule_batch.errors import StudyError
from capsule_batch.exits import skip_finalization
from capsule_batch.study.schema import (
    EVENT_DTYPE,
    FRAME_DATASETS,
    SCHEMA,
    STATUS_NAMES,
    STATUS_OK,
)
from capsule_batch.study.triage import Event, TriageConfig, events_from_table, events_to_table

_logger = logging.getLogger(__name__)

PROBS_DTYPES = ("float16", "float32")
HASH_BYTES = 1 << 20
CHUNK_ROWS = 8192

#: Root attributes of a study file and what each holds: the one definition of them. `StudyWriter.open` writes
#: the first group (with `run_attrs`), a resume `resumed`, `StudyWriter.finish` the rest (with `source_attrs`).
ROOT_ATTRS: dict[str, str] = {
    "schema": f"`{SCHEMA}`",
    "complete": "true once the study is finished (and renamed from NAME.h5.partial to NAME.h5)",
    "frames_done": "rows flushed so far; raised after each block, so a resume starts there",
    "created": "when the file was created (ISO 8601, UTC)",
    "software_version": "capsule-batch version that created it",
    "source_path": "the recording (absolute path, or the source spec)",
    "source_size": "its size in bytes (a folder: of all its files)",
    "source_hash": "`sha256-ends:` hash of the size and the first and last MiB (see `recording_identity`)",
    "bundle_name": "model bundle folder name",
    "bundle_path": "model bundle folder (absolute)",
    "bundle_sha256": "sha256 of the bundle's weights",
    "arch": "timm architecture",
    "class_names": "class names in output order (JSON list)",
    "normal_class": "the class whose probability is not a finding",
    "engine": "the engine's configuration (JSON: backend, device, precision, max_batch, dtype, ...)",
    "backend": "inference backend",
    "precision": "engine precision",
    "probs_dtype": "storage type of frames/probs (float16 or float32)",
    "argv": "the command line (JSON list)",
    "shard": "I/N of this process",
    "resumed": "how many times the run was resumed (absent when never)",
    "source": "the frame source that decoded the recording",
    "decoder": "the decoder behind it (video: decord or pyav, with why pyav where decord was chosen first)",
    "fps": "the container's frame rate (0: unknown)",
    "container_frame_count": "frames the container claims (-1: unknown); the rows are what was decoded",
    "codec": "video codec (frame folders: the file type)",
    "width": "frame width in pixels (0: unknown)",
    "height": "frame height in pixels (0: unknown)",
    "frame_sizes": "frame folders whose frames differ in size: [first frame, width, height] where the size changes "
                   "(JSON; absent when every frame has one size)",
    "frames_excluded": "frame folders: files left out as masks or labels, by the patterns in `frame_exclude`",
    "frame_exclude": "frame folders: the file-name patterns that are not frames (JSON list)",
    "files_skipped": "frame folders: files that are not a frame type (named in the run's warning)",
    "decode_failures": "frames with status decode-failed",
    "decode_tail_failure": "why decoding stopped before the end of the recording (only when it did: truncated)",
    "triage": "every triage setting (JSON)",
    "thresholds": "per-class thresholds (JSON)",
    "frame_count": "rows of the finished study",
    "flagged_frames": "frames flagged by triage",
    "event_count": "rows of `events`",
    "finished": "when the study was finished (ISO 8601, UTC)",
}

PARTIAL_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
REVIEW_LOCK_SUFFIX = ".review.lock"
JOURNAL_SUFFIX = ".review.jsonl"


@dataclass(frozen=True)
class SideFiles:
    """The files beside a study `NAME.h5`: the only place their names are made."""

    study: Path

    def _beside(self, suffix: str) -> Path:
        return self.study.with_name(self.study.name + suffix)

    @property
    def partial(self) -> Path:
        """NAME.h5.partial: the study while it is written; renamed to NAME.h5 when finished."""
        return self._beside(PARTIAL_SUFFIX)

    @property
    def lock(self) -> Path:
        """NAME.h5.lock: held (flock) by the `run` writing the study (capsule_batch.study.locks)."""
        return self._beside(LOCK_SUFFIX)

    @property
    def review_lock(self) -> Path:
        """NAME.h5.review.lock: held by the review app that has the study open."""
        return self._beside(REVIEW_LOCK_SUFFIX)

    @property
    def journal(self) -> Path:
        """NAME.h5.review.jsonl: reviewer decisions not yet folded into the study (capsule_batch.study.decisions)."""
        return self._beside(JOURNAL_SUFFIX)


def side_files(study: str | os.PathLike) -> SideFiles:
    return SideFiles(Path(study))
#: attributes a resumed run must agree with, and what they mean in a refusal
_IDENTITY = {"source_size": "recording size", "source_hash": "recording content hash",
             "bundle_sha256": "bundle weights", "class_names": "class names", "probs_dtype": "probabilities dtype"}


def _h5py() -> Any:
    import h5py

    return h5py


def h5py_group() -> type:
    return _h5py().Group


def recording_identity(path: str | os.PathLike) -> dict[str, Any]:
    """Path, size and a content hash of a recording (a file, or a folder of frames).

    The hash covers the size and the first and last MiB of the file (for a folder: the sorted names and
    sizes of its files, and the first and last MiB of the first and last file). Hashing a 10 GB recording
    whole would take longer than classifying it on a GPU; head + tail + size tells recordings apart and
    catches truncation or re-encoding, though not an edit in the middle that keeps the size.
    """
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file())
        size = 0
        for f in files:
            st = f.stat().st_size
            size += st
            h.update(f"{f.name}\0{st}\n".encode())
        for f in files[:1] + files[-1:]:
            _hash_ends(f, h)
    elif p.is_file():
        size = p.stat().st_size
        h.update(str(size).encode())
        _hash_ends(p, h)
    else:  # a source spec such as `synthetic:frames=...` names no file: the spec is its identity
        size = 0
        h.update(str(path).encode())
    return {"source_path": str(p.resolve()) if p.exists() else str(path), "source_size": size,
            "source_hash": "sha256-ends:" + h.hexdigest()}


def _hash_ends(path: Path, h: Any) -> None:
    with open(path, "rb") as f:
        h.update(f.read(HASH_BYTES))
        size = f.seek(0, os.SEEK_END)
        if size > HASH_BYTES:
            f.seek(max(HASH_BYTES, size - HASH_BYTES))
            h.update(f.read(HASH_BYTES))


def partial_path(final: str | os.PathLike) -> Path:
    return side_files(final).partial


def run_attrs(recording: str | os.PathLike, bundle: Any, engine: Any, *, probs_dtype: str, argv: list[str],
              shard: str) -> dict[str, Any]:
    """The attributes a study is created with: the recording's identity, the bundle, the engine and the command."""
    d = recording_identity(recording)
    desc = engine.describe()
    d.update(bundle_name=bundle.name, bundle_path=str(Path(bundle.path).resolve()), bundle_sha256=bundle.sha256,
             arch=bundle.arch, class_names=list(bundle.class_names), normal_class=bundle.normal_class,
             probs_dtype=probs_dtype, engine=desc, backend=desc.get("backend", engine.name),
             precision=desc.get("precision", ""), argv=list(argv), shard=shard)
    return d


def source_attrs(source: str, info: Any) -> dict[str, Any]:
    """What the frame source knew about the recording (`RecordingInfo`), written when the study is finished."""
    extra = info.extra or {}
    d = {"source": source, "fps": info.fps or 0.0, "container_frame_count": info.frame_count or -1,
         "codec": info.codec or "", "width": info.width or 0, "height": info.height or 0}
    if extra.get("decoder"):
        d["decoder"] = extra["decoder"]
    if len(extra.get("frame_sizes") or ()) > 1:
        d["frame_sizes"] = extra["frame_sizes"]
    if "files" in extra:
        d.update(frames_excluded=int(extra.get("excluded", 0)), files_skipped=int(extra.get("skipped", 0)),
                 frame_exclude=list(extra.get("exclude", ())))
    return d


def _write_error(path: Path, e: Exception) -> StudyError:
    """A failed write (disk full, file size limit, I/O error) as one line: what is kept, how to go on."""
    import re

    m = re.search(r"error message = '([^']+)'", str(e))  # HDF5's own message names the OS error
    why = m.group(1) if m else (getattr(e, "strerror", None) or str(e).splitlines()[0] or type(e).__name__)
    return StudyError(f"{path}: cannot write the study file ({why}); the frames flushed before stay in the partial "
                      "file: fix that (e.g. free space) and run the same command again to resume")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _attr(v: Any) -> Any:
    """HDF5-friendly attribute values: str, numbers, bool; everything else as JSON."""
    if isinstance(v, (str, bool, int, float, np.integer, np.floating)):
        return v
    return json.dumps(v, default=str)


class StudyWriter:
    """Append frames block by block to `NAME.h5.partial`, then `finish()` writes events and thumbnails
    and renames it to `NAME.h5`. Use `StudyWriter.open` (it decides between resume and a fresh start)."""

    def __init__(self, final: Path, h5: Any, frames_done: int, resumed: bool):
        self.final = final
        self.partial = partial_path(final)
        self._f = h5
        self.frames_done = frames_done
        self.resumed = resumed
        status = h5["frames"]["status"]
        #: rows with status decode-failed (those of a resumed file included)
        self.decode_failures = sum(int((status[lo:lo + CHUNK_ROWS] != STATUS_OK).sum())
                                   for lo in range(0, frames_done, CHUNK_ROWS))

    @classmethod
    def open(cls, final: str | os.PathLike, attrs: dict[str, Any], *, resume: bool = True) -> StudyWriter:
        """Resume `final`'s partial file when `resume` and it matches `attrs`' identity, else start over.

        `attrs` must hold the identity keys (source_size, source_hash, bundle_sha256, class_names,
        probs_dtype); a partial file made from another recording or bundle is refused, naming the difference.
        """
        h5py = _h5py()
        final = Path(final)
        part = partial_path(final)
        if attrs.get("probs_dtype") not in PROBS_DTYPES:
            raise StudyError(f"probabilities dtype must be one of {PROBS_DTYPES}, got {attrs.get('probs_dtype')!r}")
        if part.exists() and resume:
            try:
                f = h5py.File(part, "r+")
            except OSError as e:
                _logger.warning("%s: cannot reopen the partial file left by an interrupted run (%s); starting over",
                                part, e)
            else:
                try:
                    done = cls._check_resumable(f, part, attrs)
                except BaseException:
                    f.close()
                    raise
                if done is not None:
                    _logger.info("%s: resuming after frame %d", part, done)
                    f.attrs["resumed"] = int(f.attrs.get("resumed", 0)) + 1
                    f.attrs["complete"] = False  # a crash between finishing and the rename left it set
                    f.flush()
                    return cls(final, f, done, True)
                f.close()
        if part.exists():
            part.unlink()
        try:
            f = h5py.File(part, "w")  # default (oldest) file format: reopens after a crash without h5clear
        except OSError as e:
            raise _write_error(part, e) from e
        try:
            cls._create(f, attrs)
        except BaseException as e:
            f.close()
            if isinstance(e, OSError):
                raise _write_error(part, e) from e
            raise
        return cls(final, f, 0, False)

    @staticmethod
    def _check_resumable(f: Any, part: Path, attrs: dict[str, Any]) -> int | None:
        """frames_done of a matching partial file; refuse a different recording/bundle; None if unusable."""
        if f.attrs.get("schema") != SCHEMA or "frames" not in f:
            _logger.warning("%s: not a %s partial file; starting over", part, SCHEMA)
            return None
        for key, what in _IDENTITY.items():
            have, want = f.attrs.get(key), _attr(attrs.get(key))
            if isinstance(have, np.generic):
                have = have.item()
            if have != want:
                raise StudyError(
                    f"{part}: cannot resume: it was made with another {what} ({str(have)[:40]!r}, now "
                    f"{str(want)[:40]!r}); use --overwrite to start over"
                )
        done = int(f.attrs.get("frames_done", 0))
        g = f["frames"]
        try:
            lengths = {k: g[k].shape[0] for k in FRAME_DATASETS}
        except (KeyError, OSError) as e:
            _logger.warning("%s: damaged partial file (%s); starting over", part, e)
            return None
        if min(lengths.values()) < done:
            _logger.warning("%s: fewer rows than recorded (%s < %d); starting over", part, lengths, done)
            return None
        for k in lengths:
            g[k].resize(done, axis=0)
        if done and int(g["index"][done - 1]) != done - 1:
            _logger.warning("%s: frame numbers in the partial file are inconsistent; starting over", part)
            return None
        return done

    @staticmethod
    def _create(f: Any, attrs: dict[str, Any]) -> None:
        c = len(attrs["class_names"])
        f.attrs["schema"] = SCHEMA
        f.attrs["complete"] = False
        f.attrs["frames_done"] = 0
        f.attrs["created"] = _now()
        f.attrs["software_version"] = __version__
        for k, v in attrs.items():
            f.attrs[k] = _attr(v)
        g = f.create_group("frames")
        kw = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
        for name, (ndim, _, dtype) in FRAME_DATASETS.items():
            if ndim == 1:
                g.create_dataset(name, (0,), maxshape=(None,), dtype=dtype, chunks=(CHUNK_ROWS,), **kw)
            else:  # probs: one column per class, in the study's storage type
                g.create_dataset(name, (0, c), maxshape=(None, c), dtype=dtype or attrs["probs_dtype"],
                                 chunks=(max(1, CHUNK_ROWS // max(1, c // 4)), c), **kw)
        g["status"].attrs["values"] = json.dumps(STATUS_NAMES)
        f.flush()

    def append(self, index: np.ndarray, pts: np.ndarray, probs: np.ndarray, status: np.ndarray) -> None:
        """Write one block of consecutive frames and make it durable (see the module docstring)."""
        n = len(index)
        if n == 0:
            return
        if int(index[0]) != self.frames_done or (n > 1 and not np.array_equal(np.diff(index), np.ones(n - 1))):
            raise StudyError(f"{self.partial}: frames must be appended in order: expected frame {self.frames_done}, "
                             f"got {int(index[0])}..{int(index[-1])} ({n} rows)")
        self._check_space()
        g = self._f["frames"]
        lo, hi = self.frames_done, self.frames_done + n
        try:
            for name, data in zip(FRAME_DATASETS, (index, pts, probs, status), strict=True):
                ds = g[name]
                ds.resize(hi, axis=0)
                ds[lo:hi] = np.asarray(data, dtype=ds.dtype)
            self._f.flush()
            self._f.attrs["frames_done"] = hi
            self._f.flush()
        except (OSError, RuntimeError) as e:  # h5py reports failed writes as either
            raise _write_error(self.partial, e) from e
        self.frames_done = hi
        self.decode_failures += int((np.asarray(status) != STATUS_OK).sum())

    def headroom(self) -> int:
        """Bytes a block may need at most: HDF5 rewrites a grown chunk at the end of the file, so one raw chunk per
        dataset, plus room for metadata."""
        g = self._f["frames"]
        return sum(int(np.prod(g[k].chunks)) * g[k].dtype.itemsize for k in FRAME_DATASETS) \
            + (64 << 10)

    def _check_space(self) -> None:
        """Stop before a write that may not fit: HDF5 that runs out of space mid-write can leave its own state broken
        and crash the process (SIGSEGV in a later flush, seen with a file size limit), so it never gets there."""
        import resource

        st = os.statvfs(self.partial.parent)
        free = st.f_bavail * st.f_frsize
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            free = min(free, limit - self.partial.stat().st_size)
        if free < self.headroom():
            why = "file size limit" if limit != resource.RLIM_INFINITY and free < st.f_bavail * st.f_frsize \
                else "disk full"
            raise StudyError(f"{self.partial}: cannot write the study file ({why}: {max(0, free) >> 10} KiB left, "
                             f"a block may need {self.headroom() >> 10} KiB); the {self.frames_done} frames flushed "
                             "before stay in the partial file: free space and run the same command again to resume")

    def probs_blocks(self, block: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(frame numbers, probs as float32) of everything written, in blocks: memory bounded by `block`."""
        g = self._f["frames"]
        for lo in range(0, self.frames_done, block):
            hi = min(self.frames_done, lo + block)
            yield g["index"][lo:hi].astype(np.int64), g["probs"][lo:hi].astype(np.float32)

    def finish(self, events: np.ndarray | list[Event], n_flagged: int, triage: TriageConfig,
               thumbs: list[tuple[int, int, bytes]], attrs: dict[str, Any] | None = None, *,
               tail_failure: str | None = None, frame_files: list[str] | None = None) -> Path:
        """Write events, thumbnails (frame, event, JPEG bytes) and the final attributes (`attrs`: e.g.
        `source_attrs`; `tail_failure`: why decoding stopped early), a frame folder's file names (`frame_files`,
        frame i's at i: `frames/file`), then rename to NAME.h5."""
        attrs = {**(attrs or {}), "decode_failures": self.decode_failures}
        if tail_failure:
            attrs["decode_tail_failure"] = tail_failure
        try:
            if frame_files is not None:
                self._write_files(frame_files)
            return self._finish(events, n_flagged, triage, thumbs, attrs)
        except (OSError, RuntimeError) as e:  # h5py reports failed writes as either
            raise _write_error(self.partial, e) from e

    def _write_files(self, names: list[str]) -> None:
        """`frames/file`: UTF-8 names, fixed width (so that gzip compresses them), one per row."""
        g = self._f["frames"]
        if "file" in g:
            del g["file"]
        names = names[:self.frames_done]
        if names:
            data = np.array([n.encode("utf-8") for n in names], dtype=np.bytes_)
            g.create_dataset("file", data=data, chunks=(min(CHUNK_ROWS, len(data)),), compression="gzip",
                             shuffle=True)

    def _finish(self, events: np.ndarray | list[Event], n_flagged: int, triage: TriageConfig,
                thumbs: list[tuple[int, int, bytes]], attrs: dict[str, Any] | None) -> Path:
        h5py = _h5py()
        f = self._f
        for name in ("events", "thumbs", "review"):
            if name in f:
                del f[name]
        table = events if isinstance(events, np.ndarray) else events_to_table(events)
        ev = f.create_dataset("events", data=table, maxshape=(None,), chunks=(4096,), compression="gzip",
                              shuffle=True)
        ev.attrs["class_names"] = json.dumps(list(triage.class_names))
        tg = f.create_group("thumbs")
        tg.create_dataset("frame", data=np.array([t[0] for t in thumbs], dtype="<u4"))
        tg.create_dataset("event", data=np.array([t[1] for t in thumbs], dtype="<i4"))
        jpeg = tg.create_dataset("jpeg", (len(thumbs),), dtype=h5py.vlen_dtype(np.dtype("u1")))
        for i, t in enumerate(thumbs):
            jpeg[i] = np.frombuffer(t[2], dtype=np.uint8)
        f.create_group("review")
        f.attrs["triage"] = triage.to_json()
        f.attrs["thresholds"] = json.dumps(triage.thresholds)
        f.attrs["frame_count"] = self.frames_done
        f.attrs["flagged_frames"] = n_flagged
        f.attrs["event_count"] = len(events)
        f.attrs["finished"] = _now()
        for k, v in (attrs or {}).items():
            f.attrs[k] = _attr(v)
        f.attrs["complete"] = True
        f.flush()
        f.close()
        os.replace(self.partial, self.final)
        return self.final

    def close(self) -> None:
        """Close without finishing: the partial file stays, resumable (its `frames_done` rows are intact even
        when closing fails after a failed write)."""
        if self._f.id.valid:
            try:
                self._f.close()
            except (OSError, RuntimeError) as e:
                _logger.debug("%s: closing after a failed write: %s", self.partial, e)
                # HDF5's own clean-up at exit would flush it again and crash the process (SIGSEGV, seen with a
                # full disk); what matters is on disk already (rows up to `frames_done`, flushed before)
                skip_finalization(f"{self.partial}: closing failed")


@dataclass
class Thumb:
    frame: int
    event: int
    jpeg: bytes


class StudyReader:
    """Read a study file; review, report and export go through this class (decisions through `read_review_log`),
    never through raw h5py."""

    def __init__(self, path: str | os.PathLike, *, allow_partial: bool = False):
        h5py = _h5py()
        self.path = Path(path)
        if not self.path.is_file():
            raise StudyError(f"{self.path}: no such study file")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise StudyError(f"{self.path}: not a readable HDF5 file ({e})") from e
        try:
            with self.guard():
                schema = self._f.attrs.get("schema")
                if schema != SCHEMA:
                    raise StudyError(f"{self.path}: not a study file of schema {SCHEMA} (schema {str(schema)[:40]!r})")
                if not self.complete and not allow_partial:
                    raise StudyError(f"{self.path}: incomplete study (an interrupted run; rerun it to resume)")
                self._validate()
        except BaseException:
            self._f.close()
            raise

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Low-level failures of a damaged file (unreadable chunks, wrong types) as one StudyError line."""
        try:
            yield
        except StudyError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise StudyError(f"{self.path}: damaged study file ({msg[:200]})") from e

    def _validate(self) -> None:
        """The structure everything downstream relies on: reject what does not match instead of failing later."""
        f = self._f

        def bad(what: str) -> StudyError:
            return StudyError(f"{self.path}: damaged study file ({what})")

        names = json.loads(f.attrs["class_names"]) if isinstance(f.attrs.get("class_names"), str) else None
        if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)
                and len(set(names)) == len(names)):
            raise bad("class_names is not a list of distinct names")
        done = f.attrs.get("frames_done", 0)
        if not isinstance(done, (int, np.integer)) or isinstance(done, (bool, np.bool_)) or done < 0:
            raise bad(f"frames_done {str(done)[:20]!r}")
        g = f.get("frames")
        if not isinstance(g, h5py_group()):
            raise bad("no frames group")
        for k, (ndim, kinds, _) in FRAME_DATASETS.items():
            ds = g.get(k)
            if not hasattr(ds, "shape") or len(ds.shape) != ndim or ds.dtype.kind not in kinds:
                raise bad(f"frames/{k} missing or of the wrong type")
            if ds.shape[0] < done:
                raise bad(f"frames/{k} has {ds.shape[0]} rows, frames_done says {int(done)}")
        if g["probs"].shape[1] != len(names):
            raise bad(f"frames/probs has {g['probs'].shape[1]} columns for {len(names)} classes")
        if "triage" in f.attrs:
            try:
                cfg = TriageConfig.from_json(f.attrs["triage"])
            except Exception as e:  # any malformed JSON or value: the triage settings are unusable
                raise bad(f"triage settings ({type(e).__name__})") from e
            if list(cfg.class_names) != names:
                raise bad("triage class names differ from class_names")
        n_events = 0
        if "events" in f:
            ev = f["events"]
            needed = set(EVENT_DTYPE.names) - {"classes"}  # studies made before merged events have no `classes`
            if not hasattr(ev, "dtype") or ev.dtype.names is None or not needed <= set(ev.dtype.names) \
                    or len(ev.shape) != 1:
                raise bad("events table of the wrong type")
            t = ev[:]
            if len(t) and (t["start"].min() < 0 or (t["end"] < t["start"]).any() or t["end"].max() >= done
                           or t["class"].min() < 0 or t["class"].max() >= len(names)
                           or (t["peak_frame"] < t["start"]).any() or (t["peak_frame"] > t["end"]).any()):
                raise bad("events outside the recording or its classes")
            n_events = len(t)
        if "thumbs" in f:
            tg = f["thumbs"]
            parts = [tg.get(k) for k in ("frame", "event", "jpeg")]
            if not all(hasattr(p, "shape") and len(p.shape) == 1 for p in parts) \
                    or len({p.shape[0] for p in parts}) != 1 or parts[2].dtype.kind != "O" \
                    or parts[0].dtype.kind not in "iu" or parts[1].dtype.kind not in "iu":
                raise bad("thumbnails of the wrong type")
            fr, evs = parts[0][:], parts[1][:]
            if len(fr) and (fr.min() < 0 or fr.max() >= done or evs.min() < -1 or evs.max() >= n_events):
                raise bad("thumbnails of frames or events that do not exist")

    def __enter__(self) -> StudyReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._f.id.valid:
            self._f.close()

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes, JSON strings decoded."""
        out: dict[str, Any] = {}
        for k, v in self._f.attrs.items():
            if isinstance(v, np.generic):
                v = v.item()
            if isinstance(v, str) and (v[:1] in ("[", "{") or v == "null"):
                try:
                    v = json.loads(v)
                except json.JSONDecodeError:
                    pass
            out[k] = v
        return out

    @property
    def complete(self) -> bool:
        return bool(self._f.attrs.get("complete", False))

    @property
    def class_names(self) -> list[str]:
        return list(json.loads(self._f.attrs["class_names"]))

    @property
    def triage(self) -> TriageConfig | None:
        s = self._f.attrs.get("triage")
        return TriageConfig.from_json(s) if s else None

    def __len__(self) -> int:
        return int(self._f.attrs.get("frames_done", 0))

    def _rows(self, name: str, start: int, stop: int | None) -> np.ndarray:
        stop = len(self) if stop is None else min(stop, len(self))
        with self.guard():
            return self._f["frames"][name][start:stop]

    def index(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._rows("index", start, stop).astype(np.int64)

    def pts(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._rows("pts", start, stop)

    def probs(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(N, C) float32 (stored as float16 unless the run asked for float32)."""
        return self._rows("probs", start, stop).astype(np.float32)

    def status(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._rows("status", start, stop)

    @property
    def has_files(self) -> bool:
        """Whether frames carry file names (studies of frame folders made since the names were stored)."""
        return "file" in self._f["frames"]

    def files(self, start: int = 0, stop: int | None = None) -> list[str] | None:
        """Frame folders: each frame's file name (relative to the folder); None for video or older studies."""
        if not self.has_files:
            return None
        return [b.decode("utf-8", "replace") for b in self._rows("file", start, stop)]

    def frame_file(self, frame: int) -> str | None:
        names = self.files(frame, frame + 1) if 0 <= frame else None
        return names[0] if names else None

    def scores(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """1 - p(normal) per frame (see triage.classify)."""
        from capsule_batch.study.triage import classify

        cfg = self.triage
        if cfg is None:
            raise StudyError(f"{self.path}: no triage settings recorded")
        return classify(self.probs(start, stop), cfg)[0]

    def blocks(self, block: int = 65536) -> Iterator[tuple[int, int]]:
        """(start, stop) row ranges covering the study: read large studies piece by piece."""
        for lo in range(0, len(self), block):
            yield lo, min(len(self), lo + block)

    def events(self) -> list[Event]:
        return events_from_table(self.events_table())

    def events_table(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows of the events table (EVENT_DTYPE), sorted by start frame."""
        if "events" not in self._f:
            return np.zeros(0, dtype=EVENT_DTYPE)
        with self.guard():
            return self._f["events"][start:stop]

    def thumbs(self) -> list[Thumb]:
        if "thumbs" not in self._f:
            return []
        g = self._f["thumbs"]
        with self.guard():
            return [Thumb(int(f), int(e), bytes(j.tobytes()))
                    for f, e, j in zip(g["frame"][:], g["event"][:], g["jpeg"][:], strict=True)]

    def summary(self) -> dict[str, Any]:
        a = self.attrs
        return {"frames": len(self), "flagged_frames": a.get("flagged_frames"), "events": a.get("event_count"),
                "output": str(self.path)}


# ---------------------------------------------------------------------------------------------------------------
# The `review` group: reviewer decisions (capsule_batch.study.decisions keeps the journal and decides when to fold)

REVIEW_SCHEMA = "capsule-batch-review/1"
#: verdict codes of the `verdict` column (index = code)
REVIEW_VERDICTS = ("", "confirm", "reject")


def _review_dtype() -> np.dtype:
    s = _h5py().string_dtype("utf-8")
    return np.dtype([("event", "<u4"), ("verdict", "u1"), ("class", "<i2"), ("time", s), ("reviewer", s),
                     ("comment", s), ("seq", "<u8")])


def _review_rows(log: list[dict[str, Any]]) -> np.ndarray:
    return np.array([(d["event"], REVIEW_VERDICTS.index(d["verdict"]), -1 if d["cls"] is None else d["cls"],
                      d["time"], d["reviewer"], d["comment"], d["seq"]) for d in log], dtype=_review_dtype())


def _review_record(r: Any) -> dict[str, Any]:
    def text(v: Any) -> str:
        return v.decode("utf-8") if isinstance(v, bytes) else str(v)

    cls = int(r["class"])
    return {"event": int(r["event"]), "verdict": REVIEW_VERDICTS[int(r["verdict"])], "cls": None if cls < 0 else cls,
            "comment": text(r["comment"]), "reviewer": text(r["reviewer"]), "time": text(r["time"]),
            "seq": int(r["seq"])}


def read_review_log(study: str | os.PathLike) -> tuple[list[dict[str, Any]], int]:
    """(every decision in the study's `review/log`, in order, as dicts with the keys of
    `review.decisions.Decision`; the last journal entry folded in); ([], 0) when none was written."""
    study = Path(study)
    try:
        with _h5py().File(study, "r") as f:
            g = f.get("review")
            if g is None or "log" not in g:
                return [], 0
            return [_review_record(r) for r in g["log"][:]], int(g.attrs.get("journal_seq", 0))
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StudyError(f"{study}: damaged review decisions ({msg[:200]})") from e


def write_review_log(study: str | os.PathLike, log: list[dict[str, Any]], latest: list[dict[str, Any]]) -> None:
    """Replace the study's `review` group with `log` (every decision, in order) and `latest` (one per event) by
    copy-on-write: the study is copied beside itself, the copy rewritten, flushed, fsync'ed and renamed over
    the study, so that at every instant the study is either the old or the new complete file."""
    study = Path(study)
    tmp = study.with_name(f".{study.name}.review-{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        shutil.copyfile(study, tmp)
        shutil.copymode(study, tmp)
        with _h5py().File(tmp, "r+") as f:
            if "review" in f:
                del f["review"]
            g = f.create_group("review")
            g.attrs["schema"] = REVIEW_SCHEMA
            g.attrs["journal_seq"] = max((d["seq"] for d in log), default=0)
            g.attrs["updated"] = _now()
            g.attrs["verdicts"] = json.dumps(dict(enumerate(REVIEW_VERDICTS)))
            g.create_dataset("log", data=_review_rows(log), maxshape=(None,), chunks=True)
            g.create_dataset("decisions", data=_review_rows(latest))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, study)
        _fsync_dir(study.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
