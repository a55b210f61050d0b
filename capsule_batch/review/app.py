"""The local review app (Flask): one study, served on 127.0.0.1 to whoever holds the URL's token.

Security model: the server binds 127.0.0.1 only; every request must carry the random token (query
`token=`, header `X-Token`, or the cookie set when the page is first opened with it) or gets 403; the
Host header must name the loopback address (no DNS rebinding); writes need the `X-Token` header (a
cross-site form cannot set it). No route takes a path: frames and thumbnails are addressed by frame
number, static files through Flask's safe join. Everything shown is escaped: Jinja autoescape in the
page, JSON through `tojson` into a non-executed `<script type="application/json">`, and the page's
script builds the DOM with `textContent` only. A Content-Security-Policy allows scripts from the app only.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import threading
from pathlib import Path
from typing import Any

import numpy as np

from capsule_batch.errors import CapsuleError, MissingPackageError, StudyError
from capsule_batch.evaluation.reading_time import ReadingModel, study_estimate
from capsule_batch.review.report import reading_context
from capsule_batch.review.view import SORTS, StudyView
from capsule_batch.study.decisions import VERDICTS, BackgroundFolder, DecisionLog

_logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
PAGE_SIZE = 100
MAX_PAGE = 500
LOOPBACK = ("127.0.0.1", "localhost")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _flask() -> Any:
    try:
        import flask
    except ImportError as e:
        raise MissingPackageError("flask", "review", "the review app") from e
    return flask


class ReviewApp:
    """The study, its decisions, the optional recording, and the Flask app that serves them."""

    def __init__(self, study: str | os.PathLike, video: str | os.PathLike | None = None, token: str | None = None,
                 reviewer: str = "", fold_delay: float = 1.0, findings: str | os.PathLike | None = None,
                 reading: ReadingModel | None = None):
        self._lock_fd = _lock_study(Path(study))
        try:
            self._open(study, video, token, reviewer, fold_delay, findings, reading)
        except BaseException:
            _unlock_study(Path(study), self._lock_fd)
            raise

    def _open(self, study: str | os.PathLike, video: str | os.PathLike | None, token: str | None, reviewer: str,
              fold_delay: float, findings: str | os.PathLike | None, reading: ReadingModel | None) -> None:
        self.found = _findings_summary(study, findings, reading) if findings is not None else None
        self.view = StudyView(study)
        self.reading = reading_context(study_estimate(self.view.reader, reading))
        self.view.timeline()  # the whole-recording timeline, computed before the first page is served
        self.log = DecisionLog(study, len(self.view.events), len(self.view.class_names))
        self.folder = BackgroundFolder(self.log, fold_delay)
        self.token = token or secrets.token_urlsafe(24)
        self.reviewer = reviewer
        self.video = None
        if video is not None:
            from capsule_batch.review.frames import open_recording

            self.video = open_recording(video, self.view.attrs, self.view.reader.files())
        self.flask = self._build()

    def close(self) -> None:
        try:
            self.folder.close()
            if self.video is not None:
                self.video.close()
            self.view.close()
        finally:
            _unlock_study(self.view.path, self._lock_fd)

    def _authorised(self, request: Any) -> bool:
        host = (request.host or "").rsplit(":", 1)[0].strip("[]")
        if host not in LOOPBACK:
            return False
        given = request.args.get("token") or request.headers.get("X-Token") or request.cookies.get(self.cookie_name)
        return bool(given) and hmac.compare_digest(str(given), self.token)

    @property
    def cookie_name(self) -> str:
        return f"capsule_review_{hmac.new(self.token.encode(), b'cookie', 'sha256').hexdigest()[:8]}"

    def _build(self) -> Any:
        flask = _flask()
        app = flask.Flask(__name__, static_folder=str(HERE / "static"), template_folder=str(HERE / "templates"))
        app.json.sort_keys = False
        view, log = self.view, self.log

        @app.before_request
        def check_token() -> Any:
            if not self._authorised(flask.request):
                return flask.Response("forbidden: open the URL printed by `capsule-batch review`\n", 403,
                                      mimetype="text/plain")
            if flask.request.method not in ("GET", "HEAD") and not hmac.compare_digest(
                    flask.request.headers.get("X-Token", ""), self.token):
                return flask.Response("forbidden: writes need the X-Token header\n", 403, mimetype="text/plain")
            return None

        @app.after_request
        def headers(resp: Any) -> Any:
            resp.headers["Content-Security-Policy"] = CSP
            resp.headers["X-Content-Type-Options"] = "nosniff"
            resp.headers["Referrer-Policy"] = "no-referrer"
            resp.headers["X-Frame-Options"] = "DENY"
            if not flask.request.path.startswith(("/static/", "/thumb/")):
                resp.headers["Cache-Control"] = "no-store"
            return resp

        @app.errorhandler(CapsuleError)
        def user_error(e: CapsuleError) -> Any:
            return flask.jsonify(error=str(e)), 400

        @app.errorhandler(OSError)
        def io_error(e: OSError) -> Any:  # e.g. the journal cannot be written: the page says "not saved"
            _logger.error("%s", e)
            return flask.jsonify(error=f"{e.filename or view.path.parent}: {e.strerror or e}"), 500

        @app.get("/")
        def index() -> Any:
            config = {"token": self.token, "study": view.path.name, "source": view.source_name,
                      "frames": view.n_frames, "fps": view.fps, "classes": view.class_names,
                      "normal": view.normal_index, "events": len(view.events), "video": self.video is not None,
                      "reviewer": self.reviewer, "sorts": list(SORTS), "verdicts": list(VERDICTS[1:]),
                      "page_size": PAGE_SIZE, "findings": self.found is not None}
            resp = flask.make_response(flask.render_template("app.html", config=config, view=view,
                                                             reading=self.reading))
            if flask.request.args.get("token"):
                resp.set_cookie(self.cookie_name, self.token, httponly=True, samesite="Strict")
            return resp

        @app.get("/api/timeline")
        def timeline() -> Any:
            a = flask.request.args
            start = a.get("start", 0, type=int)
            stop = a.get("stop", view.n_frames, type=int)
            bins = min(max(a.get("bins", 1200, type=int), 1), 4000)
            return flask.jsonify(view.timeline(start, stop, bins).to_json())

        def ordered(a: Any, decided: dict) -> list[int]:
            """Event rows in the order and filter the list shows (sort, desc, show)."""
            sort = a.get("sort", "time")
            if sort not in SORTS:
                flask.abort(400)
            order = view.order(sort, a.get("desc", "0") == "1").tolist()
            show = a.get("show", "all")
            if show == "unreviewed":
                return [i for i in order if i not in decided or not decided[i].verdict]
            if show in VERDICTS[1:]:
                return [i for i in order if i in decided and decided[i].verdict == show]
            return order

        @app.get("/api/events")
        def events() -> Any:
            a = flask.request.args
            decided = log.decisions
            order = ordered(a, decided)
            offset = max(0, a.get("offset", 0, type=int))
            limit = min(max(1, a.get("limit", PAGE_SIZE, type=int)), MAX_PAGE)
            items = []
            for i in order[offset:offset + limit]:
                d = decided.get(i)
                items.append({**view.event_json(i), "decision": d.to_json() if d else None, "on": self.on(i)})
            return flask.jsonify(total=len(order), offset=offset, items=items, progress=self.progress(decided))

        @app.get("/api/locate")
        def locate() -> Any:
            """The event at (or nearest to) `frame`, and its position in the listed order: timeline clicks."""
            a = flask.request.args
            if not len(view.events):
                return flask.jsonify(id=None, pos=None)
            if "id" in a:
                i = a.get("id", 0, type=int)
            else:
                f = a.get("frame", 0, type=int)
                dist = np.maximum(view.ev_start - f, 0) + np.maximum(f - view.ev_end, 0)
                i = int(np.lexsort((-view.ev_score, dist))[0])
            order = ordered(a, log.decisions)
            return flask.jsonify(id=i, pos=order.index(i) if i in order else None)

        @app.get("/api/events/<int:i>")
        def event(i: int) -> Any:
            if not 0 <= i < len(view.events):
                flask.abort(404)
            d = log.decisions.get(i)
            return flask.jsonify({**view.event_detail(i), "decision": d.to_json() if d else None, "on": self.on(i)})

        @app.get("/api/summary")
        def summary() -> Any:
            """The reading estimate and, when the app was given findings, what was caught."""
            return flask.jsonify(reading=self.reading, findings=self.found)

        @app.post("/api/events/<int:i>/decision")
        def decide(i: int) -> Any:
            body = flask.request.get_json(silent=True)
            if not isinstance(body, dict):
                flask.abort(400)
            cls = body.get("cls")
            d = log.record(i, str(body.get("verdict", "")), None if cls in (None, "") else int(cls),
                           str(body.get("comment", "")), str(body.get("reviewer", self.reviewer)))
            self.folder.poke()
            return flask.jsonify(decision=d.to_json(), progress=self.progress(log.decisions))

        @app.get("/thumb/<int:frame>")
        def thumb(frame: int) -> Any:
            jpeg = view.thumbs.get(frame)
            if jpeg is None:
                flask.abort(404)
            return flask.Response(jpeg, mimetype="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

        @app.get("/frame/<int:frame>")
        def frame(frame: int) -> Any:
            if self.video is None:
                return thumb(frame)
            if not view.decoded(frame):  # out of range, or it failed to decode during the run
                flask.abort(404)
            try:
                jpeg = self.video.jpeg(frame)
            except CapsuleError as e:  # e.g. a frame file that went missing or unreadable since the run
                _logger.warning("%s", e)
                flask.abort(404)
            return flask.Response(jpeg, mimetype="image/jpeg",
                                  headers={"Cache-Control": "private, max-age=3600"})

        return app

    def on(self, i: int) -> list[str] | None:
        """Findings event `i` overlaps ([] : a false alert); None when the app has no findings."""
        return None if self.found is None else self.found["on"][i]

    def progress(self, decided: dict) -> dict[str, int]:
        n = sum(1 for d in decided.values() if d.verdict)
        return {"reviewed": n, "total": len(self.view.events),
                "confirmed": sum(1 for d in decided.values() if d.verdict == "confirm"),
                "rejected": sum(1 for d in decided.values() if d.verdict == "reject")}


def _findings_summary(study: str | os.PathLike, findings: str | os.PathLike, reading: ReadingModel | None
                      ) -> dict[str, Any]:
    """What the page shows of a comparison with `findings` (capsule_batch.evaluation.groundtruth): findings one by one
    with the events that caught them, the events' findings, and the pooled figures of this one study."""
    from capsule_batch.evaluation.burden import summarise
    from capsule_batch.evaluation.groundtruth import compare

    cmp = compare(study, findings, reading)
    s = summarise([cmp], reading).overall
    return {"file": Path(findings).name, "findings": cmp.findings, "caught": cmp.caught,
            "caught_class": cmp.caught_class, "events": cmp.events, "false_events": cmp.false_events,
            "false_alerts_per_hour": cmp.false_alerts_per_hour, "sensitivity_ci": s.sensitivity_ci,
            "rows": [{"finding": r.finding, "cls": r.cls, "start": r.start, "end": r.end, "caught": r.caught,
                      "class_matched": r.class_matched, "events": r.events, "delay_frames": r.delay_frames,
                      "delay_s": r.delay_s} for r in cmp.rows],
            "on": [e.findings for e in cmp.event_rows]}


def _lock_study(study: Path) -> int:
    """One review app per study at a time: two would interleave their journals and overwrite each other's folds.

    The same lock tells `run --overwrite` that the study is open here (capsule_batch.study.locks)."""
    from capsule_batch.study.locks import REVIEW_LOCK_SUFFIX, acquire, lock_path

    lock = lock_path(study, REVIEW_LOCK_SUFFIX)
    try:
        return acquire(lock, f"{study}: already open in another review app")
    except StudyError as e:
        if "cannot create" in str(e):
            raise StudyError(f"{study.parent}: cannot save decisions here ({e}); copy the study to a writable "
                             "folder") from e
        raise


def _unlock_study(study: Path, fd: int) -> None:
    from capsule_batch.study.locks import REVIEW_LOCK_SUFFIX, lock_path, release

    release(lock_path(study, REVIEW_LOCK_SUFFIX), fd)


class Server:
    """werkzeug's threaded server on 127.0.0.1 in a background thread (port 0 picks a free port)."""

    def __init__(self, review: ReviewApp, port: int = 0):
        from werkzeug.serving import make_server

        self.review = review
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no per-request lines on the terminal
        self._srv = make_server("127.0.0.1", port, review.flask, threaded=True)
        self.host, self.port = self._srv.server_address[:2]
        self._thread = threading.Thread(target=self._srv.serve_forever, name="review-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/?token={self.review.token}"

    def start(self) -> Server:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._srv.shutdown()
        self._thread.join(timeout=10)
        self._srv.server_close()
        self.review.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
