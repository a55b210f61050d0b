"""Run whole recordings, one study file each: the sequencer of the stages in capsule_batch.run.stages.

For one recording `Pipeline.run`:
1. opens (or resumes) the study file: `StudyWriter`, with the attributes of `store.run_attrs`;
2. opens the recording's `FrameSource` from the first frame not yet written;
3. streams: the decode stage (one thread) hands batches to the engine stage (this thread), which hands rows
   with probabilities to the writer stage (one thread), block by block, each block flushed;
4. finishes: events from the whole probability table (streamed), thumbnails of event frames decoded again
   through the source's `start=` (frame-exact), and the file is completed and renamed.
A recording is a path (a video file, a frame folder, a `synthetic:` spec), or a `FrameSource` object to be used
as it is (resume and thumbnails then `reopen` it). Errors become a failed `StudyResult`, never an exception, so
`run_many` goes on with the next recording. Setting `stop` (the CLI does on SIGINT/SIGTERM) ends a run after the
rows computed so far (those on the device included) are flushed; the partial file then resumes from there.
Building the bundle and engine, sharding and worker processes are `capsule_batch.run.runner`'s.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from capsule_batch.errors import CapsuleError, StudyError
from capsule_batch.exits import exit_now
from capsule_batch.run.progress import Progress
from capsule_batch.run.stages import DecodeStage, EngineStage, EngineWatch, Rows, WriterStage, layout, thumbnails
from capsule_batch.sources.base import FrameSource, open_source
from capsule_batch.study.locks import check_not_in_review, run_lock
from capsule_batch.study.store import (
    StudyReader,
    StudyWriter,
    partial_path,
    recording_identity,
    run_attrs,
    side_files,
    source_attrs,
)
from capsule_batch.study.triage import TriageConfig, classify, compute_event_table, thumbnail_frames

_logger = logging.getLogger(__name__)

Recording = str | os.PathLike | FrameSource


@dataclass
class RunOptions:
    """Knobs of a run; the engine and bundle are given separately (built once for many recordings).
    `triage` (None: from the bundle, with `triage_rules` as TriageConfig keyword arguments, e.g. merge_gap)."""

    source: str = "auto"
    batch_size: int = 64
    resume: bool = True
    overwrite: bool = False
    probs_dtype: str = "float16"
    block_frames: int = 4096
    prefetch: int = 4
    triage: TriageConfig | None = None
    triage_rules: dict[str, Any] = field(default_factory=dict)
    thumbs_per_event: int = 3
    max_thumbs: int = 200
    thumb_quality: int = 85
    progress: bool | None = None
    argv: list[str] = field(default_factory=list)
    shard: str | None = None
    decode_timeout: float | None = 300.0
    engine_timeout: float | None = 300.0
    inflight: int = 2
    #: a finished study is reused when it answers the same question (`same`: same recording, bundle, triage
    #: settings and precision class), `never`, or whenever it exists (`any`); see `Pipeline.reusable`
    reuse: str = "same"
    #: without a terminal on stderr: a progress line every so many seconds (0: none)
    progress_every: float = 30.0
    #: frame folders: the capture rate in frames/s (None: unknown, no times), and the file-name patterns that are
    #: not frames (None: capsule_batch.sources.listing.DEFAULT_EXCLUDE)
    fps: float | None = None
    exclude: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        """Plain data (a worker process's job carries it): `from_json` gives these options back."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunOptions:
        d = dict(d)
        if d.get("triage") is not None:
            t = dict(d["triage"])
            d["triage"] = TriageConfig(**{**t, "class_names": tuple(t["class_names"])})
        if d.get("exclude") is not None:
            d["exclude"] = tuple(d["exclude"])
        return cls(**d)


@dataclass
class StudyResult:
    """What happened to one recording; `status` is done, skipped, failed or interrupted."""

    recording: str
    status: str
    output: str | None = None
    frames: int = 0
    flagged_frames: int = 0
    events: int = 0
    decode_failures: int = 0
    resumed_from: int = 0
    fps: float = 0.0
    seconds: float = 0.0
    error: str | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    #: wall time of step 3 alone (decode -> engine -> writer); `seconds` also holds the open and the finish
    stream_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def time_split(self) -> str:
        """Where the calling thread spent the run (see `time_split`)."""
        return time_split(self.stage_seconds, self.seconds)


#: StudyResult.stage_seconds keys (where the calling thread spent a run) and how a person reads them
STAGES = {"engine": "engine", "decode_wait": "waiting for decode", "write_wait": "waiting for the writer"}


def time_split(stage_seconds: dict[str, float], seconds: float) -> str:
    """`stage_seconds` in % of a run's wall time ('' when not measured): a run mostly waiting for decode is
    decode-bound, one mostly in the engine is engine-bound."""
    if not stage_seconds or seconds <= 0:
        return ""
    return ", ".join(f"{STAGES.get(k, k)} {100 * v / seconds:.0f}%" for k, v in stage_seconds.items())


def log_result(res: StudyResult) -> None:
    """One line per recording finished (what a log file keeps of a run); in JSON logs with `result` as a field."""
    if res.status == "done":
        what = (f"{res.frames} frames, {res.flagged_frames} flagged, {res.events} events, {res.fps:.1f} frames/s, "
                f"{res.seconds:.1f} s")
    elif res.status == "skipped":
        what = "already done (the same recording, bundle and settings, or --reuse any); --reuse never redoes it"
    else:
        what = res.error or ""
    _logger.info("%s: %s -> %s: %s", res.recording, res.status, res.output, what, extra={"result": res.to_json()})


class RunInterrupted(Exception):
    """`stop` was set: rows so far are flushed and the partial file resumes from `frames_done`."""

    def __init__(self, partial: Path, frames_done: int):
        super().__init__(f"{partial}: interrupted after {frames_done} frames")
        self.partial, self.frames_done = partial, frames_done


def recording_path(recording: Recording) -> Path:
    """The path a recording is known by (a FrameSource: the one it reads)."""
    return recording.path if isinstance(recording, FrameSource) else Path(recording)


#: base names that say nothing about which recording it is (an export's `images` folder): the study is named
#: `<parent>_<name>` instead, so that `a/images` and `b/images` never meet in one output folder
GENERIC_NAMES = frozenset({"images", "image", "imgs", "img", "frames", "frame", "jpg", "jpeg", "png", "bmp", "tif",
                           "tiff", "video", "videos", "data", "export", "exports", "raw", "capture", "recording"})


def _base_name(p: Path) -> str:
    """A recording's own study name: the file's stem or the folder's name, with the parent's for a generic one."""
    if ":" in str(p) and not p.exists():  # a source spec such as synthetic:frames=...: a safe file name
        return re.sub(r"[^A-Za-z0-9._-]+", "_", str(p)).strip("_")
    stem = p.name if p.is_dir() or not p.suffix else p.stem
    if stem.lower() in GENERIC_NAMES and p.resolve().parent.name:
        stem = f"{p.resolve().parent.name}_{stem}"
    return stem


def study_names(recordings: Iterable[Recording]) -> dict[str, str]:
    """The study name (without .h5) of each recording of a batch, by its path: its own name (`_base_name`), and
    where two recordings of the batch would share one, their paths relative to their common folder, with `__`
    for `/` (`d1/study.mp4`, `d2/study.mp4` -> `d1__study`, `d2__study`). Every process of a sharded batch sees
    the whole list, so all agree. Names that still collide are refused by `Pipeline.run_many`."""
    paths = {str(recording_path(r)): recording_path(r) for r in recordings}
    names = {k: _base_name(p) for k, p in paths.items()}
    groups: dict[str, list[str]] = {}
    for k, n in names.items():
        groups.setdefault(n, []).append(k)
    for same in (g for g in groups.values() if len(g) > 1):
        full = [paths[k].resolve() for k in same]
        root = Path(os.path.commonpath([str(f.parent) for f in full]))
        for k, f in zip(same, full, strict=True):
            rel = f.relative_to(root)
            rel = rel.with_suffix("") if f.is_file() and rel.suffix else rel
            names[k] = re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(rel.parts)).strip("_") or names[k]
    return names


def study_path(recording: Recording, out_dir: str | os.PathLike, names: dict[str, str] | None = None) -> Path:
    """OUTDIR/<name>.h5, the name from `names` (`study_names` of the whole batch) or the recording's own."""
    key = str(recording_path(recording))
    name = (names or {}).get(key) or study_names([recording])[key]
    return Path(out_dir) / f"{name}.h5"


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return text if len(text) <= 40 else text[:37] + "..."


def keep_aside(final: Path) -> Path:
    """Rename a finished study (and its review journal) to `<name>.<its creation time>.h5`, beside it; refused
    while a review app has it open."""
    check_not_in_review(final)
    with StudyReader(final) as rd:
        created = str(rd.attrs.get("created") or "old")
    stamp = re.sub(r"[^0-9T]+", "", created.split("+")[0])[:15] or "old"
    kept = final.with_name(f"{final.stem}.{stamp}{final.suffix}")
    k = 1
    while kept.exists():
        k += 1
        kept = final.with_name(f"{final.stem}.{stamp}-{k}{final.suffix}")
    os.replace(final, kept)
    journal = side_files(final).journal
    if journal.exists():
        os.replace(journal, side_files(kept).journal)
    return kept


def precision_class(precision: str) -> str:
    """fp32, int8, or `half` for bf16/fp16: what a study's numbers depend on (two fp32 backends agree to ~1e-5)."""
    if precision in ("fp32", "", None):
        return "fp32"
    return "int8" if precision == "int8" else "half"


class Pipeline:
    """One bundle + engine, many recordings. `stop` (a threading.Event) ends a run cleanly at the next batch."""

    def __init__(self, bundle: Any, engine: Any, options: RunOptions | None = None,
                 stop: threading.Event | None = None, names: dict[str, str] | None = None):
        self.bundle, self.engine = bundle, engine
        #: study names of the whole batch (`study_names`), by recording path; a recording not in it: its own name
        self.names = dict(names or {})
        self.options = options or RunOptions()
        self.stop = stop or threading.Event()
        self.triage = self.options.triage or TriageConfig.from_bundle(bundle, **self.options.triage_rules)
        self._watch = EngineWatch(self.options.engine_timeout, self._engine_hung)
        self._report: Callable[[str, StudyResult | None], None] | None = None
        self._active: StudyResult | None = None  # the recording being run, for _engine_hung

    def _engine_hung(self, seconds: float, first_frame: int) -> None:
        """EngineWatch's verdict: report the recording as failed, then end the process (see EngineWatch)."""
        res = self._active
        what = res.recording if res is not None else "(no recording)"
        msg = (f"{what}: the engine returned no result for {seconds:.0f} s on the batch from frame "
               f"{first_frame} (a hung GPU, driver or engine?); ending this process (--engine-timeout). "
               "The partial study resumes from its last flushed block when the command is run again.")
        _logger.error("%s", msg)
        if res is not None:
            res.status, res.error = "failed", msg
            if self._report is not None:
                self._report(res.recording, res)
        exit_now(1)

    # ------------------------------------------------------------------------------------------
    def run_many(self, recordings: list[Recording], out_dir: str | os.PathLike,
                 report: Any = None) -> list[StudyResult]:
        """Each recording to its own study; a failing one is reported and the rest go on.

        `report(recording, None)` is called before and `report(recording, result)` after each one (the
        worker of capsule_batch.run.isolation tells its supervisor where it is)."""
        self.names = {**study_names(recordings), **self.names}
        outs: dict[Path, str] = {}
        for r in recordings:
            o = study_path(r, out_dir, self.names)
            if o in outs:
                raise StudyError(f"{recording_path(r)} and {outs[o]} would both write {o}: rename one of them")
            outs[o] = str(recording_path(r))
        results = []
        self._report = report
        try:
            for r in recordings:
                name = str(recording_path(r))
                if self.stop.is_set():
                    results.append(StudyResult(name, "interrupted", error="not started: interrupted"))
                    continue
                if report is not None:
                    report(name, None)
                results.append(self.run(r, out_dir))
                log_result(results[-1])
                if report is not None:
                    report(name, results[-1])
        finally:
            self._report = None
        return results

    def run(self, recording: Recording, out_dir: str | os.PathLike) -> StudyResult:
        """One recording; errors become a failed result (with the reason), never an exception."""
        t0 = time.perf_counter()
        final = study_path(recording, out_dir, self.names)
        res = StudyResult(str(recording_path(recording)), "failed", output=str(final))
        self._active = res
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            with run_lock(final):
                if final.exists() and not self.options.overwrite:
                    changed = self.reusable(recording, final)
                    if changed is None:
                        with StudyReader(final) as rd:
                            s = rd.summary()
                        res.status, res.frames = "skipped", s["frames"]
                        res.flagged_frames, res.events = int(s["flagged_frames"] or 0), int(s["events"] or 0)
                        return res
                    kept = keep_aside(final)
                    _logger.warning("%s: redoing %s: %s; the old study is kept as %s", res.recording, final.name,
                                    changed, kept.name)
                self._run(recording, final, res)
            res.status = "done"
        except RunInterrupted as e:
            res.status, res.output = "interrupted", str(e.partial)
            res.error = (f"interrupted after {e.frames_done} frames; the partial file {e.partial} resumes "
                         "when the same command is run again")
        except CapsuleError as e:
            res.error = str(e)
            _logger.error("%s", res.error if res.error.startswith(res.recording) else f"{res.recording}: {e}")
        except Exception as e:  # a decoder or engine crash on one recording must not stop the others
            res.error = f"{type(e).__name__}: {e}"
            _logger.error("%s: failed: %s", res.recording, res.error, exc_info=_logger.isEnabledFor(logging.DEBUG))
        finally:
            self._active = None
        res.seconds = round(time.perf_counter() - t0, 3)
        if res.status != "skipped" and res.seconds > 0:
            res.fps = round((res.frames - res.resumed_from) / res.seconds, 2)
        return res

    def reusable(self, recording: Recording, final: Path) -> str | None:
        """None when the finished study `final` answers what this run would (`RunOptions.reuse`), else what changed,
        in words. A study of another recording that has this name is a StudyError: its name is taken."""
        path = recording_path(recording)
        with StudyReader(final) as rd:
            have = rd.attrs
        if self.options.reuse == "any":
            return None
        ident = recording_identity(path)
        same_file = (have.get("source_size"), have.get("source_hash")) == (ident["source_size"], ident["source_hash"])
        if not same_file and have.get("source_path") not in (None, ident["source_path"]):
            raise StudyError(f"{final}: this name holds the study of another recording ({have.get('source_path')}); "
                             f"{path} would take its name: run it into another -o folder, or rename it")
        if self.options.reuse == "never":
            return "--reuse never"
        changes = []
        if not same_file:
            was = f"{have.get('source_size')} -> {ident['source_size']} bytes"
            cut = " (its study ended where the file was cut off)" if have.get("decode_tail_failure") else ""
            changes.append(f"the recording changed ({was}){cut}")
        if have.get("bundle_sha256") != self.bundle.sha256:
            changes.append(f"the bundle's weights changed ({str(have.get('bundle_sha256'))[:12]} -> "
                           f"{self.bundle.sha256[:12]})")
        desc = self.engine.describe()
        then, now = precision_class(str(have.get("precision", ""))), precision_class(desc.get("precision", ""))
        if then != now:
            changes.append(f"precision {have.get('precision')} -> {desc.get('precision')}")
        if have.get("probs_dtype") != self.options.probs_dtype:
            changes.append(f"stored probabilities {have.get('probs_dtype')} -> {self.options.probs_dtype}")
        old_triage = have.get("triage") if isinstance(have.get("triage"), dict) else {}
        new_triage = json.loads(self.triage.to_json())
        diff = sorted(k for k in set(old_triage) | set(new_triage) if old_triage.get(k) != new_triage.get(k))
        if diff:
            changes.append("triage settings changed (" + ", ".join(
                f"{k} {_short(old_triage.get(k))} -> {_short(new_triage.get(k))}" for k in diff) + ")")
        return "; ".join(changes) or None

    # ------------------------------------------------------------------------------------------
    def _run(self, recording: Recording, final: Path, res: StudyResult) -> None:
        """Steps 1-4 of the module docstring for one recording."""
        opts, path = self.options, recording_path(recording)
        if not isinstance(recording, FrameSource) and not path.exists() and ":" not in str(path):
            raise CapsuleError(f"{path}: no such file or folder")
        if opts.overwrite:
            check_not_in_review(final)
            for p in (final, partial_path(final)):
                p.unlink(missing_ok=True)
        attrs = run_attrs(path, self.bundle, self.engine, probs_dtype=opts.probs_dtype, argv=opts.argv,
                          shard=opts.shard or "")
        writer = StudyWriter.open(final, attrs, resume=opts.resume and not opts.overwrite)
        res.resumed_from = res.frames = writer.frames_done
        open_at = self._opener(recording)
        try:
            with open_at(writer.frames_done, opts.batch_size, True) as src:
                info = src.info()
                tail = self._stream(src, writer, res, info.frame_count)
                name = src.name
            if writer.frames_done == 0:
                raise CapsuleError(f"{path}: no frames could be decoded{f' ({tail})' if tail else ''}")
            if tail:
                _logger.warning("%s: decoding stopped after frame %d: %s", path, writer.frames_done - 1, tail)
            if info.frame_count and info.frame_count != writer.frames_done:
                _logger.info("%s: the container claims %d frames, %d were decoded", path, info.frame_count,
                             writer.frames_done)
            events, n_flagged = compute_event_table(writer.probs_blocks(), self.triage)
            wanted = thumbnail_frames(events, opts.thumbs_per_event, opts.max_thumbs)
            thumbs = thumbnails(open_at, wanted, self.bundle.preprocess, opts.batch_size, opts.thumb_quality)
            res.decode_failures = writer.decode_failures
            writer.finish(events, n_flagged, self.triage, thumbs, source_attrs(name, info), tail_failure=tail,
                          frame_files=info.extra.get("files"))
            res.flagged_frames, res.events = n_flagged, len(events)
        finally:
            writer.close()
            if writer.frames_done == 0 and writer.partial.exists():
                writer.partial.unlink()  # nothing worth resuming (e.g. a recording that does not open)

    def _opener(self, recording: Recording) -> Callable[..., FrameSource]:
        """open_at(start, batch_size, announce=False): the recording's source from frame `start` (`announce`: the
        run's first opening, which logs what is worth a line). A FrameSource object is used as it is when it already
        starts there with that batch size, else reopened."""
        if isinstance(recording, FrameSource):
            def reopen(start: int, batch_size: int, announce: bool = False) -> FrameSource:
                same = recording.start == start and recording.batch_size == batch_size
                return recording if same else recording.reopen(start, batch_size)
            return reopen
        opts = self.options
        folder = {"fps": opts.fps, "exclude": opts.exclude} if recording_path(recording).is_dir() else {}
        return lambda start, batch_size, announce=False: open_source(
            recording, self.bundle.preprocess, source=opts.source, batch_size=batch_size,
            device=self.engine.device, dtype=self.engine.dtype, start=start, announce=announce, **folder)

    def _stream(self, src: FrameSource, writer: StudyWriter, res: StudyResult, total: int | None) -> str | None:
        """Step 3: decode -> engine -> writer until the end, a stop or a tail failure; returns the tail reason."""
        opts = self.options
        flagged = [0]
        bar = Progress(total, Path(src.path).name, enabled=opts.progress, log_every=opts.progress_every,
                       fields=lambda: {"flagged": flagged[0]}, start=writer.frames_done)
        decode = DecodeStage(src, opts.prefetch, opts.decode_timeout)
        engine = EngineStage(self.engine, len(self.bundle.class_names), opts.inflight, self._watch)
        write = WriterStage(writer, opts.block_frames, opts.prefetch)
        expected, tail = writer.frames_done, None
        t0 = time.perf_counter()

        def hand_on(rows: Iterable[Rows]) -> bool:
            """Rows to the writer; False when the writer has died."""
            for r in rows:
                if len(r):
                    if bar.log_every:
                        flagged[0] += int(classify(r.probs, self.triage)[1].sum())
                    if not write.put(r):
                        return False
                    res.frames = int(r.index[-1]) + 1
                    bar.set(res.frames)
            return True

        try:
            while not self.stop.is_set() and write.error is None:
                try:
                    batch = decode.next(self.stop)
                    lay = None if batch is None else layout(batch, expected, src)
                except Exception:
                    hand_on(engine.drain())  # a decoder failure: what is on the device is kept
                    raise
                if batch is None or lay is None:
                    break
                engine.launch(batch, lay)
                expected += len(lay.rows)
                tail = lay.tail
                if not hand_on(engine.ready()) or tail:
                    break
            hand_on(engine.drain())  # a normal end, a stop or a tail failure: what is on the device is kept
        finally:
            engine.close()
            decode.close()
            write.close()
            bar.close()
            res.stage_seconds = {"engine": round(engine.seconds, 3), "decode_wait": round(decode.seconds, 3),
                                 "write_wait": round(write.seconds, 3)}
            res.stream_seconds = round(time.perf_counter() - t0, 3)
        if write.error is not None:
            raise write.error
        res.frames = writer.frames_done
        if self.stop.is_set() and not decode.finished and not tail:
            raise RunInterrupted(writer.partial, writer.frames_done)
        return tail
