"""Triage on hand-made probability sequences: flags, events, merge gap, thresholds, min-run, smoothing, top-K."""

from __future__ import annotations

import numpy as np
import pytest

from capsule_batch.study.triage import Event, TriageConfig, classify, compute_events, thumbnail_frames

NAMES = ("A", "B", "Normal")
A, B, N = 0, 1, 2


def seq(labels: str, strength: float = 0.8) -> np.ndarray:
    """One row per character: 'a'/'b' put `strength` on that class, '.' on Normal, 'x' is a failed (NaN) frame."""
    rows = []
    for ch in labels:
        if ch == "x":
            rows.append([np.nan] * 3)
            continue
        r = np.full(3, (1 - strength) / 2)
        r[{"a": A, "b": B, ".": N}[ch]] = strength
        rows.append(r)
    return np.asarray(rows, np.float32)


def events_of(p: np.ndarray, cfg: TriageConfig, block: int = 1000) -> tuple[list[Event], int]:
    idx = np.arange(len(p))
    return compute_events(((idx[i:i + block], p[i:i + block]) for i in range(0, len(p), block)), cfg)


def spans(evs: list[Event]) -> list[tuple[int, int, str]]:
    return [(e.start, e.end, NAMES[e.cls]) for e in evs]


def test_events_from_hand_made_sequence() -> None:
    #        0         1         2
    #        0123456789012345678901234
    p = seq("..aaa..a.....bbb.b...a.x.")
    cfg = TriageConfig(NAMES, "Normal", merge_gap=2)
    evs, n = events_of(p, cfg)
    # frames 2-4 and 7 are 2 apart (gap of 2 unflagged frames): one event; 13-15 and 17 merge; 21 alone
    assert spans(evs) == [(2, 7, "A"), (13, 17, "B"), (21, 21, "A")]
    assert [e.n_flagged for e in evs] == [4, 4, 1]
    assert n == 9
    evs1, _ = events_of(p, TriageConfig(NAMES, "Normal", merge_gap=1))
    assert spans(evs1) == [(2, 4, "A"), (7, 7, "A"), (13, 17, "B"), (21, 21, "A")]
    evs0, _ = events_of(p, TriageConfig(NAMES, "Normal", merge_gap=0))
    assert spans(evs0) == [(2, 4, "A"), (7, 7, "A"), (13, 15, "B"), (17, 17, "B"), (21, 21, "A")]


def test_peak_is_highest_score_and_failed_frames_never_flag() -> None:
    p = seq("aaaa")
    p[2] = [0.95, 0.04, 0.01]
    cfg = TriageConfig(NAMES, "Normal")
    (ev,), _ = events_of(p, cfg)
    assert ev.peak_frame == 2 and ev.peak_score == pytest.approx(0.99)
    score, flagged, _ = classify(seq("xa"), cfg)
    assert flagged.tolist() == [False, True]


def test_neighbouring_classes_make_one_stop_unless_asked_per_class() -> None:
    """One finding seen as several classes is one event (one stop for the reader), led by the strongest peak and
    keeping every class it saw; `merge_classes=False` keeps one event per class."""
    p = seq("aabb...b......a")
    p[3] = [0.01, 0.98, 0.01]  # B's peak is the strongest
    evs, n = events_of(p, TriageConfig(NAMES, "Normal", merge_gap=3))
    assert spans(evs) == [(0, 7, "B"), (14, 14, "A")] and n == 6
    assert evs[0].class_set == [B, A] and evs[0].peak_frame == 3 and evs[0].n_flagged == 5
    assert evs[1].class_set == [A] and evs[1].classes == 0
    per_class, _ = events_of(p, TriageConfig(NAMES, "Normal", merge_gap=3, merge_classes=False))
    assert spans(per_class) == [(0, 1, "A"), (2, 7, "B"), (14, 14, "A")]
    assert spans(events_of(seq("aa....bb"), TriageConfig(NAMES, "Normal", merge_gap=3))[0]) == [(0, 1, "A"),
                                                                                              (6, 7, "B")]
    top, _ = events_of(p, TriageConfig(NAMES, "Normal", merge_gap=3, top_k=1))  # top-K counts stops
    assert spans(top) == [(0, 7, "B")]
    old = TriageConfig.from_json('{"class_names": ["A", "B", "Normal"], "normal_class": "Normal", "thresholds": null,'
                                 ' "merge_gap": 2, "min_run": 1, "smooth": 1, "top_k": null}')
    assert old.merge_classes is False  # a study made before the setting had one event per class


def test_thresholds_from_bundle_replace_argmax() -> None:
    p = np.array([[0.3, 0.1, 0.6],   # A over its 0.25 threshold although Normal wins the argmax
                  [0.2, 0.5, 0.3],   # B below its 0.6 threshold although it wins the argmax
                  [0.1, 0.7, 0.2]], np.float32)
    cfg = TriageConfig(NAMES, "Normal", thresholds={"A": 0.25, "B": 0.6})
    score, flagged, cls = classify(p, cfg)
    assert flagged.tolist() == [True, False, True]
    assert cls[[0, 2]].tolist() == [A, B]
    assert score == pytest.approx([0.4, 0.7, 0.8])
    # a threshold on the normal class is a threshold on the score 1 - p(normal)
    _, flagged, cls = classify(p, TriageConfig(NAMES, "Normal", thresholds={"Normal": 0.75}))
    assert flagged.tolist() == [False, False, True] and cls[2] == B


def test_a_class_left_without_a_threshold_flags_on_argmax() -> None:
    """Calibration leaves a class without validation positives without a threshold: it keeps the uncalibrated
    rule (argmax), never silently unflaggable."""
    p = np.array([[0.3, 0.1, 0.6],   # Normal wins: not flagged (A's 0.35 threshold not reached)
                  [0.2, 0.5, 0.3],   # B wins the argmax: flagged as B although B has no threshold
                  [0.4, 0.35, 0.25]], np.float32)  # A over its threshold
    _, flagged, cls = classify(p, TriageConfig(NAMES, "Normal", thresholds={"A": 0.35}))
    assert flagged.tolist() == [False, True, True]
    assert cls[[1, 2]].tolist() == [B, A]


def test_min_run_and_top_k() -> None:
    p = seq("a.....bbb.....aaaaa")
    p[16] = [0.97, 0.02, 0.01]
    assert spans(events_of(p, TriageConfig(NAMES, "Normal", min_run=3))[0]) == [(6, 8, "B"), (14, 18, "A")]
    top = events_of(p, TriageConfig(NAMES, "Normal", top_k=1))[0]
    assert spans(top) == [(14, 18, "A")]


def test_smoothing_removes_single_frame_flicker_across_blocks() -> None:
    p = seq(".....a.....aaaa....", strength=0.6)
    cfg = TriageConfig(NAMES, "Normal", smooth=3)
    for block in (1, 2, 5, 100):
        # the lone frame 5 averages below Normal; the run 11-14 keeps its edges (2 of 3 frames are A)
        assert spans(events_of(p, cfg, block)[0]) == [(11, 14, "A")], block
    assert spans(events_of(p, TriageConfig(NAMES, "Normal"))[0]) == [(5, 5, "A"), (11, 14, "A")]


def test_blocks_do_not_change_events() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet([0.3, 0.3, 2.0], size=500).astype(np.float32)
    cfg = TriageConfig(NAMES, "Normal", merge_gap=3)
    whole = events_of(p, cfg, 1000)
    for block in (1, 7, 64):
        assert events_of(p, cfg, block) == whole


def test_settings_round_trip_and_thumbnail_choice() -> None:
    cfg = TriageConfig(NAMES, "Normal", thresholds={"A": 0.5}, merge_gap=4, top_k=3)
    assert TriageConfig.from_json(cfg.to_json()) == cfg
    evs = [Event(0, 10, A, 4, 0.9, 11), Event(20, 20, B, 20, 0.5, 1)]
    th = thumbnail_frames(evs, per_event=3, max_total=10)
    assert th == {4: [0], 3: [0], 7: [0], 20: [1]}  # peak, then samples spread over the event
    assert list(thumbnail_frames(evs, per_event=3, max_total=1)) == [4]
