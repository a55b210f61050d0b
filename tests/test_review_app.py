"""The review app end to end in headless Chromium: keyboard review, decisions saved into the study file,
escaping of hostile names and comments; plus the server's refusals (token, Host, paths, writes)."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from pathlib import Path

import h5py
import numpy as np
import pytest
from review_browser import chromium, wait_images_loaded
from review_studies import make_study

from capsule_batch.errors import StudyError
from capsule_batch.review.app import ReviewApp, Server
from capsule_batch.study.decisions import journal_path, read_decisions

HOSTILE = "<script>window.__pwned=1<\\script><img src=x onerror=window.__pwned=2>.mp4"
COMMENT = "<script>window.__pwned=3</script> bleeding & <b>ulcer</b>?"


def test_keyboard_review_survives_reload_and_lands_in_the_hdf5(tmp_path: Path) -> None:
    study = make_study(tmp_path / "s.h5", source="/data/" + HOSTILE)
    srv = Server(ReviewApp(study, fold_delay=0.2)).start()
    try:
        with chromium() as browser:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url)
            page.wait_for_selector("body[data-ready='1']")
            assert page.text_content("#progress").startswith("0 / 5 reviewed")
            box = page.locator("#timeline").bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + 20)
            page.mouse.wheel(0, -300)  # zoom in around the middle of the recording
            page.wait_for_selector("#timeline-range:has-text('frames ')")
            page.click("#timeline-reset")
            page.wait_for_selector("#timeline-range:has-text('whole recording')")
            page.mouse.click(box["x"] + box["width"] * 123 / 400, box["y"] + 20)  # event #1 spans frames 120-126
            page.wait_for_selector("#ev-title:has-text('Event #1')")
            page.keyboard.press("k")  # previous in time order
            page.wait_for_selector("#ev-title:has-text('Event #0')")
            page.keyboard.press("ArrowDown")
            page.wait_for_selector("#ev-title:has-text('Event #1')")
            page.keyboard.press("k")
            page.wait_for_selector("#ev-title:has-text('Event #0')")
            page.keyboard.press("c")  # confirm #0, advances to #1
            page.wait_for_selector("#ev-title:has-text('Event #1')")
            page.keyboard.press("9")  # reassign #1 to class 9 (Ulcer, index 8)
            page.wait_for_selector("#current-decision:has-text('Ulcer')")
            page.keyboard.press("e")
            page.keyboard.type(COMMENT)
            page.keyboard.press("Control+Enter")
            page.wait_for_selector("#current-decision q")
            page.keyboard.press("Escape")
            page.keyboard.press("x")  # reject #1
            page.wait_for_selector("#ev-title:has-text('Event #2')")
            page.wait_for_selector("#progress:has-text('2 / 5 reviewed')")

            page.reload()
            page.wait_for_selector("body[data-ready='1']")
            assert page.text_content("#progress").startswith("2 / 5 reviewed (1 confirmed, 1 rejected)")
            assert page.get_attribute("li[data-id='0']", "class").split() == ["event-item", "confirm"]
            assert page.get_attribute("li[data-id='1']", "class").split() == ["event-item", "reject"]
            page.click("li[data-id='1']")
            page.wait_for_selector("#ev-title:has-text('Event #1')")
            assert page.text_content("#current-decision q") == COMMENT
            assert page.input_value("#cls") == "8"
            # hostile recording name and comment are text, never markup
            assert page.text_content("#source") == HOSTILE
            assert page.title() == "Review – " + HOSTILE
            assert page.evaluate("window.__pwned") is None
            assert page.locator("img[src='x']").count() == 0
            # images load: the peak frame and every filmstrip thumbnail
            wait_images_loaded(page, "#filmstrip img, #peak")
            assert errors == []
    finally:
        srv.stop()  # folds the journal into the study file
    with h5py.File(study, "r") as f:
        g = f["review"]
        assert g.attrs["schema"] == "capsule-batch-review/1"
        rows = {int(r["event"]): r for r in g["decisions"][:]}
    assert sorted(rows) == [0, 1]
    assert int(rows[0]["verdict"]) == 1 and int(rows[0]["class"]) == -1
    assert int(rows[1]["verdict"]) == 2 and int(rows[1]["class"]) == 8
    assert rows[1]["comment"].decode() == COMMENT
    assert not journal_path(study).exists()
    assert {i: d.verdict for i, d in read_decisions(study).items()} == {0: "confirm", 1: "reject"}
    # a new app on the same file shows them again
    with Server(ReviewApp(study)) as srv2, chromium() as browser:
        page = browser.new_page()
        page.goto(srv2.url)
        page.wait_for_selector("body[data-ready='1']")
        assert page.text_content("#progress").startswith("2 / 5 reviewed (1 confirmed, 1 rejected)")
        page.select_option("#show", "unreviewed")
        page.wait_for_selector("#page-info:has-text('3 events')")
        assert [int(x) for x in page.eval_on_selector_all("#events li", "ls => ls.map(l => l.dataset.id)")] == [2, 3, 4]


def _get(srv: Server, path: str, headers: dict | None = None, method: str = "GET", body: bytes | None = None
         ) -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    return r.status, r.read()


@pytest.fixture
def server(tmp_path: Path):
    srv = Server(ReviewApp(make_study(tmp_path / "s.h5", n=200, runs=[(50, 60, 1, 0.9)]), fold_delay=0.1))
    srv.start()
    yield srv
    srv.stop()


def test_refusals(server: Server) -> None:
    tok = server.review.token
    assert server.host == "127.0.0.1"
    assert _get(server, "/")[0] == 403
    assert _get(server, "/api/events")[0] == 403
    assert _get(server, "/static/app.js")[0] == 403
    assert _get(server, "/?token=wrong")[0] == 403
    assert _get(server, f"/?token={tok}")[0] == 200
    assert _get(server, "/api/events", {"X-Token": tok})[0] == 200
    # DNS rebinding: a foreign Host header is refused even with the token
    assert _get(server, f"/?token={tok}", {"Host": "evil.example:80"})[0] == 403
    # writes need the header, not only the cookie or query token
    body = json.dumps({"verdict": "confirm"}).encode()
    assert _get(server, f"/api/events/0/decision?token={tok}", {"Content-Type": "application/json"}, "POST",
                body)[0] == 403
    assert _get(server, "/api/events/0/decision", {"X-Token": tok, "Content-Type": "application/json"}, "POST",
                body)[0] == 200
    # bad decisions are refused with a message
    status, text = _get(server, "/api/events/99/decision", {"X-Token": tok, "Content-Type": "application/json"},
                        "POST", body)
    assert status == 400 and b"no event 99" in text
    # no path leaves the static folder; frames are numbers only
    for p in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/%2e%2e%2f%2e%2e%2fstore.py",
              "/thumb/../../etc/passwd", "/frame/..%2f..%2fetc%2fpasswd", "/static//etc/passwd"):
        status, data = _get(server, p, {"X-Token": tok})
        assert status in (404, 400, 308), p
        assert b"import" not in data and b"root:" not in data, p
    assert _get(server, "/thumb/55", {"X-Token": tok})[1][:2] == b"\xff\xd8"


def test_one_app_per_study(server: Server) -> None:
    with pytest.raises(StudyError, match="already open in another review app"):
        ReviewApp(server.review.view.path)


def test_listens_on_loopback_only(server: Server) -> None:
    """Only 127.0.0.1 answers: the machine's other addresses refuse the connection."""
    addrs = set()
    try:
        addrs |= {ai[4][0] for ai in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    except socket.gaierror:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            addrs.add(s.getsockname()[0])
        except OSError:
            pass
    others = sorted(a for a in addrs if not a.startswith("127."))
    if not others:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    for a in others:
        with pytest.raises(OSError):
            socket.create_connection((a, server.port), timeout=2).close()


def test_timeline_and_pages(server: Server) -> None:
    tok = {"X-Token": server.review.token}
    tl = json.loads(_get(server, "/api/timeline", tok)[1])
    assert len(tl["probs"]) == 200 and np.array(tl["ticks"]).max() == 1
    assert [i for i, t in enumerate(tl["ticks"]) if t >= 0] == list(range(50, 61))
    zoom = json.loads(_get(server, "/api/timeline?start=40&stop=70&bins=15", tok)[1])
    assert (zoom["start"], zoom["stop"], zoom["bin_frames"]) == (40, 70, 2.0)
    assert zoom["ticks"] == [-1] * 5 + [1] * 6 + [-1] * 4  # frames 50..61 flagged -> bins 5..10
    q = urllib.parse.urlencode({"frame": 10})
    assert json.loads(_get(server, f"/api/locate?{q}", tok)[1]) == {"id": 0, "pos": 0}


def test_frames_that_failed_to_decode(tmp_path: Path) -> None:
    """Decode failures (NaN probabilities and timestamps) never reach the page as NaN; they are marked."""
    from capsule_batch.review.report import build_report

    study = make_study(tmp_path / "s.h5", n=200, runs=[(50, 60, 1, 0.9)], failed=(55, 120, 121))

    def strict(text: bytes) -> object:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))

    with Server(ReviewApp(study)) as srv:
        tok = {"X-Token": srv.review.token}
        tl = strict(_get(srv, "/api/timeline", tok)[1])
        assert [i for i, f in enumerate(tl["failed"]) if f] == [55, 120, 121]
        assert strict(_get(srv, "/api/events/0", tok)[1])["context"]["probs"][55 - 20] == [0.0] * 10
    html = build_report(study)
    assert "3 frames could not be decoded" in html


def test_findings_in_the_app(tmp_path: Path) -> None:
    """`review --findings`: the reading estimate in the header, what was caught in a list and on the timeline,
    events on no finding marked; a caught finding opens its event, a missed one zooms the timeline onto it."""
    from review_studies import make_event_study

    study = make_event_study(tmp_path / "a.h5", 3600, [(100, 119, "Bleeding", 0.9), (500, 509, "Polyp", 0.6),
                                                       (2000, 2004, "Ulcer", 0.8)])
    findings = tmp_path / "a.findings.csv"
    findings.write_text("finding,class,start_frame,end_frame\nf0,Bleeding,90,130\nf1,Polyp,500,505\n"
                        "f2,<b>Worms</b>,3000,3010\n", encoding="utf-8")
    with Server(ReviewApp(study, findings=findings)) as srv:
        s = json.loads(_get(srv, "/api/summary", {"X-Token": srv.review.token})[1])
        assert s["reading"]["frames_to_read"] == 35 and s["findings"]["caught"] == 2
        assert s["findings"]["on"] == [["f0"], ["f1"], []]
        with chromium() as browser:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.url)
            page.wait_for_selector("body[data-ready='1']")
            assert page.text_content("#reading-facts").split()[:4] == ["35", "frames", "to", "read"]
            assert page.text_content("#findings-summary").startswith("a.findings.csv: 2 of 3 findings caught")
            assert "1 of 3 events on no annotated finding" in page.text_content("#findings-summary")
            assert "no-finding" in page.get_attribute("li[data-id='2']", "class").split()
            page.click("#findings-summary")
            assert page.text_content("li[data-finding='f2']") == "f2 · <b>Worms</b> · 3000–3010 · missed"
            page.click("li[data-finding='f0']")
            page.wait_for_selector("#ev-title:has-text('Event #0')")
            assert page.text_content("#ev-title").endswith("· on finding f0")
            page.click("li[data-finding='f2']")
            page.wait_for_selector("#timeline-range:has-text('frames 2950–3060')")
            page.click("li[data-id='2']")
            page.wait_for_selector("#ev-title:has-text('on no annotated finding')")
            assert errors == []
