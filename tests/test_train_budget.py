"""`calibrate` for a reading budget: on two small labelled recordings whose probabilities are chosen so that every
threshold, flag, event, lesion and per-study cost can be worked out by hand (comments), the search lands on the
highest common target sensitivity within a flag-rate, frames or minutes budget, reports what it buys, and says
why a budget cannot be met; then `python -m train calibrate` end to end on a synthetic recording."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from capsule_batch.evaluation.reading_time import ReadingModel
from train.budget import Budget, Evaluator, budget_from_config, fit_budget, lesion_runs, recordings_of
from train.config import ConfigError
from train.data import Sample

CLASSES = ["Normal", "Bleeding", "Polyp"]
SKIP = ("Normal",)


def _case() -> tuple[list[Sample], np.ndarray, np.ndarray]:
    """R1: 20 frames 0..19 (every frame labelled); R2: 10 frames 0, 2, .., 18 (every 2nd, span 19).
    Lesions: R1 5-7 Bleeding, R1 12-13 Polyp, R2 frames 6-8 (its 4th and 5th labelled frames) Bleeding.
    p(Bleeding) on its 5 positives 0.9, 0.8, 0.7 (R1) and 0.6, 0.5 (R2); 0.65 on R1 frame 15 (normal); 0.05 elsewhere.
    p(Polyp) on its 2 positives 0.9, 0.4; 0.5 on R2's 9th frame (normal); 0.02 elsewhere."""
    samples, labels, pb, pp = [], [], [], []
    for name, positions in (("r1", range(20)), ("r2", range(0, 20, 2))):
        for k, pos in enumerate(positions):
            lab, b, p = "Normal", 0.05, 0.02
            if name == "r1" and pos in (5, 6, 7):
                lab, b = "Bleeding", {5: 0.9, 6: 0.8, 7: 0.7}[pos]
            elif name == "r1" and pos in (12, 13):
                lab, p = "Polyp", {12: 0.9, 13: 0.4}[pos]
            elif name == "r1" and pos == 15:
                b = 0.65
            elif name == "r2" and k in (3, 4):
                lab, b = "Bleeding", {3: 0.6, 4: 0.5}[k]
            elif name == "r2" and k == 8:
                p = 0.5
            samples.append(Sample(f"{name}/{pos}.png", lab, name, "synth", f"{name}_{pos}.png", position=pos))
            labels.append(CLASSES.index(lab))
            pb.append(b)
            pp.append(p)
    probs = np.stack([1 - np.array(pb) - np.array(pp), pb, pp], axis=1)
    order = np.random.default_rng(0).permutation(len(samples))  # the scored set comes in any order
    return [samples[i] for i in order], np.array(labels)[order], probs[order]


@pytest.fixture()
def ev() -> Evaluator:
    samples, labels, probs = _case()
    return Evaluator(labels, probs, CLASSES, "Normal", recordings_of(samples), None, ReadingModel(15, 5))


def test_recordings_and_lesions(ev: Evaluator) -> None:
    assert [(r.name, len(r.rows), r.span) for r in ev.recordings] == [("r1", 20, 20), ("r2", 10, 19)]
    assert ev.study_frames == 19.5  # the mean span
    runs = lesion_runs(ev.labels, ev.recordings, 0)
    assert [(CLASSES[c], len(rows)) for c, rows in runs] == [("Bleeding", 3), ("Polyp", 2), ("Bleeding", 2)]


@pytest.mark.parametrize("budget, target, flag_rate", [
    # targets where a threshold changes: Bleeding k/5, Polyp k/2 -> 0.2 0.4 0.5 0.6 0.8 1.0; flagged frames of 30:
    # 2, 3, 4, 6 (Bleeding >= 0.7: 3 frames; Polyp >= 0.4: R1 12, 13 and R2's 0.5), 8 (Bleeding >= 0.6 adds R2's 0.6
    # and R1 frame 15), 9
    (Budget(flag_rate=0.2), 0.6, 6 / 30),
    (Budget(flag_rate=0.19), 0.5, 4 / 30),
    (Budget(flag_rate=1.0), 1.0, 9 / 30),
    # per study (19.5 frames): at 0.6, R1 reads events 5-7 and 12-13 (5 frames), R2 its frame 8 (1 x 19/10 = 1.9):
    # 6.9 of 39 frames spanned -> 3.45 per study; at 0.8 R1 adds frame 15, R2 its 0.6 frame: 9.8 / 39 x 19.5 = 4.9
    (Budget(frames=4), 0.6, 6 / 30),
    (Budget(frames=3.45), 0.6, 6 / 30),
    (Budget(frames=3.44), 0.5, 4 / 30),
    # minutes: at 0.6, 3 events in 39 frames -> 1.5 per study: (3.45 / 15 + 1.5 x 5) / 60 = 0.1288; at 0.8 R1's
    # Polyp 12-13 and its Bleeding frame 15 are one event (12-15, one stop): 4 events -> 2 per study and 5.4 frames:
    # (5.4 / 15 + 10) / 60 = 0.1727
    (Budget(minutes=0.15), 0.6, 6 / 30),
    (Budget(minutes=0.2, flag_rate=0.15), 0.5, 4 / 30),  # every limit must hold
])
def test_budget_search_by_hand(ev: Evaluator, budget: Budget, target: float, flag_rate: float) -> None:
    table, reached, cost = fit_budget(ev, budget, 1.0, SKIP)
    assert reached == pytest.approx(target) and cost.flag_rate == pytest.approx(flag_rate)
    assert set(table) == {"Bleeding", "Polyp"}


def test_what_the_thresholds_buy(ev: Evaluator) -> None:
    table, reached, cost = fit_budget(ev, Budget(frames=4), 1.0, SKIP)
    assert {c: r["threshold"] for c, r in table.items()} == pytest.approx({"Bleeding": 0.7, "Polyp": 0.4})
    assert cost.frames_to_read == pytest.approx(3.45) and cost.events == pytest.approx(1.5)
    assert cost.reading_min == pytest.approx((3.45 / 15 + 1.5 * 5) / 60)
    b = ev.buys({c: r["threshold"] for c, r in table.items()})
    assert b["per_class"]["Bleeding"]["frame_sensitivity"] == pytest.approx(3 / 5)  # R2's 0.6 and 0.5 are missed
    assert b["per_class"]["Polyp"]["frame_sensitivity"] == 1.0
    assert b["per_class"]["Polyp"]["flag_rate"] == pytest.approx(3 / 30)
    les = b["lesions"]
    assert (les["all"]["lesions"], les["all"]["caught"], les["all"]["caught_class"]) == (3, 2, 2)
    assert les["per_class"]["Bleeding"]["sensitivity"] == 0.5 and les["per_class"]["Polyp"]["sensitivity"] == 1.0
    assert les["all"]["sensitivity_ci"] == pytest.approx((0.2077, 0.9385), abs=1e-4)  # Wilson 2/3
    assert b["full_reading_min"] == pytest.approx(19.5 / 15 / 60) and b["recordings"] == 2
    # one more step (0.8) catches the third lesion at R2's 0.6 frame
    t08 = {"Bleeding": 0.6, "Polyp": 0.4}
    assert ev.buys(t08)["lesions"]["all"]["caught"] == 3
    assert ev.cost(t08).frames_to_read == pytest.approx(5.4)  # R1 12-15 is one event: frame 14 is read too
    per_class = Evaluator(ev.labels, ev.probs, CLASSES, "Normal", ev.recordings, None, ReadingModel(15, 5),
                          merge_classes=False)
    assert per_class.cost(t08).frames_to_read == pytest.approx(4.9) and per_class.cost(t08).events == 2.5


def test_cap_unmeetable_budgets_and_images_without_recordings(ev: Evaluator) -> None:
    _, reached, _ = fit_budget(ev, Budget(flag_rate=1.0), 0.5, SKIP)
    assert reached == 0.5  # the target sensitivity caps the search
    with pytest.raises(ConfigError, match=r"cannot be met on data.val: .* flag rate 0.0667"):
        fit_budget(ev, Budget(flag_rate=0.01), 1.0, SKIP)
    samples, labels, probs = _case()
    images = Evaluator(labels, probs, CLASSES, "Normal", [], None, ReadingModel())
    with pytest.raises(ConfigError, match="set calibrate.study_frames"):
        fit_budget(images, Budget(frames=100), 1.0, SKIP)
    sized = Evaluator(labels, probs, CLASSES, "Normal", [], 3000, ReadingModel())
    _, reached, cost = fit_budget(sized, Budget(frames=400), 1.0, SKIP)  # 400 / 3000 = 0.133: 4 of 30 frames
    assert reached == 0.5 and cost.frames_to_read == pytest.approx(400) and cost.events is None
    assert cost.reading_min == pytest.approx(400 / 15 / 60)
    assert sized.buys({"Bleeding": 0.7})["lesions"] is None


def test_reading_time_is_not_monotone_and_the_search_copes() -> None:
    """One 9-frame Bleeding lesion, p = 0.9 on every other frame and 0.1 between, events not merged across gaps:
    up to s = 5/9 the threshold is 0.9 and flags 5 single-frame events ((5 / 15 + 5 x 5) / 60 = 0.42 min); from 6/9
    it is 0.1 and flags one 9-frame event ((9 / 15 + 5) / 60 = 0.093 min). A 0.1 min budget fits only the looser
    thresholds, so a search that assumed the strictest were the cheapest would wrongly give up."""
    pb = np.array([0.9, 0.1] * 4 + [0.9])
    samples = [Sample(f"r/{k}.png", "Bleeding", "r", "synth", f"r_{k}.png", position=k) for k in range(9)]
    ev = Evaluator(np.ones(9, int), np.stack([1 - pb, pb], 1), ["Normal", "Bleeding"], "Normal",
                   recordings_of(samples), None, ReadingModel(15, 5), merge_gap=0)
    assert ev.cost({"Bleeding": 0.9}).reading_min == pytest.approx((5 / 15 + 25) / 60)
    _, reached, cost = fit_budget(ev, Budget(minutes=0.1), 1.0, SKIP)
    assert reached == 1.0 and cost.events == 1 and cost.reading_min == pytest.approx((9 / 15 + 5) / 60)


@pytest.mark.parametrize("section, message", [
    ({"budget_frames": -3}, "budget_frames: must be a number > 0"),
    ({"budget_flag_rate": 1.5}, r"budget_flag_rate: must be a fraction in \(0, 1\]"),
    ({"budget_minutes": "ten"}, "budget_minutes: must be a number > 0"),
])
def test_bad_budget_settings(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        budget_from_config(section)
    assert budget_from_config({"budget_minutes": 30}) == Budget(minutes=30.0)


def test_calibrate_command_with_a_budget(tiny_bundle: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                         capsys: pytest.CaptureFixture) -> None:
    """`python -m train calibrate` on a synthetic PNG recording with per-frame labels, for a frames budget."""
    import shutil

    from capsule_batch.model.bundle import ModelBundle
    from capsule_batch.sources.synthesize import synthesize
    from train.__main__ import main

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, bundle)
    rec = synthesize(tmp_path / "val", 160, size=56, seed=3, findings_per_1000=40.0, codec="png")
    spec = (f"[{{kind: recording, frames: '{rec.path}', frame_pattern: 'frame_{{frame}}.png', "
            f"labels: '{rec.labels_csv}'}}]")
    # per-class events: the random model's argmax flags of many classes interleave, and merged they would be one
    # event over the whole recording whatever the thresholds, so no budget could bind
    common = ["run.workers=0", "train.eval_batch_size=64", f"data.val={spec}", f"calibrate.bundle={bundle}",
              "calibrate.merge_classes=false"]
    caplog.set_level(logging.INFO)
    # the random model cannot tell findings apart, so find a budget that binds: what the strictest thresholds
    # (each class's highest positive, target 0.01) cost, and what every positive (target 1) costs
    costs = {}
    for target in ("0.01", "1.0"):
        assert main(["calibrate", *common, f"calibrate.target_sensitivity={target}"]) == 0
        plain = json.loads((tmp_path / "calibration.json").read_text())
        assert plain["budget"] is None and plain["common_target_sensitivity"] == float(target)
        costs[target] = plain["buys"]["cost"]["frames_to_read"]
    assert costs["0.01"] < costs["1.0"] <= 160
    budget = round((costs["0.01"] + costs["1.0"]) / 2, 1)
    assert main(["calibrate", *common, f"calibrate.budget_frames={budget}", "calibrate.target_sensitivity=1.0"]) == 0
    report = json.loads((tmp_path / "calibration.json").read_text())
    assert report["budget"] == {"frames": budget, "minutes": None, "flag_rate": None}
    buys = report["buys"]
    assert buys["recordings"] == 1 and buys["cost"]["study_frames"] == 160
    assert costs["0.01"] <= buys["cost"]["frames_to_read"] <= budget
    assert 0.01 <= report["common_target_sensitivity"] < 1.0
    assert buys["lesions"]["all"]["lesions"] >= 3
    saved = ModelBundle.load(bundle)
    assert saved.thresholds == {c: row["threshold"] for c, row in report["classes"].items()}
    assert saved.provenance["calibration"]["budget"]["frames"] == budget
    assert "frames to read" in caplog.text and "lesions in 1 validation recordings" in caplog.text
    capsys.readouterr()
    assert main(["calibrate", *common, "calibrate.budget_flag_rate=0.0001"]) == 1
    assert "cannot be met on data.val" in capsys.readouterr().err


def test_thresholds_are_no_stricter_than_argmax_when_the_budget_allows() -> None:
    """One recording, one Bleeding finding at p = 0.99, 0.995, 0.99 (frames 5-7), a normal frame at 0.6 (frame 15),
    0.05 elsewhere. The target sensitivity 1.0 gives a threshold of 0.99: fitted to this one finding, it would miss
    the next one at 0.98 that argmax flags. Lowered to 0.5 it also flags frame 15: 4 of 20 frames. A budget of half
    the frames takes the lowered threshold; a budget of 3 frames in 20 keeps 0.99."""
    pb = np.full(20, 0.05)
    pb[[5, 6, 7]] = [0.99, 0.995, 0.99]
    pb[15] = 0.6
    labels = np.zeros(20, int)
    labels[[5, 6, 7]] = 1
    samples = [Sample(f"r/{k}.png", "Bleeding" if labels[k] else "Normal", "r", "synth", f"r_{k}.png", position=k)
               for k in range(20)]
    ev = Evaluator(labels, np.stack([1 - pb, pb], 1), ["Normal", "Bleeding"], "Normal", recordings_of(samples),
                   None, ReadingModel(15, 5))
    table, reached, cost = fit_budget(ev, Budget(flag_rate=0.5), 1.0, SKIP)
    assert reached == 1.0 and table["Bleeding"]["threshold"] == 0.5 and cost.flag_rate == pytest.approx(4 / 20)
    assert table["Bleeding"]["flag_rate"] == pytest.approx(4 / 20) and table["Bleeding"]["sensitivity"] == 1.0
    table, reached, cost = fit_budget(ev, Budget(flag_rate=0.15), 1.0, SKIP)
    assert table["Bleeding"]["threshold"] == pytest.approx(0.99) and cost.flag_rate == pytest.approx(3 / 20)
