"""Scale: a 1,000,000-frame study with thousands of events. The app's first page is usable in under 2 s
(timeline downsampled on the server, event list paged) and the report stays under ~20 MB."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import pytest
from review_browser import chromium
from review_studies import jpeg, study_attrs

from capsule_batch.model.classes import CE24_CLASSES
from capsule_batch.review.app import ReviewApp, Server
from capsule_batch.review.report import write_report
from capsule_batch.sources.synthesize import Scene
from capsule_batch.study.store import StudyWriter
from capsule_batch.study.triage import Event, TriageConfig

_logger = logging.getLogger(__name__)
N, EVENTS, THUMBED, PER_EVENT, BLOCK = 1_000_000, 4000, 400, 3, 200_000


@pytest.fixture(scope="module")
def big_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random probabilities written in large blocks; events placed directly; thumbnails for a few hundred."""
    t0 = time.perf_counter()
    path = tmp_path_factory.mktemp("scale") / "big.h5"
    rng = np.random.default_rng(0)
    w = StudyWriter.open(path, study_attrs())
    c = len(CE24_CLASSES)
    for lo in range(0, N, BLOCK):
        p = rng.random((BLOCK, c), dtype=np.float32) ** 8
        p[:, CE24_CLASSES.index("Normal")] += 4
        w.append(np.arange(lo, lo + BLOCK), np.arange(lo, lo + BLOCK) / 4.0, p / p.sum(1, keepdims=True),
                 np.zeros(BLOCK, np.uint8))
    starts = np.sort(rng.choice(N // 50, EVENTS, replace=False)) * 50
    events = []
    for s in starts.tolist():
        length = int(rng.integers(1, 40))
        cls = int(rng.choice([0, 1, 2, 3, 4, 5, 7, 8, 9]))
        events.append(Event(s, s + length - 1, cls, s + length // 2, float(rng.uniform(0.5, 1)), length))
    scene = Scene(224, 64, 0, 4.0, 0.0)
    pics = [jpeg(scene.render(i)) for i in range(0, 64, 4)]
    thumbs = []
    for k, i in enumerate(sorted(rng.choice(EVENTS, THUMBED, replace=False).tolist())):
        e = events[i]
        for j, f in enumerate(sorted({e.peak_frame, e.start, e.end, (e.start + e.peak_frame) // 2})):
            thumbs.append((f, i, pics[(k + j) % len(pics)]))
    w.finish(events, sum(e.n_flagged for e in events), TriageConfig(tuple(CE24_CLASSES), "Normal"), thumbs)
    w.close()
    _logger.info("built %s in %.1f s", path, time.perf_counter() - t0)
    return path


def test_first_page_under_two_seconds(big_study: Path) -> None:
    t0 = time.perf_counter()
    app = ReviewApp(big_study)
    startup = time.perf_counter() - t0
    with Server(app) as srv, chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 820})
        page.goto("about:blank")
        t1 = time.perf_counter()
        page.goto(srv.url)
        page.wait_for_selector("body[data-ready='1']")
        page.keyboard.press("j")
        page.wait_for_selector("#ev-title:has-text('Event #0')")
        first_page = time.perf_counter() - t1
        assert page.locator("#events li").count() == 100
        assert page.text_content("#page-info") == f"page 1 / {EVENTS // 100} · {EVENTS} events"
        t2 = time.perf_counter()
        page.select_option("#sort", "score")
        page.click("#page-next")
        page.wait_for_selector("#page-info:has-text('page 2 /')")
        resort = time.perf_counter() - t2
        tl = json.loads(page.evaluate("() => fetch('/api/timeline').then(r => r.text())"))
    print(json.dumps({"test": "review_scale", "frames": N, "events": EVENTS, "startup_s": round(startup, 2),
                      "first_page_s": round(first_page, 2), "resort_page_s": round(resort, 2)}))
    assert len(tl["probs"]) == 1200 and sum(t >= 0 for t in tl["ticks"]) > 100
    assert first_page < 2.0, first_page


def test_report_stays_small(big_study: Path, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    out = write_report(big_study, tmp_path / "big.html")
    size = out.stat().st_size
    html = out.read_text(encoding="utf-8")
    left_out = re.search(r"(\d+) further stored thumbnails? left out", html)
    print(json.dumps({"test": "report_scale", "bytes": size, "seconds": round(time.perf_counter() - t0, 2),
                      "embedded": html.count('<figure><img src="data:image/jpeg'),
                      "left_out": int(left_out.group(1)) if left_out else 0}))
    assert size < 20e6
    assert html.count('<article class="event') == EVENTS
    assert "further stored thumbnails left out" in html
