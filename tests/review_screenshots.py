"""Make the screenshots in docs/img/ from a synthetic study: `python tests/review_screenshots.py`."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).resolve().parents[1])]

from review_browser import chromium, wait_images_loaded  # noqa: E402
from review_studies import make_study  # noqa: E402

from capsule_batch.review.app import ReviewApp, Server  # noqa: E402
from capsule_batch.review.report import write_report  # noqa: E402
from capsule_batch.study.decisions import DecisionLog  # noqa: E402

RUNS = [(300, 330, 1, 0.9), (900, 912, 8, 0.8), (1500, 1560, 7, 0.7), (2100, 2108, 0, 0.95), (2600, 2640, 3, 0.75),
        (3300, 3320, 2, 0.85), (3900, 3906, 5, 0.6), (4500, 4530, 1, 0.97), (5200, 5260, 9, 0.8), (5700, 5712, 4, 0.9)]


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        study = make_study(Path(tmp) / "study.h5", n=6000, runs=RUNS, source="/data/patient-0042.mp4",
                           thumb_size=160, per_event=6)
        log = DecisionLog(study, 10, 10)
        log.record(0, "confirm", None, "active bleeding, distal jejunum", "dr. a")
        log.record(1, "reject", None, "bubbles", "dr. a")
        log.record(2, "confirm", 7, "", "dr. a")
        log.fold()
        srv = Server(ReviewApp(study)).start()
        try:
            with chromium() as browser:
                page = browser.new_page(viewport={"width": 1280, "height": 820})
                page.goto(srv.url)
                page.wait_for_selector("body[data-ready='1']")
                page.click("li[data-id='3']")
                wait_images_loaded(page, "#filmstrip img, #peak")
                page.screenshot(path=str(out / "review-app.png"))
                write_report(study, Path(tmp) / "report.html")
                page = browser.new_page(viewport={"width": 1100, "height": 1100})
                page.goto((Path(tmp) / "report.html").as_uri())
                page.screenshot(path=str(out / "review-report.png"))
        finally:
            srv.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs" / "img")
