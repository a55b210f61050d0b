"""`python -m train score`: a submission against each kind of truth, equal to sklearn and the official definitions
(including a class absent from the truth, which the official script cannot score)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openpyxl
import pytest
from ce24_real import make_ce24_tree
from sklearn import metrics as sk

from capsule_batch.model.classes import CE24_CLASSES
from train.__main__ import main

CLASSES = list(CE24_CLASSES)


def _probs(y: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1, (len(y), len(CLASSES)))
    logits[np.arange(len(y)), y] += rng.uniform(0, 3, len(y))
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def write_submission(path: Path, names: list[str], probs: np.ndarray) -> Path:
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["image_path", *CLASSES, "predicted_class"])
    for n, p in zip(names, probs, strict=True):
        ws.append([n, *[float(v) for v in p], CLASSES[int(p.argmax())]])
    wb.save(path)
    return path


def write_truth(path: Path, names: list[str], y: np.ndarray, one_hot: bool) -> Path:
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["image_path", "Dataset", *CLASSES] if one_hot else ["image_path", "class_label"])
    for n, c in zip(names, y, strict=True):
        path_in_split = f"validation\\{CLASSES[c]}\\KVASIR\\{n}"
        ws.append([path_in_split, "KVASIR", *[int(k == c) for k in range(len(CLASSES))]] if one_hot
                  else [path_in_split, CLASSES[c]])
    wb.save(path)
    return path


def official(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """The official definitions, with sklearn (labels as sklearn infers them)."""
    pred = p.argmax(1)
    onehot = np.eye(len(CLASSES))[y]
    present = sorted(set(y))

    def spec(t: np.ndarray, q: np.ndarray) -> float:
        tn, fp = int(np.sum(~t & ~q)), int(np.sum(~t & q))
        return tn / (tn + fp) if tn + fp else 0.0

    return {
        "mean_auc": float(np.mean([sk.roc_auc_score(onehot[:, c], p[:, c]) for c in present])),
        "balanced_accuracy": sk.balanced_accuracy_score(y, pred),
        "precision": sk.precision_score(y, pred, average="macro", zero_division=0),
        "recall": sk.recall_score(y, pred, average="macro", zero_division=0),
        "f1": sk.f1_score(y, pred, average="macro", zero_division=0),
        "specificity": float(np.mean([spec(y == c, pred == c) for c in range(len(CLASSES))])),
    }


def _score(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["score", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_score_equals_sklearn_and_the_official_definitions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, len(CLASSES), 300)
    names = [f"{k:016x}_{k}.jpg" for k in range(300)]
    p = _probs(y, 1)
    # a name listed twice in the truth with two classes (an image with two findings): both listings are scored
    names.append(names[5])
    y = np.append(y, (y[5] + 1) % len(CLASSES))
    pred = write_submission(tmp_path / "sub.xlsx", names[:300], p)
    p = np.vstack([p, p[5]])
    ref = official(y, p)
    for one_hot in (True, False):
        truth = write_truth(tmp_path / f"truth{one_hot}.xlsx", names, y, one_hot)
        got = _score(capsys, str(pred), "--truth", str(truth), "--out", str(tmp_path / f"m{one_hot}"))
        assert got["count"] == 301 and got["repeated_names"] == 1
        for k, v in ref.items():
            assert got[k] == pytest.approx(v, abs=1e-12), k
        saved = json.loads((tmp_path / f"m{one_hot}" / "metrics.json").read_text())
        for c, name in enumerate(CLASSES):  # the official class-wise metrics at 0.5
            t, q = (y == c).astype(int), (p[:, c] >= 0.5).astype(int)
            row = saved["per_class"][name]
            assert row["precision@0.5"] == pytest.approx(sk.precision_score(t, q, zero_division=0))
            assert row["recall@0.5"] == pytest.approx(sk.recall_score(t, q, zero_division=0))
            assert row["f1@0.5"] == pytest.approx(sk.f1_score(t, q, zero_division=0))
            assert row["auc"] == pytest.approx(sk.roc_auc_score(t, p[:, c]))
        assert (tmp_path / f"m{one_hot}" / "per_class.csv").read_text().startswith("class,support,auc,ap,")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_class_absent_from_the_truth_is_averaged_as_sklearn_does(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 9, 200)  # no Worms
    p = _probs(y, 3)
    p[:, 9] = 0.0  # and never predicted
    p /= p.sum(1, keepdims=True)
    names = [f"image{k:05d}.jpg" for k in range(200)]
    got = _score(capsys, str(write_submission(tmp_path / "s.xlsx", names, p)), "--truth",
                 str(write_truth(tmp_path / "t.xlsx", names, y, True)))
    ref = official(y, p)
    for k in ("precision", "recall", "f1", "balanced_accuracy", "mean_auc"):
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k
    assert got["classes_without_samples"] == ["Worms"]
    # averaging a 0 in for the absent class would give 9/10 of it
    assert got["f1"] > sk.f1_score(y, p.argmax(1), average="macro", labels=range(10), zero_division=0) * 1.1


def test_score_against_a_ce24_folder_and_the_seed_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = make_ce24_tree(tmp_path / "ce24", per_cell=1)
    listed = tree.files["validation"]
    names = sorted({n for _, _, n in listed})
    y_name = {n: CLASSES.index(c) for c, _, n in listed}
    p = _probs(np.asarray([y_name[n] for n in names]), 4)
    pred = write_submission(tmp_path / "sub.xlsx", names, p)
    folder = _score(capsys, str(pred), "--truth", str(tree.root / "validation"))
    assert folder["count"] == len(listed) and folder["repeated_names"] == len(tree.multi_within["validation"])
    seed = _score(capsys, str(pred), "--truth", str(tree.base / "train_val.csv"), "--split", "validation")
    seed_mapped = _score(capsys, str(pred), "--truth", str(tree.base / "train_val.csv"), "--split", "validation",
                         "--class-mapping", str(tree.base / "class_mapping.json"))
    for k in ("count", "mean_auc", "balanced_accuracy", "f1"):
        assert folder[k] == seed[k] == seed_mapped[k]
    by_name = {n: q for n, q in zip(names, p, strict=True)}
    y = np.asarray([CLASSES.index(c) for c, _, _ in listed])
    ref = official(y, np.stack([by_name[n] for _, _, n in listed]))
    assert folder["balanced_accuracy"] == pytest.approx(ref["balanced_accuracy"], abs=1e-12)


def test_missing_predictions_are_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = ["a.jpg", "b.jpg"]
    y = np.asarray([0, 1])
    pred = write_submission(tmp_path / "s.xlsx", names[:1], _probs(y[:1], 0))
    assert main(["score", str(pred), "--truth", str(write_truth(tmp_path / "t.xlsx", names, y, True))]) == 1
    assert "1 images of the truth have no prediction (first: b.jpg)" in capsys.readouterr().err
