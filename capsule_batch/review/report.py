"""The shareable report: one self-contained HTML file (CSS inline, images as data: URIs, no script).

Size stays bounded on large studies: at most `per_event` thumbnails per event, and a total budget for
embedded images; peaks of all events (strongest first) come before extra frames, and each event says
how many of its thumbnails were left out.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from capsule_batch import __version__
from capsule_batch.errors import MissingPackageError
from capsule_batch.evaluation.reading_time import ReadingEstimate, ReadingModel, clock, study_estimate
from capsule_batch.review.view import StudyView
from capsule_batch.study.decisions import read_decisions

if TYPE_CHECKING:
    from capsule_batch.evaluation.burden import Summary
    from capsule_batch.evaluation.groundtruth import Comparison

_logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
PALETTE = ["#e6194b", "#d00000", "#f58231", "#ffb000", "#911eb4", "#42d4f4", "#8a8a8a", "#3cb44b", "#f032e6",
           "#4363d8", "#9a6324", "#469990"]
DEFAULT_PER_EVENT = 3
DEFAULT_IMAGE_BUDGET = 12 * 1024 * 1024


@dataclass
class EventRow:
    id: int
    start: int
    end: int
    time: str
    cls: str
    colour: str
    score: float
    n_flagged: int
    peak: int
    peak_file: str = ""  # frame folders: the peak frame's file name
    also: list[str] = field(default_factory=list)  # the other classes flagged inside the event
    verdict: str = ""
    new_cls: str = ""
    reviewer: str = ""
    decided: str = ""
    comment: str = ""
    thumbs: list[tuple[int, str, str]] = field(default_factory=list)  # (frame, data URI, file name or "")
    left_out: int = 0
    on: list[str] | None = None  # findings the event overlaps, when the report was given findings


def _colour(c: int) -> str:
    return PALETTE[c % len(PALETTE)]


def class_colours(names: Sequence[str]) -> dict[str, str]:
    """Each class's colour in the app, the report and the charts."""
    return {n: _colour(c) for c, n in enumerate(names)}


#: what a report is for, on every report (and in the README)
INTENDED_USE = ("Research and reading support, not a medical device: the events are where a model trained on public "
                "data saw something, and every finding is for a qualified reader to confirm; frames without an event "
                "are not cleared.")


def _clock(sec: float | None) -> str:
    """h:mm:ss; empty where the time is unknown (None, NaN: a frame folder without a frame rate)."""
    if sec is None or not math.isfinite(sec):
        return ""
    s = int(sec)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def reading_context(est: ReadingEstimate) -> dict[str, Any]:
    """The reading estimate as the report and the app show it."""
    return {"frames_to_read": est.frames_to_read, "frames": est.frames, "events": est.events,
            "percent": 100 * est.fraction_to_read, "reading": clock(est.reading_s), "full": clock(est.full_s),
            "assumptions": est.model.describe()}


def findings_context(cmp: Comparison, summary: Summary, findings: str | os.PathLike) -> dict[str, Any]:
    """What was caught, for the report: the findings one by one, per-class figures, the curve as SVG."""
    from capsule_batch.evaluation.burden import curve_svg

    def pct(v: float | None, ci: Any) -> str:
        if v is None:
            return "–"
        return f"{100 * v:.0f} %" + (f" ({100 * ci[0]:.0f}–{100 * ci[1]:.0f} %)" if ci else "")

    colours = class_colours(cmp.class_names)
    rows = [{"finding": r.finding, "cls": r.cls, "colour": colours.get(r.cls, "#bbbbbb"), "start": r.start,
             "end": r.end, "caught": r.caught, "class_matched": r.class_matched, "events": r.events,
             "classes": ", ".join(r.event_classes), "delay_frames": r.delay_frames,
             "delay": "" if r.delay_s is None else f"{r.delay_s:.1f} s"} for r in cmp.rows]
    table = [{"name": n, "colour": colours.get(n, "#bbbbbb"), "findings": f.findings, "caught": f.caught,
              "sensitivity": pct(f.sensitivity, f.sensitivity_ci), "caught_class": f.caught_class,
              "false_alerts": f.false_alerts,
              "per_hour": "–" if f.false_alerts_per_hour is None else f"{f.false_alerts_per_hour:.1f}",
              "frames_to_read": int(f.frames_to_read), "reading": clock(f.reading_min * 60),
              "delay": "–" if f.delay_s_median is None else f"{f.delay_s_median:.1f} s"}
             for n, f in [*summary.per_class.items(), ("all classes", summary.overall)]]
    svg = curve_svg(summary.curve, colours)
    return {"file": Path(findings).name, "rows": rows, "table": table, "caught": cmp.caught, "n": cmp.findings,
            "caught_class": cmp.caught_class, "false_events": cmp.false_events, "events": cmp.events,
            "per_hour": cmp.false_alerts_per_hour, "curve": _data_uri("image/svg+xml", svg.encode("utf-8")),
            "on": {e.id: e.findings for e in cmp.event_rows}}


def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def timeline_png(view: StudyView, width: int = 1200, row_h: int = 9, tick_h: int = 12) -> bytes:
    """The app's colour bar as a PNG: one row per non-normal class (opacity = highest probability in the
    bin), then a row of flagged ticks coloured by class."""
    from PIL import Image

    tl = view.timeline(bins=width)
    rows = [c for c in range(len(view.class_names)) if c != view.normal_index]
    bins = len(tl.probs)
    img = np.full((len(rows) * row_h + tick_h + 6, bins, 3), 17, np.float32)
    rgb = np.array([[int(_colour(c)[k:k + 2], 16) for k in (1, 3, 5)] for c in range(len(view.class_names))],
                   np.float32)
    for r, c in enumerate(rows):
        a = np.clip(tl.probs[:, c], 0, 1)[None, :, None]
        a = np.where(a < 0.1, 0, a)
        img[r * row_h:(r + 1) * row_h - 1] = 17 * (1 - a) + rgb[c] * a
    y = len(rows) * row_h + 2
    has = tl.ticks >= 0
    img[y:y + tick_h, has] = rgb[tl.ticks[has]]
    img[y + tick_h + 1:, tl.failed > 0] = 187  # frames that failed to decode: grey marks below the ticks
    pic = Image.fromarray(img.astype(np.uint8))
    if bins != width:
        pic = pic.resize((width, pic.height), Image.NEAREST)
    buf = io.BytesIO()
    pic.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _pick_thumbs(view: StudyView, order: Sequence[int], per_event: int, budget: int) -> dict[int, list[int]]:
    """Frames to embed per event: peaks first over all events (strongest first), then further frames."""
    want = {}
    for i in order:
        frames = view.thumbs_of_event.get(i, [])
        peak = view.events[i].peak_frame
        want[i] = ([peak] if peak in frames else []) + [f for f in frames if f != peak]
    chosen: dict[int, list[int]] = {i: [] for i in order}
    used = 0
    for k in range(per_event):
        for i in order:
            if k < len(want[i]):
                size = len(view.thumbs[want[i][k]]) * 4 // 3 + 30
                if used + size > budget:
                    return chosen
                chosen[i].append(want[i][k])
                used += size
    return chosen


def build_report(study: str | os.PathLike, per_event: int = DEFAULT_PER_EVENT,
                 image_budget: int = DEFAULT_IMAGE_BUDGET, findings: str | os.PathLike | None = None,
                 reading: ReadingModel | None = None) -> str:
    """The report's HTML text; with `findings` (a findings CSV) it also shows what was caught."""
    try:
        import jinja2
    except ImportError as e:
        raise MissingPackageError("jinja2", "review", "the HTML report") from e
    found = None
    if findings is not None:
        from capsule_batch.evaluation.burden import summarise
        from capsule_batch.evaluation.groundtruth import compare

        cmp = compare(study, findings, reading)
        found = findings_context(cmp, summarise([cmp], reading), findings)
    view = StudyView(study)
    try:
        decisions = read_decisions(study)
        names = view.class_names
        by_score = [int(i) for i in view.order("score")]
        chosen = _pick_thumbs(view, by_score, per_event, image_budget)
        rows = []
        for i in (int(i) for i in view.order("time")):
            e = view.events[i]
            d = decisions.get(i)
            have = view.thumbs_of_event.get(i, [])
            row = EventRow(i, e.start, e.end, _clock(float(view.ev_time[i])), names[e.cls], _colour(e.cls),
                           float(e.peak_score), e.n_flagged, e.peak_frame, view.frame_file(e.peak_frame) or "",
                           [names[c] for c in e.class_set[1:] if c < len(names)],
                           thumbs=[(f, _data_uri("image/jpeg", view.thumbs[f]), view.frame_file(f) or "")
                                   for f in chosen.get(i, [])],
                           left_out=len(have) - len(chosen.get(i, [])),
                           on=found["on"].get(i, []) if found else None)
            if d is not None:
                row.verdict, row.reviewer, row.decided, row.comment = d.verdict, d.reviewer, d.time, d.comment
                row.new_cls = names[d.cls] if d.cls is not None and d.cls != e.cls else ""
            rows.append(row)
        n = view.n_frames
        flagged = view.attrs.get("flagged_frames")
        per_class = []
        for c, name in enumerate(names):
            ids = np.nonzero(view.ev_cls == c)[0].tolist()
            if not ids:
                continue
            ds = [decisions[i] for i in ids if i in decisions]
            per_class.append({"name": name, "colour": _colour(c), "events": len(ids),
                              "frames": int(sum(view.events[i].n_flagged for i in ids)),
                              "confirmed": sum(d.verdict == "confirm" for d in ds),
                              "rejected": sum(d.verdict == "reject" for d in ds),
                              "reassigned": sum(d.cls is not None and d.cls != c for d in ds)})
        duration = view.frame_time(n - 1) if n else None
        prov = view.provenance()
        triage = prov.pop("triage", None)
        ctx = {
            "title": view.source_name, "study": view.path.name, "provenance": prov, "triage": triage,
            "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "version": __version__,
            "intended_use": INTENDED_USE,
            "frames": n, "duration": _clock(duration),
            "axis": [_clock(view.frame_time(min(n - 1, n * k // 4))) for k in range(5)] if n else [],
            "flagged": flagged, "failed": view.n_failed,
            "flag_rate": (100.0 * flagged / n) if n and isinstance(flagged, int) else None,
            "n_events": len(view.events), "reviewed": sum(1 for d in decisions.values() if d.verdict),
            "confirmed": sum(d.verdict == "confirm" for d in decisions.values()),
            "rejected": sum(d.verdict == "reject" for d in decisions.values()),
            "per_class": per_class, "events": rows, "per_event": per_event,
            "left_out": sum(r.left_out for r in rows), "embedded": sum(len(r.thumbs) for r in rows),
            "timeline": _data_uri("image/png", timeline_png(view)),
            "legend": [(names[c], _colour(c)) for c in range(len(names)) if c != view.normal_index],
            "css": (HERE / "static" / "report.css").read_text(encoding="utf-8"),
            "reading": reading_context(study_estimate(view.reader, reading)), "found": found,
        }
    finally:
        view.close()
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    return env.get_template("report.html").render(**ctx)


def write_report(study: str | os.PathLike, out: str | os.PathLike, per_event: int = DEFAULT_PER_EVENT,
                 image_budget: int = DEFAULT_IMAGE_BUDGET, findings: str | os.PathLike | None = None,
                 reading: ReadingModel | None = None) -> Path:
    """Write the report next to its final name and rename it into place (no half-written reports)."""
    out = Path(out)
    html = build_report(study, per_event, image_budget, findings, reading)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, out)
    _logger.info("%s: report written (%.1f MB)", out, out.stat().st_size / 1e6)
    return out
