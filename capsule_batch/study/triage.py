"""Triage: per-frame scores and flags, and events built from runs of flagged frames (docs/run.md, "Triage").

- score = 1 - p(normal class) (the highest probability when the bundle has no normal class);
- a frame is flagged where a class probability reaches that class's threshold (the bundle's
  calibrated thresholds; a threshold on the normal class is read as a threshold on the score, which
  covers every class), and, for a bundle without thresholds, where argmax != normal. A class that has
  no threshold in a bundle that has some (calibration found no validation positives for it) is
  flagged where it wins the argmax, as without thresholds. The frame's class is the flagged class
  with the highest probability;
- frames flagged with the same class whose gap (unflagged or other-class frames between them) is at
  most `merge_gap` form one event; `min_run` (drop events with fewer flagged frames) and `smooth`
  (centred moving average of the probabilities over that many frames) are off by default;
- `top_k` keeps only the K events with the highest peak score.

Events are computed from the whole probability table streamed in blocks, so memory is bounded by
the block size and the number of classes, and a resumed run needs no event state.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from capsule_batch.study.schema import EVENT_DTYPE


@dataclass(frozen=True)
class TriageConfig:
    class_names: tuple[str, ...]
    normal_class: str | None = "Normal"
    thresholds: dict[str, float] | None = None
    merge_gap: int = 2
    min_run: int = 1
    smooth: int = 1
    top_k: int | None = None
    #: one event per stop: overlapping or neighbouring (within `merge_gap`) events of different classes become one,
    #: led by the class with the strongest peak and keeping the others in `classes` (False: one event per class)
    merge_classes: bool = True
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.merge_gap < 0 or self.min_run < 1 or self.smooth < 1 or (self.top_k is not None and self.top_k < 1):
            raise ValueError(f"bad triage settings: {self}")
        if self.normal_class is not None and self.normal_class not in self.class_names:
            raise ValueError(f"normal class {self.normal_class!r} is not one of {self.class_names}")
        for k in self.thresholds or {}:
            if k not in self.class_names:
                raise ValueError(f"threshold for unknown class {k!r}")

    @classmethod
    def from_bundle(cls, bundle: Any, **kw: Any) -> TriageConfig:
        return cls(tuple(bundle.class_names), bundle.normal_class, bundle.thresholds, **kw)

    @property
    def rule(self) -> str:
        return "thresholds" if self.thresholds else "argmax"

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("extra")
        d["class_names"] = list(self.class_names)
        d["rule"] = self.rule
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> TriageConfig:
        d = json.loads(s)
        d.pop("rule", None)
        d.setdefault("merge_classes", False)  # studies made before the setting have one event per class
        d["class_names"] = tuple(d["class_names"])
        return cls(**d)




@dataclass(frozen=True)
class Event:
    """Frames `start`..`end` (inclusive, frame numbers) flagged as `cls` (class index, the leading class), with
    `classes` the bit mask of every class flagged in it (0: `cls` alone)."""

    start: int
    end: int
    cls: int
    peak_frame: int
    peak_score: float
    n_flagged: int
    classes: int = 0

    @property
    def class_set(self) -> list[int]:
        """Every class flagged in the event, the leading one first."""
        return [self.cls] + [c for c in classes_in(self.classes or 1 << self.cls) if c != self.cls]


def classes_in(mask: int) -> list[int]:
    """The class indices of a `classes` bit mask, in class order."""
    return [c for c in range(int(mask).bit_length()) if int(mask) >> c & 1]


def event_classes(table: np.ndarray) -> np.ndarray:
    """The `classes` bit masks of an events table (tables of older studies: the leading class alone)."""
    if table.dtype.names and "classes" in table.dtype.names:
        masks = table["classes"].astype(np.int64)
        return np.where(masks == 0, 1 << table["class"].astype(np.int64), masks)
    return 1 << table["class"].astype(np.int64)


def merge_across_classes(table: np.ndarray, gap: int) -> np.ndarray:
    """One event per stop: events (any classes) whose spans overlap or lie within `gap` frames of each other become
    one, spanning them all, led by the class of the strongest peak (its peak frame and score), `n_flagged` summed
    (a frame is flagged with one class only), `classes` the union. `table` (EVENT_DTYPE) sorted by start."""
    if len(table) < 2:
        return table
    starts, ends = table["start"].astype(np.int64), table["end"].astype(np.int64)
    reach = np.maximum.accumulate(ends)
    new = np.r_[True, starts[1:] - reach[:-1] - 1 > gap]
    group = np.cumsum(new) - 1
    masks = event_classes(table)
    out = np.zeros(int(group[-1]) + 1, dtype=EVENT_DTYPE)
    # the leading row of each group: the highest peak (earliest on a tie)
    order = np.lexsort((starts, -table["peak_score"].astype(np.float64), group))
    lead = order[np.r_[True, group[order][1:] != group[order][:-1]]]
    out["start"] = np.minimum.reduceat(starts, np.flatnonzero(new))
    out["end"] = np.maximum.reduceat(ends, np.flatnonzero(new))
    for k in ("class", "peak_frame", "peak_score"):
        out[k] = table[k][lead]
    out["n_flagged"] = np.add.reduceat(table["n_flagged"].astype(np.int64), np.flatnonzero(new))
    out["classes"] = np.bitwise_or.reduceat(masks, np.flatnonzero(new))
    return out


def classify(probs: np.ndarray, cfg: TriageConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score, flagged, class index) for a (N, C) block; rows that are NaN (decode failures) are never flagged."""
    p = np.asarray(probs, dtype=np.float32)
    valid = np.isfinite(p).all(axis=1)
    p = np.where(valid[:, None], p, 0.0)
    normal = cfg.class_names.index(cfg.normal_class) if cfg.normal_class is not None else None
    score = 1.0 - p[:, normal] if normal is not None else p.max(axis=1)
    if cfg.thresholds:
        over = np.zeros_like(p, dtype=bool)
        for name, t in cfg.thresholds.items():
            c = cfg.class_names.index(name)
            over[:, c] = (score >= t) if c == normal else (p[:, c] >= t)
        if normal is not None:
            over[:, normal] = False
            if cfg.normal_class in cfg.thresholds:  # score threshold: the frame's class is its best non-normal class
                hit = (score >= cfg.thresholds[cfg.normal_class])[:, None]
                best = np.where(np.arange(p.shape[1]) == normal, -1.0, p).argmax(axis=1)
                over |= hit & (np.arange(p.shape[1])[None, :] == best[:, None])
            else:  # a class the calibration left without a threshold (no validation positives) keeps argmax
                top = p.argmax(axis=1)
                for c in range(p.shape[1]):
                    if c != normal and cfg.class_names[c] not in cfg.thresholds:
                        over[:, c] = top == c
        flagged = over.any(axis=1)
        cls = np.where(over, p, -1.0).argmax(axis=1)
    else:
        cls = p.argmax(axis=1)
        flagged = cls != normal if normal is not None else np.ones(len(p), dtype=bool)
    flagged &= valid
    return score.astype(np.float32), flagged, cls.astype(np.int64)


Blocks = Iterator[tuple[np.ndarray, np.ndarray]]


def _smoothed_blocks(blocks: Blocks, w: int) -> Blocks:
    """Centred moving average over `w` frames across block boundaries (NaN rows count as zeros)."""
    if w <= 1:
        yield from blocks
        return
    half_l, half_r = (w - 1) // 2, w // 2
    buf_idx, buf, n_ctx = np.zeros((0,), np.int64), None, 0  # n_ctx leading rows are context, already emitted
    for idx, p in blocks:
        p = np.nan_to_num(np.asarray(p, np.float32))
        buf = p if buf is None else np.concatenate([buf, p])
        buf_idx = np.concatenate([buf_idx, idx])
        end = len(buf) - half_r
        if end > n_ctx:
            yield buf_idx[n_ctx:end], _moving_mean(buf, half_l, half_r)[n_ctx:end]
            keep_from = max(0, end - half_l)
            buf, buf_idx, n_ctx = buf[keep_from:], buf_idx[keep_from:], end - keep_from
    if buf is not None and len(buf) > n_ctx:
        yield buf_idx[n_ctx:], _moving_mean(buf, half_l, half_r)[n_ctx:]


def _moving_mean(x: np.ndarray, half_l: int, half_r: int) -> np.ndarray:
    c = np.concatenate([np.zeros((1, x.shape[1]), np.float64), np.cumsum(x, axis=0, dtype=np.float64)])
    n = len(x)
    lo = np.clip(np.arange(n) - half_l, 0, n)
    hi = np.clip(np.arange(n) + half_r + 1, 0, n)
    return ((c[hi] - c[lo]) / (hi - lo)[:, None]).astype(np.float32)


class _Open:
    __slots__ = ("start", "last", "peak_frame", "peak_score", "n")

    def __init__(self, f: int, s: float):
        self.start = self.last = self.peak_frame = f
        self.peak_score, self.n = s, 1


def compute_event_table(blocks: Blocks, cfg: TriageConfig, chunk: int = 65536) -> tuple[np.ndarray, int]:
    """Events as an EVENT_DTYPE table sorted by (start, class), and the number of flagged frames, from
    (frame numbers, probs) blocks in frame order. Closed events are packed into numpy chunks (22 bytes
    each), so even a study that flags every frame stays small in memory."""
    open_: dict[int, _Open] = {}
    rows: list[tuple] = []
    tables: list[np.ndarray] = []
    top: list[tuple[float, int, tuple]] = []
    n_flagged = 0

    def close(c: int) -> None:
        o = open_.pop(c)
        if o.n < cfg.min_run:
            return
        row = (o.start, o.last, c, o.peak_frame, o.peak_score, o.n, 1 << c)
        if cfg.top_k is None or cfg.merge_classes:  # merged events are cut to the top K after merging
            rows.append(row)
            if len(rows) >= chunk:
                tables.append(np.array(rows, dtype=EVENT_DTYPE))
                rows.clear()
        else:
            item = (float(o.peak_score), -o.start, row)
            (heapq.heappush if len(top) < cfg.top_k else heapq.heappushpop)(top, item)

    for idx, p in _smoothed_blocks(blocks, cfg.smooth):
        score, flagged, cls = classify(p, cfg)
        hits = np.flatnonzero(flagged)
        n_flagged += len(hits)
        for f, c, s in zip(idx[hits].tolist(), cls[hits].tolist(), score[hits].tolist(), strict=True):
            o = open_.get(c)
            if o is not None and f - o.last - 1 <= cfg.merge_gap:
                o.last, o.n = f, o.n + 1
                if s > o.peak_score:
                    o.peak_frame, o.peak_score = f, s
            else:
                if o is not None:
                    close(c)
                open_[c] = _Open(f, s)
        if len(idx):  # close events that can no longer grow, keeping the open set small
            for c in [c for c, o in open_.items() if int(idx[-1]) - o.last > cfg.merge_gap]:
                close(c)
    for c in list(open_):
        close(c)
    if cfg.top_k is not None and not cfg.merge_classes:
        rows = [t[2] for t in top]
    table = np.concatenate(tables + [np.array(rows, dtype=EVENT_DTYPE)])
    table = table[np.lexsort((table["class"], table["start"]))]
    if cfg.merge_classes:
        table = merge_across_classes(table, cfg.merge_gap)
        if cfg.top_k is not None and len(table) > cfg.top_k:  # the K strongest stops, in frame order
            keep = np.sort(np.argsort(-table["peak_score"], kind="stable")[: cfg.top_k])
            table = table[keep]
    return table, n_flagged


def events_from_table(table: np.ndarray) -> list[Event]:
    masks = event_classes(table)
    return [Event(int(r["start"]), int(r["end"]), int(r["class"]), int(r["peak_frame"]), float(r["peak_score"]),
                  int(r["n_flagged"]), 0 if int(m) == 1 << int(r["class"]) else int(m))
            for r, m in zip(table, masks, strict=True)]


def events_to_table(events: list[Event]) -> np.ndarray:
    return np.array([(e.start, e.end, e.cls, e.peak_frame, e.peak_score, e.n_flagged, e.classes or 1 << e.cls)
                     for e in events], dtype=EVENT_DTYPE)


def compute_events(blocks: Blocks, cfg: TriageConfig) -> tuple[list[Event], int]:
    """`compute_event_table` as `Event` objects (for small studies and tests)."""
    table, n = compute_event_table(blocks, cfg)
    return events_from_table(table), n


def thumbnail_frames(events: np.ndarray | list[Event], per_event: int, max_total: int) -> dict[int, list[int]]:
    """frame -> event numbers for the thumbnails a reviewer needs: each event's peak plus up to
    `per_event - 1` frames spread over the event; events with the highest peaks first, `max_total` in all."""
    table = events if isinstance(events, np.ndarray) else events_to_table(events)
    out: dict[int, list[int]] = {}
    for i in np.argsort(-table["peak_score"], kind="stable").tolist():
        e = table[i]
        start, end = int(e["start"]), int(e["end"])
        want = [int(e["peak_frame"])]
        if per_event > 1 and end > start:
            want += np.linspace(start, end, per_event - 1 + 2)[1:-1].round().astype(int).tolist()
        for f in dict.fromkeys(want):
            if len(out) >= max_total and f not in out:
                return out
            out.setdefault(int(f), []).append(i)
    return out
