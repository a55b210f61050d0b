"""The Capsule Vision 2024 challenge metrics, computed over a whole set at once (never per batch).

Definitions follow the official scoring script (misahub2023/Capsule-Vision-2024-Challenge,
`Results/gen_metrics_test.py`):
- `mean_auc`: mean over classes of the one-vs-rest ROC AUC of that class's probability;
- `balanced_accuracy`, macro `precision` / `recall` / `f1`, mean `specificity`: on the argmax prediction; the macro
  averages run, as sklearn's do, over the labels present in the truth or the predictions (a class absent from
  both is not averaged in as a 0); balanced accuracy over the classes present in the truth;
- `mAP`: mean over classes of average precision, AP = sum_n (R_n - R_{n-1}) P_n over descending score
  thresholds (sklearn's `average_precision_score`); `mAP_trapezoid` is the trapezoidal area under the
  precision-recall curve, which the challenge's sample script computes;
- `per_class`: one-vs-rest at probability >= 0.5 (precision, recall, specificity, f1) plus auc and ap;
- `score`: the challenge ranking, mean of mean_auc and balanced_accuracy.
Implemented in numpy, independently of sklearn; the tests compare both. A class without positives in
the set has no AUC/AP: it is left out of the means and reported as null.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def _binary_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative true/false positive counts at each distinct score, highest first."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64)


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    tps, fps = _binary_curve(y, s)
    p, n = tps[-1], fps[-1]
    if p == 0 or n == 0:
        return math.nan
    tpr, fpr = np.r_[0, tps] / p, np.r_[0, fps] / n
    return float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2))


def _pr(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    tps, fps = _binary_curve(y, s)
    if tps[-1] == 0:
        return None
    return tps / (tps + fps), tps / tps[-1]


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    pr = _pr(y, s)
    if pr is None:
        return math.nan
    precision, recall = pr
    return float(np.sum(np.diff(np.r_[0, recall]) * precision))


def pr_auc_trapezoid(y: np.ndarray, s: np.ndarray) -> float:
    """Trapezoidal area under the PR curve with the (recall 0, precision 1) end point, as
    `auc(*precision_recall_curve(...)[1::-1])` computes it."""
    pr = _pr(y, s)
    if pr is None:
        return math.nan
    precision, recall = np.r_[1.0, pr[0]], np.r_[0.0, pr[1]]
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2))


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), 0.0)


def _nanmean(v: list[float]) -> float | None:
    ok = [x for x in v if not math.isnan(x)]
    return float(np.mean(ok)) if ok else None


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """All challenge metrics for integer labels (N,) and probabilities (N, C)."""
    y_true = np.asarray(y_true, np.int64)
    probs = np.asarray(probs, np.float64)
    n, k = probs.shape
    if len(y_true) != n or k != len(class_names):
        raise ValueError(f"{len(y_true)} labels, probabilities {probs.shape}, {len(class_names)} classes")
    y_pred = probs.argmax(1)
    cm = confusion(y_true, y_pred, k)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1).astype(np.float64)
    predicted = cm.sum(0).astype(np.float64)
    fp, fn = predicted - tp, support - tp
    tn = n - tp - fp - fn
    recall, precision = _div(tp, support), _div(tp, predicted)
    f1 = _div(2 * precision * recall, precision + recall)
    specificity = _div(tn, tn + fp)
    present = support > 0
    seen = present | (predicted > 0)  # sklearn's labels=None: the union of truth and prediction labels
    per_class: dict[str, dict[str, Any]] = {}
    aucs, aps, aps_trap = [], [], []
    for c, name in enumerate(class_names):
        yc = (y_true == c).astype(np.int64)
        sc = probs[:, c]
        auc, ap, apt = roc_auc(yc, sc), average_precision(yc, sc), pr_auc_trapezoid(yc, sc)
        aucs.append(auc)
        aps.append(ap)
        aps_trap.append(apt)
        hit = sc >= 0.5
        ctp, cfp = float(np.sum(hit & (yc == 1))), float(np.sum(hit & (yc == 0)))
        cfn, ctn = float(np.sum(~hit & (yc == 1))), float(np.sum(~hit & (yc == 0)))
        cp = ctp / (ctp + cfp) if ctp + cfp else 0.0
        cr = ctp / (ctp + cfn) if ctp + cfn else 0.0
        per_class[name] = {
            "support": int(support[c]),
            "auc": None if math.isnan(auc) else auc,
            "ap": None if math.isnan(ap) else ap,
            "precision@0.5": cp,
            "recall@0.5": cr,
            "specificity@0.5": ctn / (ctn + cfp) if ctn + cfp else 0.0,
            "f1@0.5": 2 * cp * cr / (cp + cr) if cp + cr else 0.0,
            "recall": float(recall[c]),
        }
    mean_auc = _nanmean(aucs)
    bal = float(recall[present].mean()) if present.any() else 0.0
    return {
        "count": int(n),
        "mean_auc": mean_auc,
        "balanced_accuracy": bal,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "precision": float(precision[seen].mean()) if seen.any() else 0.0,
        "recall": float(recall[seen].mean()) if seen.any() else 0.0,
        "f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "specificity": float(specificity.mean()),
        "mAP": _nanmean(aps),
        "mAP_trapezoid": _nanmean(aps_trap),
        "score": None if mean_auc is None else (mean_auc + bal) / 2,
        "per_class": per_class,
        "confusion": cm.tolist(),
        "classes_without_samples": [c for c, p in zip(class_names, present, strict=True) if not p],
    }


def write_metrics(m: dict[str, Any], out_dir: Path) -> None:
    """`compute_metrics`' result as `metrics.json` and its per-class table as `per_class.csv` in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(m, indent=2), encoding="utf-8")
    with open(out_dir / "per_class.csv", "w", newline="", encoding="utf-8") as fh:
        cols = list(next(iter(m["per_class"].values())))
        w = csv.writer(fh)
        w.writerow(["class", *cols])
        for name, row in m["per_class"].items():
            w.writerow([name, *[row[c] for c in cols]])


def save_plots(y_true: np.ndarray, probs: np.ndarray, class_names: list[str], out_dir: Path) -> list[Path]:
    """confusion_matrix.png and roc.png (one-vs-rest curves per class)."""
    try:
        import matplotlib
    except ImportError:
        from capsule_batch.errors import MissingPackageError

        raise MissingPackageError("matplotlib", "train", "evaluation plots") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(class_names)
    cm = confusion(np.asarray(y_true), np.asarray(probs).argmax(1), k)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * k, 1.0 + 0.6 * k))
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    cm_path = out_dir / "confusion_matrix.png"
    fig.savefig(cm_path, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 6))
    for c, name in enumerate(class_names):
        yc = (np.asarray(y_true) == c).astype(np.int64)
        tps, fps = _binary_curve(yc, np.asarray(probs)[:, c])
        if tps[-1] == 0 or fps[-1] == 0:
            continue
        ax.plot(np.r_[0, fps] / fps[-1], np.r_[0, tps] / tps[-1],
                label=f"{name} ({roc_auc(yc, np.asarray(probs)[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    roc_path = out_dir / "roc.png"
    fig.savefig(roc_path, dpi=110)
    plt.close(fig)
    return [cm_path, roc_path]


def calibrate_thresholds(y_true: np.ndarray, probs: np.ndarray, class_names: list[str], target: float,
                         skip: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Per class, the highest threshold whose one-vs-rest sensitivity on these data reaches `target`,
    with what it implies: the sensitivity reached and the fraction of all frames it flags."""
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, np.float64)
    out: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(class_names):
        if name in skip:
            continue
        pos = np.sort(probs[y_true == c, c])[::-1]
        if len(pos) == 0:
            continue
        need = math.ceil(target * len(pos) - 1e-9)
        thr = float(pos[need - 1])
        out[name] = {
            "threshold": thr,
            "sensitivity": float(np.mean(pos >= thr)),
            "flag_rate": float(np.mean(probs[:, c] >= thr)),
            "positives": int(len(pos)),
        }
    return out
