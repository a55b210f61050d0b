"""Frames of unlabelled recordings for `python -m train adapt`, read through `capsule_batch.sources`.

An epoch is a plan of *visits*: a visit opens one recording at a start frame (`open_source(..., start=)`,
frame-exact for every source) and reads `clip` consecutive frames. Each recording gets visits in
proportion to its length, and its share is cut into equal strata with one visit at a random place in
each, so every epoch samples every part of every recording, not only its start. The plan depends only
on (seed, epoch): under DDP every rank computes the same plan and takes its own stride of it, and a
resumed run reads exactly the frames the uninterrupted run would have. Frames that a given bundle calls
uninformative can be left out (`FrameFilter`). A thread reads visits ahead of training behind a bounded
queue; a shuffle buffer mixes frames of several visits into each batch.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from capsule_batch.errors import CapsuleError
from capsule_batch.model.preprocess import Preprocess

_logger = logging.getLogger(__name__)


class RecordingError(CapsuleError):
    """A recording list or recording that adapt cannot read."""


@dataclass(frozen=True)
class Recording:
    path: Path
    frames: int  # frames in the recording (the source's count, or a full decode where it has none)


@dataclass(frozen=True)
class Visit:
    recording: int  # index into the recording list
    start: int  # first frame read


@dataclass
class Counts:
    """What one rank's stream read in an epoch (summed over ranks for history.jsonl)."""

    visits: int = 0
    decoded: int = 0  # frames the visits returned
    left_out: int = 0  # of those, called uninformative by the filter
    failures: int = 0  # frames a source reported as undecodable
    per_recording: dict[int, int] = field(default_factory=dict)  # frames used, by recording index


def find_recordings(entries: list[Any], pre: Preprocess, source: str, device: Any = "cpu") -> list[Recording]:
    """The recordings named by `entries` (paths or glob patterns), each opened once to learn its length."""
    from capsule_batch.sources import open_source

    if not entries:
        raise RecordingError("adapt.recordings: give the unlabelled recordings (video files or frame folders; "
                             "glob patterns allowed), e.g. adapt.recordings=[/data/hospital/*.mp4]")
    paths: list[Path] = []
    for e in entries:
        if not isinstance(e, str) or not e:
            raise RecordingError(f"adapt.recordings: expected a path or glob pattern, got {e!r}")
        if any(c in e for c in "*?["):  # a glob pattern
            found = sorted(glob.glob(e))
            if not found:
                raise RecordingError(f"adapt.recordings: {e!r} matches no file or folder")
            paths.extend(Path(f) for f in found)
        else:
            paths.append(Path(e))
    seen: set[Path] = set()
    out = []
    for p in paths:
        if p.resolve() in seen:
            raise RecordingError(f"{p}: listed twice in adapt.recordings")
        seen.add(p.resolve())
        with open_source(p, pre, source=source, batch_size=64, device=device) as src:
            n = src.info().frame_count
            if not n:  # the container does not say: count by decoding once
                _logger.warning("%s: no frame count in the container; decoding it once to count", p)
                n = sum(len(b) for b in src)
        if not n:
            raise RecordingError(f"{p}: holds no frames")
        out.append(Recording(p, int(n)))
    total = sum(r.frames for r in out)
    _logger.info("%d unlabelled recordings, %d frames in all", len(out), total)
    return out


def plan_visits(recordings: list[Recording], visits: int, clip: int, rng: np.random.Generator) -> list[Visit]:
    """`visits` visits over all recordings, in proportion to their lengths, spread over each whole recording.

    Systematic sampling gives each recording the floor or ceiling of its share (randomly, so short
    recordings are not always the ones left without a visit); recording r's k visits fall one at a random
    place in each of k equal strata of its frames. The visits come back shuffled.
    """
    counts = np.asarray([r.frames for r in recordings], np.float64)
    cum = np.floor(np.concatenate([[0.0], np.cumsum(counts / counts.sum() * visits)]) + rng.random())
    per = np.diff(cum).astype(np.int64)
    plan = []
    for r, (rec, k) in enumerate(zip(recordings, per, strict=True)):
        if k <= 0:
            continue
        edges = np.linspace(0, rec.frames, k + 1)
        starts = np.floor(edges[:-1] + rng.random(k) * np.diff(edges)).astype(np.int64)
        last = max(0, rec.frames - clip)
        plan.extend(Visit(r, int(min(s, last))) for s in starts)
    order = rng.permutation(len(plan))
    return [plan[i] for i in order]


def rank_visits(recordings: list[Recording], visits: int, clip: int, seed: int, epoch: int, rank: int,
                world: int) -> Iterator[Visit]:
    """This rank's visits of an epoch: its stride of the epoch's plan, then of further plans (rounds) for as
    long as the consumer wants frames (the filter may leave many out). Same on every rank for (seed, epoch)."""
    for rnd in range(1 << 30):
        rng = np.random.default_rng([seed, epoch, rnd, 0x6164617074])
        yield from plan_visits(recordings, max(visits, world), clip, rng)[rank::world]


class FrameFilter:
    """Leave out frames `bundle` calls uninformative: the summed probability of `classes` >= `threshold`.

    The bundle scores frames with its own preprocessing: where it differs from the training frames', the
    visit is read a second time with the bundle's (the same frames, by number).
    """

    def __init__(self, bundle_path: str | Path, classes: list[str], threshold: float, device: Any):
        import torch

        from capsule_batch.model.bundle import ModelBundle

        p = Path(bundle_path)
        if (p / "bundle" / "model.json").is_file():
            p = p / "bundle"  # a run folder
        self.bundle = ModelBundle.load(p)
        if not classes:
            raise RecordingError(f"adapt.filter.classes: name the classes of {p} that mean uninformative "
                                 f"(it has {self.bundle.class_names})")
        missing = [c for c in classes if c not in self.bundle.class_names]
        if missing:
            raise RecordingError(f"adapt.filter.classes: {missing} are not classes of {p} "
                                 f"(it has {self.bundle.class_names})")
        if not 0 < threshold <= 1:
            raise RecordingError(f"adapt.filter.threshold: must be in (0, 1], got {threshold}")
        self.columns = [self.bundle.class_names.index(c) for c in classes]
        self.threshold, self.device = float(threshold), device
        self.model = self.bundle.create_model().to(device)
        self.pre = self.bundle.preprocess
        self._torch = torch
        _logger.info("leaving out frames that %s calls %s (summed probability >= %.2f)", p, " / ".join(classes),
                     threshold)

    def keep(self, pixels: Any) -> np.ndarray:
        """(N,) bool: frames to keep, from pixels in the filter bundle's preprocessing."""
        torch = self._torch
        with torch.no_grad():
            probs = torch.softmax(self.model(pixels.to(self.device, torch.float32)).float(), 1)
        return (probs[:, self.columns].sum(1) < self.threshold).cpu().numpy()


class FrameStream:
    """One rank's frames of one epoch, as shuffled batches of `batch_size` (pixels, recording, frame).

    `pixels` are (B, 3, S, S) float32 on `device` in the training preprocessing; `recording` and `frame`
    say where each frame came from.
    """

    def __init__(self, recordings: list[Recording], pre: Preprocess, *, source: str, clip: int, visits: int,
                 seed: int, epoch: int, rank: int = 0, world: int = 1, device: Any = "cpu", buffer: int = 256,
                 frame_filter: FrameFilter | None = None, prefetch: int = 4):
        self.recordings, self.pre, self.source, self.clip = recordings, pre, source, int(clip)
        self.visits, self.seed, self.epoch, self.rank, self.world = int(visits), int(seed), epoch, rank, world
        self.device, self.buffer, self.filter, self.prefetch = device, max(1, int(buffer)), frame_filter, prefetch
        self.counts = Counts()
        self._rng = np.random.default_rng([self.seed, epoch, rank, 0x73687566])

    def _read(self, visit: Visit, pre: Preprocess) -> tuple[Any, np.ndarray, int]:
        """`clip` frames from the visit's start (fewer at a damaged end): pixels, frame numbers, failures."""
        import torch

        from capsule_batch.sources import open_source

        rec = self.recordings[visit.recording]
        pixels, index, failures, got = [], [], 0, 0
        with open_source(rec.path, pre, source=self.source, batch_size=self.clip, start=visit.start,
                         device=self.device) as src:
            for batch in src:
                failures += sum(1 for f in batch.failures if f.index < visit.start + self.clip)
                take = self.clip - got
                pixels.append(batch.pixels[:take])
                index.append(batch.index[:take])
                got += min(take, len(batch))
                if got + failures >= self.clip:
                    break
        if got == 0:
            return torch.empty((0, 3, pre.input_size, pre.input_size)), np.zeros(0, np.int64), failures
        return torch.cat(pixels), np.concatenate(index), failures

    def _visits(self) -> Iterator[tuple[Visit, Any, np.ndarray, int, int]]:
        """Each visit's kept frames (pixels, frame numbers), its decoded and left-out counts and failures, in
        plan order; runs in the reader thread."""
        stale = 0
        for visit in rank_visits(self.recordings, self.visits, self.clip, self.seed, self.epoch, self.rank,
                                 self.world):
            pixels, index, failures = self._read(visit, self.pre)
            keep = np.ones(len(index), bool)
            if self.filter is not None and len(index):
                if self.filter.pre == self.pre:
                    keep = self.filter.keep(pixels)
                else:
                    fpix, findex, _ = self._read(visit, self.filter.pre)
                    if not np.array_equal(findex, index):
                        raise RecordingError(f"{self.recordings[visit.recording].path}: frames from {visit.start} "
                                             "came back differently on a second read")
                    keep = self.filter.keep(fpix)
            stale = 0 if keep.any() else stale + 1
            if stale >= 200:
                raise RecordingError("200 visits in a row gave no frame to train on (all undecodable or left out "
                                     "by adapt.filter): check the recordings and adapt.filter")
            kept = np.flatnonzero(keep)
            yield visit, pixels[kept], index[kept], len(index), failures

    def batches(self, batch_size: int, steps: int) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
        """`steps` batches of `batch_size` frames, each drawn at random from a buffer of the next frames."""
        import torch

        from capsule_batch.sources.prefetch import Prefetcher

        reader = Prefetcher(self._visits, depth=self.prefetch, name="adapt-visits")
        visits = iter(reader)
        pool: list[tuple[Any, int, int]] = []
        c = self.counts
        try:
            for _ in range(steps):
                picked = []
                for _ in range(batch_size):
                    while len(pool) < self.buffer:
                        visit, pixels, index, decoded, failures = next(visits)
                        c.visits, c.decoded, c.failures = c.visits + 1, c.decoded + decoded, c.failures + failures
                        c.left_out += decoded - len(index)
                        pool.extend((pixels[j], visit.recording, int(index[j])) for j in range(len(index)))
                    j = int(self._rng.integers(len(pool)))
                    pool[j], pool[-1] = pool[-1], pool[j]
                    picked.append(pool.pop())
                for _, r, _ in picked:
                    c.per_recording[r] = c.per_recording.get(r, 0) + 1
                yield (torch.stack([p for p, _, _ in picked]), np.asarray([r for _, r, _ in picked], np.int64),
                       np.asarray([f for _, _, f in picked], np.int64))
        finally:
            reader.close()
