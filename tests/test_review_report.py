"""The HTML report: self-contained (opens with no network), every event's thumbnail shown, escaping,
caps on embedded images, printing; and the `report` command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from review_browser import chromium, wait_images_loaded
from review_studies import make_study

from capsule_batch.review.report import build_report, write_report
from capsule_batch.study.decisions import DecisionLog

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = "<script>document.title='pwned'<\\script><img src=x onerror=document.title='pwned'>.mp4"
COMMENT = "<script>document.title='pwned'</script> & <i>not italic</i>"


def test_report_opens_offline_and_shows_every_event(tmp_path: Path) -> None:
    study = make_study(tmp_path / "s.h5", source="/data/" + HOSTILE)
    log = DecisionLog(study, 5, 10)
    log.record(0, "confirm", None, COMMENT, "dr. <b>x</b>")
    log.record(1, "reject", 2, "", "")
    out = write_report(study, tmp_path / "r.html")
    html = out.read_text(encoding="utf-8")
    assert "<script" not in html.lower() and "&lt;script&gt;" in html
    requests: list[str] = []
    with chromium() as browser:
        ctx = browser.new_context(offline=True)
        page = ctx.new_page()
        page.on("request", lambda r: requests.append(r.url))
        page.goto(out.as_uri())
        assert page.text_content("#source") == HOSTILE
        assert "not a medical device" in page.text_content("#intended-use")
        assert page.title() == "Capsule study report – " + HOSTILE
        assert page.locator("img[src='x']").count() == 0
        assert page.locator("article.event").count() == 5
        for i in range(5):
            assert wait_images_loaded(page, f"#event-{i} .thumbs img") >= 1
        assert page.text_content("#event-0 q.comment") == COMMENT
        assert "→ Erosion" in page.text_content("#event-1 h3")
        assert page.text_content("#reviewed").startswith("2 / 5")
        assert wait_images_loaded(page, "img.timeline") == 1
        page.emulate_media(media="print")
        pdf = page.pdf(format="A4")
        assert pdf[:4] == b"%PDF" and pdf.count(b"/Type /Page\n") + pdf.count(b"/Type/Page") >= 1
        ctx.close()
    assert all(u.startswith(("file:", "data:")) for u in requests), requests


def test_thumbnail_caps_say_what_is_left_out(tmp_path: Path) -> None:
    study = make_study(tmp_path / "s.h5", per_event=4)
    full = build_report(study, per_event=4)
    assert full.count('<figure><img src="data:image/jpeg') == 16 and "more not included" not in full
    one = build_report(study, per_event=1)
    assert one.count('<figure><img src="data:image/jpeg') == 5
    assert "11 further stored thumbnails left out" in one
    tiny = build_report(study, per_event=4, image_budget=1)  # budget below one image: none embedded, all counted
    assert "data:image/jpeg" not in tiny and "16 further stored thumbnails left out" in tiny


def test_report_command(tmp_path: Path) -> None:
    study = make_study(tmp_path / "s.h5", n=100, runs=[(10, 20, 1, 0.9)])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "capsule_batch", "report", str(study), "-o", str(tmp_path / "r.html"),
                        "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert '"bytes"' in r.stdout and (tmp_path / "r.html").stat().st_size > 1000
    r = subprocess.run([sys.executable, "-m", "capsule_batch", "report", str(tmp_path / "missing.h5"), "-o",
                        str(tmp_path / "r.html")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "missing.h5: no such study file" in r.stderr


def test_report_shows_reading_estimate_and_what_was_caught(tmp_path: Path) -> None:
    """With --findings: per-finding results (late, wrong class, missed), per-class figures, events on no finding,
    and the curve as an SVG image that loads under the report's Content-Security-Policy, offline."""
    from review_studies import make_event_study

    study = make_event_study(tmp_path / "a.h5", 3600, [(100, 119, "Bleeding", 0.9), (500, 509, "Polyp", 0.6),
                                                       (2000, 2004, "Ulcer", 0.8)])
    findings = tmp_path / "a.findings.csv"
    findings.write_text("finding,class,start_frame,end_frame\nf0,Bleeding,90,130\nf1,Polyp,500,505\n"
                        "f2,Worms,3000,3010\nf4,Ulcer,505,509\n", encoding="utf-8")
    plain = build_report(study)
    assert 'id="findings"' not in plain and "35 of 3600 (1.0 %)" in plain
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "r.html"
    r = subprocess.run([sys.executable, "-m", "capsule_batch", "report", str(study), "-o", str(out), "--findings",
                        str(findings), "--reading-fps", "10"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    with chromium() as browser:
        ctx = browser.new_context(offline=True)
        page = ctx.new_page()
        page.goto(out.as_uri())
        assert page.text_content("#to-read").startswith("35 of 3600")
        # 35 frames / 10 per s + 3 events x 5 s = 18.5 s; the whole recording 3600 / 10 = 6 min
        assert page.text_content("#reading") == "0:00:18 against 0:06:00 for the whole recording"
        assert "10 frames/s" in page.text_content("#reading-assumptions")
        assert page.text_content("#caught-summary").split() == (
            "3 of 4 annotated findings caught (2 with the right class); 1 of 3 events on no annotated finding "
            "(2.0 per hour of recording).").split()
        rows = page.eval_on_selector_all("#finding-rows tbody tr", "rs => rs.map(r => r.innerText)")
        assert "+10 frames, 5.0 s" in rows[0] and "not its class" in rows[3] and "missed" in rows[2]
        assert page.get_attribute("#finding-rows tbody tr:nth-child(3)", "class") == "missed"
        figures = page.eval_on_selector_all("#class-figures tbody tr", "rs => rs.map(r => r.innerText.split('\\t'))")
        assert figures[-1][:4] == ["all classes", "4", "3", "75 % (30–95 %)"]
        assert page.text_content("#event-2 .on") == "on no annotated finding"
        assert page.text_content("#event-1 .on") == "on finding f1, f4"
        assert wait_images_loaded(page, "#curve") == 1
        ctx.close()
