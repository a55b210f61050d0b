"""What triage saves and what it risks over one or many studies: pooled lesion-level sensitivity with Wilson
intervals, false alerts per hour, frames to read and reading time per study with bootstrap intervals over
studies, detection delays, and the sensitivity bought by reading only the strongest events.

Input: one `groundtruth.Comparison` per study (its findings, events and reading estimate). Every figure is
defined in docs/evaluation.md; in short, per class and over all classes:
- sensitivity = caught findings / findings, pooled over studies; its interval respects that findings of one study
  are not independent: the union of the Wilson interval and a bootstrap over studies
  (`stats.clustered_proportion_ci`);
- false alerts per hour = events on no finding / hours of recording, pooled (sum over sum), bootstrap over
  studies;
- frames to read and reading minutes: per study, averaged over studies, bootstrap over studies;
- delay: median (and longest) time from a caught finding's first frame to its detection.
The curve ranks events by peak score: keeping only events whose peak reaches a threshold, it gives the mean
frames to read per study against the share of findings those events overlap, per class.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from capsule_batch.evaluation.groundtruth import Comparison
from capsule_batch.evaluation.reading_time import ReadingModel, frames_in_spans
from capsule_batch.evaluation.stats import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_CONFIDENCE,
    DEFAULT_SEED,
    bootstrap,
    clustered_proportion_ci,
    mean_of,
    ratio_of_sums,
)

_logger = logging.getLogger(__name__)

ALL = "all"
CURVE_POINTS = 200

Interval = tuple[float, float] | None


@dataclass
class Figures:
    """The figures of one class (or of all classes) over the studies summarised."""

    findings: int
    caught: int
    caught_class: int
    sensitivity: float | None
    sensitivity_ci: Interval
    sensitivity_class: float | None
    sensitivity_class_ci: Interval
    events: int
    false_alerts: int
    false_alerts_per_hour: float | None
    false_alerts_per_hour_ci: Interval
    frames_to_read: float
    frames_to_read_ci: Interval
    reading_min: float
    reading_min_ci: Interval
    delay_frames_median: float | None
    delay_s_median: float | None
    delay_s_max: float | None


@dataclass
class Curve:
    """Reading only the events whose peak score reaches `thresholds[k]`: mean frames to read and reading minutes
    per study, and the share of findings those events overlap (per class and `all`). The first point reads
    nothing (threshold None); the last keeps every event: the study's own operating point."""

    thresholds: list[float | None]
    frames: list[float]
    minutes: list[float]
    sensitivity: dict[str, list[float | None]]


@dataclass
class Summary:
    studies: int
    frames: int
    hours: float | None
    full_reading_min: float  # the whole recording, mean per study
    model: ReadingModel
    confidence: float
    bootstrap: int
    overall: Figures
    per_class: dict[str, Figures]
    curve: Curve
    misses: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["assumptions"] = {"reading_fps": self.model.fps, "event_seconds": self.model.event_s,
                            "sensitivity_ci": (f"union of the Wilson score interval and a percentile bootstrap over "
                                               f"studies (findings clustered by study), {self.confidence:g}"
                                               if self.studies > 1 and self.bootstrap
                                               else f"Wilson score interval, {self.confidence:g}"),
                            "rate_ci": (f"percentile bootstrap over studies, {self.bootstrap} resamples, seed "
                                        f"{DEFAULT_SEED}, {self.confidence:g}" if self.studies > 1 and self.bootstrap
                                        else "none (needs at least 2 studies)")}
        return d


@dataclass
class _PerStudy:
    """One class's raw counts in one study."""

    findings: int = 0
    caught: int = 0
    caught_class: int = 0
    events: int = 0
    false_alerts: int = 0
    frames_to_read: int = 0
    reading_s: float = 0.0
    delays_frames: list[int] = field(default_factory=list)
    delays_s: list[float] = field(default_factory=list)


def _class_order(comparisons: Sequence[Comparison]) -> list[str]:
    """Classes with findings or events, in the model's class order, then any other annotated class."""
    names = list(comparisons[0].class_names) if comparisons else []
    seen = {r.cls for c in comparisons for r in c.rows} | {e.cls for c in comparisons for e in c.event_rows}
    return [n for n in names if n in seen] + sorted(seen - set(names))


def _per_study(c: Comparison, cls: str | None, model: ReadingModel) -> _PerStudy:
    rows = [r for r in c.rows if cls is None or r.cls == cls]
    events = [e for e in c.event_rows if cls is None or e.cls == cls]
    frames = frames_in_spans(np.array([e.start for e in events], np.int64), np.array([e.end for e in events], np.int64))
    return _PerStudy(findings=len(rows), caught=sum(r.caught for r in rows),
                     caught_class=sum(r.class_matched for r in rows), events=len(events),
                     false_alerts=sum(not e.findings for e in events), frames_to_read=frames,
                     reading_s=model.triage_seconds(frames, len(events), c.frames),
                     delays_frames=[r.delay_frames for r in rows if r.delay_frames is not None],
                     delays_s=[r.delay_s for r in rows if r.delay_s is not None])


def _figures(per: list[_PerStudy], hours: np.ndarray | None, confidence: float, draws: int) -> Figures:
    n = sum(p.findings for p in per)
    k = sum(p.caught for p in per)
    kc = sum(p.caught_class for p in per)
    found = np.array([p.findings for p in per], np.float64)
    caught = np.array([p.caught for p in per], np.float64)
    caught_class = np.array([p.caught_class for p in per], np.float64)
    false = np.array([p.false_alerts for p in per], np.float64)
    frames = np.array([p.frames_to_read for p in per], np.float64)
    minutes = np.array([p.reading_s / 60 for p in per], np.float64)
    units = len(per)
    per_hour = per_hour_ci = None
    if hours is not None and hours.sum() > 0:
        per_hour = float(false.sum() / hours.sum())
        per_hour_ci = bootstrap(ratio_of_sums(false, hours), units, draws, confidence)
    delays_f = [d for p in per for d in p.delays_frames]
    delays_s = [d for p in per for d in p.delays_s]
    return Figures(
        findings=n, caught=k, caught_class=kc,
        sensitivity=k / n if n else None, sensitivity_ci=clustered_proportion_ci(caught, found, confidence, draws),
        sensitivity_class=kc / n if n else None,
        sensitivity_class_ci=clustered_proportion_ci(caught_class, found, confidence, draws),
        events=sum(p.events for p in per), false_alerts=int(false.sum()),
        false_alerts_per_hour=per_hour, false_alerts_per_hour_ci=per_hour_ci,
        frames_to_read=float(frames.mean()), frames_to_read_ci=bootstrap(mean_of(frames), units, draws, confidence),
        reading_min=float(minutes.mean()), reading_min_ci=bootstrap(mean_of(minutes), units, draws, confidence),
        delay_frames_median=float(np.median(delays_f)) if delays_f else None,
        delay_s_median=float(np.median(delays_s)) if delays_s else None,
        delay_s_max=float(max(delays_s)) if delays_s else None)


def summarise(comparisons: Sequence[Comparison], model: ReadingModel | None = None,
              confidence: float = DEFAULT_CONFIDENCE, draws: int = DEFAULT_BOOTSTRAP,
              curve_points: int = CURVE_POINTS) -> Summary:
    """Pool the studies' comparisons (see the module docstring); bootstrap intervals need 2 or more studies."""
    if not comparisons:
        raise ValueError("nothing to summarise: no studies")
    model = model or ReadingModel()
    durations = [c.duration_s for c in comparisons]
    if all(d for d in durations):
        hours = np.array(durations, np.float64) / 3600
    else:
        hours = None
        _logger.warning("%d studies have no recording duration (no fps, no timestamps): no false alerts per hour",
                        sum(not d for d in durations))
    classes = _class_order(comparisons)
    overall = _figures([_per_study(c, None, model) for c in comparisons], hours, confidence, draws)
    per_class = {n: _figures([_per_study(c, n, model) for c in comparisons], hours, confidence, draws)
                 for n in classes}
    misses = [{"study": c.study, "finding": r.finding, "class": r.cls, "start": r.start, "end": r.end}
              for c in comparisons for r in c.misses]
    return Summary(studies=len(comparisons), frames=sum(c.frames for c in comparisons),
                   hours=float(hours.sum()) if hours is not None else None,
                   full_reading_min=float(np.mean([model.seconds(c.frames) / 60 for c in comparisons])),
                   model=model, confidence=confidence, bootstrap=draws if len(comparisons) > 1 else 0,
                   overall=overall, per_class=per_class, curve=reading_curve(comparisons, classes, model,
                                                                              curve_points),
                   misses=misses)


def _cumulative_frames(c: Comparison, order: np.ndarray) -> np.ndarray:
    """Distinct frames inside the first k events of `order`, for k = 0..len(order)."""
    out = np.zeros(len(order) + 1, np.int64)
    if not len(order):
        return out
    covered = np.zeros(max(e.end for e in c.event_rows) + 1, bool)
    total = 0
    for k, i in enumerate(order.tolist(), start=1):
        e = c.event_rows[i]
        span = covered[e.start:e.end + 1]
        total += int(span.size - np.count_nonzero(span))
        span[:] = True
        out[k] = total
    return out


def reading_curve(comparisons: Sequence[Comparison], classes: list[str], model: ReadingModel,
                  points: int = CURVE_POINTS) -> Curve:
    """The curve of `Curve`'s docstring, at up to `points` thresholds spread over the events' peak scores."""
    peaks = np.unique(np.concatenate([[e.peak_score for e in c.event_rows] for c in comparisons] + [[]]))[::-1]
    if len(peaks) > points:
        peaks = peaks[np.unique(np.linspace(0, len(peaks) - 1, points).round().astype(int))]
    thresholds = np.r_[math.inf, peaks]
    frames = np.zeros(len(thresholds))
    minutes = np.zeros(len(thresholds))
    caught = {n: np.zeros(len(thresholds)) for n in [ALL, *classes]}
    total = dict.fromkeys([ALL, *classes], 0)
    for c in comparisons:
        p = np.array([e.peak_score for e in c.event_rows], np.float64)
        order = np.argsort(-p, kind="stable")
        kept = np.searchsorted(-p[order], -thresholds, side="right")  # events with peak >= threshold
        cum = _cumulative_frames(c, order)
        frames += cum[kept]
        minutes += np.array([model.triage_seconds(f, k, c.frames) / 60 for f, k in zip(cum[kept], kept, strict=True)])
        for r in c.rows:
            best = max((p[i] for i in r.events), default=-math.inf)
            hit = best >= thresholds
            for n in (ALL, r.cls):
                if n in caught:
                    caught[n] += hit
                    total[n] += 1
    s = len(comparisons)
    sens = {n: [float(v / total[n]) if total[n] else None for v in caught[n]] for n in caught}
    return Curve([None, *[float(t) for t in peaks]], (frames / s).tolist(), (minutes / s).tolist(), sens)


def curve_svg(curve: Curve, colours: dict[str, str] | None = None, title: str = "") -> str:
    """The curve as an SVG line chart: sensitivity against frames to read per study, one line per class."""
    from capsule_batch.evaluation.svgplot import Series, line_chart

    colours = colours or {}
    series = []
    for name, ys in curve.sensitivity.items():
        pts = [(x, y) for x, y in zip(curve.frames, ys, strict=True) if y is not None]
        if pts:
            series.append(Series(name, colours.get(name, "#222222" if name == ALL else "#888888"),
                                 [p[0] for p in pts], [p[1] for p in pts], width=2.5 if name == ALL else 1.5))
    return line_chart(series, xlabel="frames to read per study (events ranked by peak score)",
                      ylabel="findings caught", title=title, y_max=1.0)
