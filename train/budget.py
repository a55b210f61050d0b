"""Thresholds for a reading budget, and what a set of thresholds buys on the validation data.

`calibrate` sets per-class thresholds. Besides a target frame-level sensitivity it can target a budget per
study: at most N frames to read (`calibrate.budget_frames`), M minutes of reading (`budget_minutes`), or a flag
rate (`budget_flag_rate`); any combination must all hold. The thresholds are searched along one line: every
class's threshold is the one that reaches a common target sensitivity s on its validation positives
(`train.metrics.calibrate_thresholds`); the result is the highest s, at most `calibrate.target_sensitivity`, whose
cost stays within the budget. The candidates are the values of s at which some class's threshold changes
(k / positives of that class); flagged frames and frames to read only grow with s, reading time need not (more
flagged frames can merge events into fewer), so the search scans 64 of them, takes the highest that fits, and
bisects between it and the next one scanned. Thresholds above 0.5 (stricter than argmax) are then lowered to 0.5
where the budget still holds (`cap_at_argmax`).

Costs come from the runtime's own triage (`capsule_batch.study.triage`: the same flag rule and event building) and
reading model (`capsule_batch.evaluation.reading_time`), on the validation frames:
- flag rate: flagged validation frames / validation frames;
- with frames of recordings in data.val (`recording` datasets): per recording, events are built from its
  validation frames in frame order; frames to read = distinct frames inside events, scaled by the recording's
  frames per validation frame (1 with `every: 1`); per study = (frames to read / frames spanned) x study length,
  events likewise; reading minutes per the reading model. Lesions are runs of neighbouring validation frames of
  one recording with the same non-normal label; a lesion is caught when one of its frames is flagged, with its
  class when one is flagged as that class;
- without recordings (single images) frames to read per study = flag rate x `calibrate.study_frames`, and no
  events are counted (reading time is then frames / speed, a lower bound); there are no lesions.
The study length is `calibrate.study_frames`, by default the mean span of the validation recordings.
"""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from capsule_batch.evaluation.reading_time import ReadingModel, frames_in_spans
from capsule_batch.evaluation.stats import wilson
from capsule_batch.study.triage import TriageConfig, classify, compute_event_table
from train.config import ConfigError
from train.metrics import calibrate_thresholds

_logger = logging.getLogger(__name__)

#: values of the common target sensitivity tried before bisecting (see fit_budget)
SCAN_POINTS = 64
#: a class at this probability or more is the frame's top class: argmax triage flags it whatever the thresholds say
ARGMAX_LEVEL = 0.5


@dataclass(frozen=True)
class Budget:
    """Per-study limits; None: no limit of that kind."""

    frames: float | None = None
    minutes: float | None = None
    flag_rate: float | None = None

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.frames, self.minutes, self.flag_rate))

    def describe(self) -> str:
        parts = [f"{self.frames:g} frames" if self.frames is not None else "",
                 f"{self.minutes:g} minutes" if self.minutes is not None else "",
                 f"a flag rate of {self.flag_rate:g}" if self.flag_rate is not None else ""]
        return "at most " + " and ".join(p for p in parts if p) + " per study"


def budget_from_config(section: dict[str, Any]) -> Budget:
    """calibrate.budget_frames / budget_minutes / budget_flag_rate, validated."""
    values = {}
    for key in ("frames", "minutes", "flag_rate"):
        v = section.get(f"budget_{key}")
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or (key == "flag_rate" and v > 1):
            want = "a fraction in (0, 1]" if key == "flag_rate" else "a number > 0"
            raise ConfigError(f"calibrate.budget_{key}: must be {want}, got {v!r}")
        values[key] = float(v)
    return Budget(**values)


def reading_from_config(section: dict[str, Any]) -> ReadingModel:
    try:
        return ReadingModel(float(section.get("reading_fps", 15.0)), float(section.get("event_seconds", 5.0)))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"calibrate.reading_fps / calibrate.event_seconds: {e}") from None


@dataclass
class Recording:
    """The validation frames of one recording: their rows in the scored set, in frame order."""

    name: str
    rows: np.ndarray
    span: int  # frames of the recording from its first to its last validation frame


def recordings_of(samples: list[Any]) -> list[Recording]:
    """Validation frames grouped by recording (samples with a frame position), each in frame order."""
    by: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    for i, s in enumerate(samples):
        if getattr(s, "position", None) is not None:
            by[s.group].append((int(s.position), i))
    out = []
    for name, items in sorted(by.items()):
        items.sort()
        pos = [p for p, _ in items]
        out.append(Recording(name, np.array([i for _, i in items], np.int64), pos[-1] - pos[0] + 1))
    return out


def lesion_runs(labels: np.ndarray, recordings: list[Recording], normal: int | None) -> list[tuple[int, np.ndarray]]:
    """(class, rows) of every maximal run of neighbouring validation frames with one non-normal label."""
    out = []
    for r in recordings:
        lab = labels[r.rows]
        if not len(lab):
            continue
        cuts = np.flatnonzero(np.diff(lab)) + 1
        for seg in np.split(np.arange(len(lab)), cuts):
            c = int(lab[seg[0]])
            if c != normal:
                out.append((c, r.rows[seg]))
    return out


@dataclass
class Cost:
    """What a set of thresholds costs per study (see the module docstring)."""

    flag_rate: float
    study_frames: float | None
    frames_to_read: float | None
    events: float | None
    reading_min: float | None

    def within(self, b: Budget) -> bool:
        def ok(have: float | None, limit: float | None) -> bool:
            return limit is None or (have is not None and have <= limit + 1e-9)

        return ok(self.frames_to_read, b.frames) and ok(self.reading_min, b.minutes) and ok(self.flag_rate,
                                                                                             b.flag_rate)


class Evaluator:
    """Scores thresholds on fixed validation data: flags and classes by the runtime's rule, costs, lesions."""

    def __init__(self, labels: np.ndarray, probs: np.ndarray, class_names: list[str], normal: str | None,
                 recordings: list[Recording], study_frames: float | None, model: ReadingModel,
                 merge_gap: int = TriageConfig.merge_gap, merge_classes: bool = TriageConfig.merge_classes):
        self.labels, self.probs, self.class_names, self.normal = np.asarray(labels), probs, class_names, normal
        self.recordings, self.model, self.merge_gap = recordings, model, merge_gap
        self.merge_classes = merge_classes  # events as `run` makes them: one per stop (see triage.TriageConfig)
        self.normal_index = class_names.index(normal) if normal in class_names else None
        spans = [r.span for r in recordings]
        self.study_frames = float(study_frames) if study_frames else (float(np.mean(spans)) if spans else None)
        self.lesions = lesion_runs(self.labels, recordings, self.normal_index)

    def _config(self, thresholds: dict[str, float]) -> TriageConfig:
        return TriageConfig(tuple(self.class_names), self.normal, thresholds or None, merge_gap=self.merge_gap,
                            merge_classes=self.merge_classes)

    def cost(self, thresholds: dict[str, float]) -> Cost:
        cfg = self._config(thresholds)
        _, flagged, _ = classify(self.probs, cfg)
        rate = float(flagged.mean()) if len(flagged) else 0.0
        s = self.study_frames
        if self.recordings:
            read = events = 0.0
            for r in self.recordings:
                table, _ = compute_event_table(iter([(np.arange(len(r.rows)), self.probs[r.rows])]), cfg)
                read += frames_in_spans(table["start"], table["end"]) * r.span / len(r.rows)
                events += len(table)
            spanned = sum(r.span for r in self.recordings)
            frames, n_events = read / spanned * s, events / spanned * s
            return Cost(rate, s, frames, n_events, self.model.seconds(frames, n_events) / 60)
        if s is None:
            return Cost(rate, None, None, None, None)
        return Cost(rate, s, rate * s, None, self.model.seconds(rate * s) / 60)

    def buys(self, thresholds: dict[str, float], confidence: float = 0.95) -> dict[str, Any]:
        """Per-class frame-level sensitivity and flag rate, lesion-level sensitivity (recordings only) with Wilson
        intervals, and the cost per study."""
        cfg = self._config(thresholds)
        _, flagged, cls = classify(self.probs, cfg)
        per_class: dict[str, dict[str, Any]] = {}
        for c, name in enumerate(self.class_names):
            if c == self.normal_index:
                continue
            pos = self.labels == c
            if not pos.any():
                continue
            row: dict[str, Any] = {"threshold": thresholds.get(name), "positives": int(pos.sum()),
                                   "frame_sensitivity": float((flagged & pos).sum() / pos.sum()),
                                   "frame_sensitivity_class": float((flagged & pos & (cls == c)).sum() / pos.sum()),
                                   "flag_rate": float((flagged & (cls == c)).mean())}
            per_class[name] = row
        lesions = None
        if self.recordings:
            totals = {"lesions": 0, "caught": 0, "caught_class": 0}
            by: dict[str, dict[str, int]] = {}
            for c, rows in self.lesions:
                d = by.setdefault(self.class_names[c], {"lesions": 0, "caught": 0, "caught_class": 0})
                hit = bool(flagged[rows].any())
                hit_c = bool((flagged[rows] & (cls[rows] == c)).any())
                for t in (d, totals):
                    t["lesions"] += 1
                    t["caught"] += hit
                    t["caught_class"] += hit_c

            def figures(d: dict[str, int]) -> dict[str, Any]:
                n = d["lesions"]
                return {**d, "sensitivity": d["caught"] / n if n else None,
                        "sensitivity_ci": wilson(d["caught"], n, confidence),
                        "sensitivity_class": d["caught_class"] / n if n else None}

            lesions = {"per_class": {k: figures(v) for k, v in by.items()}, "all": figures(totals)}
            for name, v in lesions["per_class"].items():
                per_class.setdefault(name, {})["lesion_sensitivity"] = v["sensitivity"]
        cost = self.cost(thresholds)
        full = self.model.seconds(cost.study_frames) / 60 if cost.study_frames else None
        return {"per_class": per_class, "lesions": lesions, "cost": asdict(cost), "full_reading_min": full,
                "recordings": len(self.recordings), "assumptions": {"reading_fps": self.model.fps,
                                                                    "event_seconds": self.model.event_s,
                                                                    "merge_gap": self.merge_gap}}


def _targets(labels: np.ndarray, class_names: list[str], skip: tuple[str, ...], cap: float) -> np.ndarray:
    """The common targets s <= cap at which some class's threshold changes: k / (positives of the class)."""
    out = {cap}
    for c, name in enumerate(class_names):
        n = int(np.sum(labels == c))
        if name not in skip and n:
            out.update(k / n for k in range(1, n + 1) if k / n <= cap)
    return np.array(sorted(out))


def fit_budget(ev: Evaluator, budget: Budget, cap: float, skip: tuple[str, ...]
               ) -> tuple[dict[str, dict[str, Any]], float, Cost]:
    """The thresholds of the highest common target sensitivity (<= cap) within the budget (module docstring)."""
    if not 0 < cap <= 1:
        raise ConfigError(f"calibrate.target_sensitivity must be in (0, 1], got {cap}")
    if (budget.frames is not None or budget.minutes is not None) and ev.study_frames is None:
        raise ConfigError("calibrate.budget_frames / budget_minutes: data.val holds no recordings, so the length "
                          "of a study is unknown: set calibrate.study_frames (frames in one study)")
    targets = _targets(ev.labels, ev.class_names, skip, cap)

    def table(s: float) -> dict[str, dict[str, Any]]:
        return calibrate_thresholds(ev.labels, ev.probs, ev.class_names, s, skip=skip)

    if not table(cap):  # no class with validation positives: nothing to fit (the caller says so)
        return {}, cap, ev.cost({})

    def thresholds(t: dict[str, dict[str, Any]]) -> dict[str, float]:
        return {c: row["threshold"] for c, row in t.items()}

    costs: dict[int, Cost] = {}

    def cost(k: int) -> Cost:
        if k not in costs:
            costs[k] = ev.cost(thresholds(table(float(targets[k]))))
        return costs[k]

    # frames and flag rate only grow with s, reading time need not (more flags can merge events): scan a grid of
    # s, take the highest point that fits, then bisect between it and the next grid point
    grid = np.unique(np.linspace(0, len(targets) - 1, min(len(targets), SCAN_POINTS)).round().astype(int))
    fits = [int(k) for k in grid if cost(int(k)).within(budget)]
    if not fits:
        raise ConfigError(f"calibrate: the budget ({budget.describe()}) cannot be met on data.val: no common target "
                          f"sensitivity fits it (the strictest thresholds, one validation frame per class, give "
                          f"{_describe_cost(cost(0))})")
    lo = fits[-1]
    above = grid[grid > lo]
    hi = int(above[0]) - 1 if len(above) else lo  # targets[lo] fits; the next grid point does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid).within(budget):
            lo = mid
        else:
            hi = mid - 1
    best = cost(lo)
    s = float(targets[lo])
    _logger.info("budget %s: common target sensitivity %.4f (of at most %.4f): %s", budget.describe(), s, cap,
                 _describe_cost(best))
    fitted = table(s)
    capped = cap_at_argmax(ev, fitted)
    if capped != fitted:
        capped_cost = ev.cost(thresholds(capped))
        if capped_cost.within(budget):
            _logger.info("thresholds above %.2f (%s) lowered to it: the budget still holds (%s)", ARGMAX_LEVEL,
                         ", ".join(c for c in fitted if capped[c] != fitted[c]), _describe_cost(capped_cost))
            return capped, s, capped_cost
    return fitted, s, best


def cap_at_argmax(ev: Evaluator, table: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`table` with every threshold above ARGMAX_LEVEL lowered to it, each row's sensitivity and flag rate recomputed.

    With few validation positives of a class, the threshold that reaches the target sensitivity is about the
    lowest probability the model gave them, which can be far above what the model gives the next finding of that
    class (one finding per class in a validation recording: thresholds of 0.999 that missed a finding at 0.99 which
    argmax flags). A budget that is met either way gives no reason to be stricter than argmax, so `fit_budget`
    takes these thresholds whenever they still fit it."""
    labels, probs = np.asarray(ev.labels), np.asarray(ev.probs, np.float64)
    out = {}
    for name, row in table.items():
        if row["threshold"] <= ARGMAX_LEVEL:
            out[name] = row
            continue
        c = ev.class_names.index(name)
        pos = probs[labels == c, c]
        out[name] = {**row, "threshold": ARGMAX_LEVEL, "sensitivity": float(np.mean(pos >= ARGMAX_LEVEL)),
                     "flag_rate": float(np.mean(probs[:, c] >= ARGMAX_LEVEL))}
    return out


def _describe_cost(c: Cost) -> str:
    parts = [f"flag rate {c.flag_rate:.4f}"]
    if c.frames_to_read is not None:
        parts.append(f"{c.frames_to_read:.0f} frames to read per study of {c.study_frames:.0f}")
    if c.reading_min is not None:
        parts.append(f"{c.reading_min:.1f} min reading" + ("" if c.events is not None else " (frames only)"))
    return ", ".join(parts)


def log_buys(buys: dict[str, Any]) -> None:
    c = buys["cost"]
    if c["frames_to_read"] is not None:
        _logger.info("per study of %.0f frames: %.0f frames to read, %s events, %.1f min reading (whole recording "
                     "%.1f min)", c["study_frames"], c["frames_to_read"],
                     "?" if c["events"] is None else f"{c['events']:.1f}", c["reading_min"], buys["full_reading_min"])
    if buys["lesions"]:
        a = buys["lesions"]["all"]
        ci = a["sensitivity_ci"]
        _logger.info("lesions in %d validation recordings: %d of %d caught (%s), %d with their class",
                     buys["recordings"], a["caught"], a["lesions"],
                     "n/a" if ci is None else f"{a['sensitivity']:.3f}, 95% CI {ci[0]:.3f}-{ci[1]:.3f}",
                     a["caught_class"])
    for name, v in buys["lesions"]["per_class"].items() if buys["lesions"] else []:
        _logger.info("  %-18s lesions %d caught %d (%.3f)", name, v["lesions"], v["caught"],
                     v["sensitivity"] if v["sensitivity"] is not None else math.nan)
