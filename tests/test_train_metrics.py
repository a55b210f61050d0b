"""The challenge metrics against an independent sklearn computation of the official definitions."""

from __future__ import annotations

import numpy as np
import pytest

from capsule_batch.model.classes import CE24_CLASSES
from train.metrics import calibrate_thresholds, compute_metrics

sk = pytest.importorskip("sklearn.metrics")

CLASSES = list(CE24_CLASSES)


def _predictions(n: int, seed: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASSES), n)
    logits = rng.normal(0, 1, (n, len(CLASSES)))
    logits[np.arange(n), y] += rng.uniform(0, 3, n)  # informative but imperfect
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    if ties:
        p = np.round(p, 2)  # many tied scores: exercises tie handling in AUC and AP
    return y, p


@pytest.mark.parametrize("ties", [False, True])
def test_metrics_equal_sklearn(ties: bool) -> None:
    y, p = _predictions(537, 3, ties)
    m = compute_metrics(y, p, CLASSES)
    pred = p.argmax(1)
    onehot = np.eye(len(CLASSES))[y]
    assert m["count"] == len(y)
    aucs = [sk.roc_auc_score(onehot[:, c], p[:, c]) for c in range(len(CLASSES))]
    assert m["mean_auc"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, pred), abs=1e-12)
    assert m["precision"] == pytest.approx(sk.precision_score(y, pred, average="macro", zero_division=0), abs=1e-12)
    assert m["recall"] == pytest.approx(sk.recall_score(y, pred, average="macro", zero_division=0), abs=1e-12)
    assert m["f1"] == pytest.approx(sk.f1_score(y, pred, average="macro", zero_division=0), abs=1e-12)
    mcm = sk.multilabel_confusion_matrix(y, pred, labels=range(len(CLASSES)))
    spec = [tn / (tn + fp) for (tn, fp), _ in mcm]
    assert m["specificity"] == pytest.approx(np.mean(spec), abs=1e-12)
    aps = [sk.average_precision_score(onehot[:, c], p[:, c]) for c in range(len(CLASSES))]
    assert m["mAP"] == pytest.approx(np.mean(aps), abs=1e-12)
    trap = []
    for c in range(len(CLASSES)):
        prec, rec, _ = sk.precision_recall_curve(onehot[:, c], p[:, c])
        trap.append(sk.auc(rec, prec))
    assert m["mAP_trapezoid"] == pytest.approx(np.mean(trap), abs=1e-12)
    assert m["confusion"] == sk.confusion_matrix(y, pred, labels=range(len(CLASSES))).tolist()
    for c, name in enumerate(CLASSES):
        row = m["per_class"][name]
        hit = (p[:, c] >= 0.5).astype(int)
        assert row["auc"] == pytest.approx(aucs[c], abs=1e-12)
        assert row["precision@0.5"] == pytest.approx(sk.precision_score(onehot[:, c], hit, zero_division=0))
        assert row["recall@0.5"] == pytest.approx(sk.recall_score(onehot[:, c], hit, zero_division=0))
        assert row["f1@0.5"] == pytest.approx(sk.f1_score(onehot[:, c], hit, zero_division=0))
    assert m["score"] == pytest.approx((m["mean_auc"] + m["balanced_accuracy"]) / 2)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_class_without_samples_is_reported_not_averaged() -> None:
    y, p = _predictions(200, 5, False)
    y[y == 9] = 0  # no Worms in this set
    m = compute_metrics(y, p, CLASSES)
    assert m["classes_without_samples"] == ["Worms"]
    assert m["per_class"]["Worms"]["auc"] is None
    aucs = [sk.roc_auc_score((y == c).astype(int), p[:, c]) for c in range(9)]
    assert m["mean_auc"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, p.argmax(1)), abs=1e-12)
    # macro averages over the labels sklearn uses (truth or predictions), Worms still predicted here
    pred = p.argmax(1)
    assert (pred == 9).any()
    for key, fn in (("precision", sk.precision_score), ("recall", sk.recall_score), ("f1", sk.f1_score)):
        assert m[key] == pytest.approx(fn(y, pred, average="macro", zero_division=0), abs=1e-12), key
    # never predicted either: not averaged in as a 0
    q = p.copy()
    q[:, 9] = 0.0
    m = compute_metrics(y, q, CLASSES)
    for key, fn in (("precision", sk.precision_score), ("recall", sk.recall_score), ("f1", sk.f1_score)):
        assert m[key] == pytest.approx(fn(y, q.argmax(1), average="macro", zero_division=0), abs=1e-12), key


def test_calibrated_thresholds_reach_target_sensitivity() -> None:
    y, p = _predictions(400, 7, False)
    table = calibrate_thresholds(y, p, CLASSES, 0.9, skip=("Normal",))
    assert "Normal" not in table and len(table) == 9
    for name, row in table.items():
        c = CLASSES.index(name)
        pos = p[y == c, c]
        assert row["sensitivity"] == pytest.approx(np.mean(pos >= row["threshold"]))
        assert row["sensitivity"] >= 0.9
        assert np.mean(pos > row["threshold"]) < 0.9  # the highest such threshold
        assert row["flag_rate"] == pytest.approx(np.mean(p[:, c] >= row["threshold"]))
        assert 0.0 <= row["threshold"] <= 1.0
