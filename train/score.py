"""`python -m train score PREDICTIONS.xlsx --truth TRUTH`: the challenge metrics of a submission file.

PREDICTIONS is a CE24 submission (`image_path`, one probability column per class, `predicted_class`), as
`python -m train predict` writes it. TRUTH is one of:
- a CE24 split folder (`<root>/validation`, `<Class>/<Source>/*.jpg`);
- a ground-truth xlsx: `image_path` (Windows or POSIX separators) and either one-hot class columns or a
  `class_label` column;
- a seed CSV (`frame_path`, `class`/`original_class`, `fold`): `--split validation` keeps fold 0; labels from
  `original_class` where it holds the class names, else `class` through `--class-mapping` (the seed's JSON).

Images are matched by file name, as the official scorer does. A name listed several times in the truth (CE24
validation's SEE-AI images with several findings) is scored once per listing, with the prediction for that
name. Metrics are `train.metrics.compute_metrics` (the official definitions; see docs/training.md for where the
official script differs): printed as JSON and written to `<out>/metrics.json` and `<out>/per_class.csv`.
"""

from __future__ import annotations

import argparse
import collections
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from train import data as D
from train.metrics import compute_metrics, write_metrics

_logger = logging.getLogger(__name__)


def translate_argv(argv: list[str]) -> list[str]:
    """`PREDICTIONS --truth T [--split S] [--class-mapping J] [--out DIR] [key=value ...]` -> config overrides."""
    p = argparse.ArgumentParser(prog="python -m train score", description=__doc__.splitlines()[0])
    p.add_argument("predictions", help="submission xlsx: image_path, class probability columns, predicted_class")
    p.add_argument("--truth", required=True, help="CE24 split folder, ground-truth xlsx, or seed CSV")
    p.add_argument("--split", choices=sorted(D.SEED_SPLITS), help="with a seed CSV: the folds to keep")
    p.add_argument("--class-mapping", help="with a seed CSV: the seed's class_mapping.json for the class column")
    p.add_argument("--out", help="folder for metrics.json and per_class.csv (default: beside PREDICTIONS)")
    args, rest = p.parse_known_args(argv)
    out = [f"score.predictions={args.predictions}", f"score.truth={args.truth}"]
    out += [f"score.{k}={v}" for k, v in (("split", args.split), ("class_mapping", args.class_mapping),
                                          ("out", args.out)) if v]
    return [*out, *rest]


def file_name(path: str) -> str:
    """The last component of a Windows or POSIX path."""
    return re.split(r"[\\/]", str(path).strip())[-1]


def read_predictions(path: Path, classes: list[str]) -> dict[str, np.ndarray]:
    """file name -> probabilities; a name listed twice with different probabilities is refused."""
    rows = D.read_xlsx(path)
    if not rows:
        raise D.DataError(f"{path}: no rows")
    header = [str(h).strip() if h is not None else "" for h in rows[0]]
    missing = [c for c in ["image_path", *classes] if c not in header]
    if missing:
        raise D.DataError(f"{path}: missing columns {missing} (a submission has image_path, one column per class, "
                          "predicted_class)")
    col = {c: header.index(c) for c in ["image_path", *classes]}
    pc = header.index("predicted_class") if "predicted_class" in header else None
    out: dict[str, np.ndarray] = {}
    disagree = 0
    for r, row in enumerate(rows[1:], start=2):
        if row[col["image_path"]] in (None, ""):
            continue
        name = file_name(row[col["image_path"]])
        try:
            p = np.asarray([float(row[col[c]]) for c in classes], np.float64)
        except (TypeError, ValueError):
            raise D.DataError(f"{path}: row {r} ({name}): class columns must hold numbers") from None
        if not np.isfinite(p).all():
            raise D.DataError(f"{path}: row {r} ({name}): probabilities must be finite")
        if name in out and not np.allclose(out[name], p, atol=1e-6):
            raise D.DataError(f"{path}: {name} is listed twice with different probabilities")
        out[name] = p
        if pc is not None and row[pc] not in (None, "") and str(row[pc]) != classes[int(p.argmax())]:
            disagree += 1
    if disagree:
        _logger.warning("%s: predicted_class differs from the highest probability in %d rows; the metrics use the "
                        "probabilities (as the official scorer does)", path, disagree)
    return out


def read_truth(spec: dict[str, Any], classes: list[str]) -> list[tuple[str, str]]:
    """(file name, class) per truth listing, in listed order."""
    truth = Path(str(spec["truth"]))
    if truth.is_dir():
        samples = D.read_ce24({"root": str(truth.parent), "split": truth.name, "classes": classes,
                               "allow_missing_classes": True}, "score.truth")
        return [(s.name, s.label) for s in samples]
    if truth.suffix.lower() == ".csv":
        return _seed_truth(truth, spec, classes)
    rows = D.read_xlsx(truth)
    if not rows:
        raise D.DataError(f"{truth}: no rows")
    header = [str(h).strip() if h is not None else "" for h in rows[0]]
    if "image_path" not in header:
        raise D.DataError(f"{truth}: needs an image_path column")
    one_hot = all(c in header for c in classes)
    if not one_hot and "class_label" not in header:
        raise D.DataError(f"{truth}: needs one-hot class columns {classes} or a class_label column")
    out = []
    for r, row in enumerate(rows[1:], start=2):
        rec = dict(zip(header, row, strict=False))
        if rec.get("image_path") in (None, ""):
            continue
        name = file_name(rec["image_path"])
        if one_hot:
            try:
                hot = [c for c in classes if D.is_set(rec[c])]
            except ValueError as e:
                raise D.DataError(f"{truth}: row {r} ({name}): {e}") from None
            if len(hot) != 1:
                raise D.DataError(f"{truth}: row {r} ({name}) has {len(hot)} classes set, expected exactly one")
            label = hot[0]
        else:
            label = str(rec["class_label"]).strip()
        if label not in classes:
            raise D.DataError(f"{truth}: row {r} ({name}): {label!r} is not one of {classes}")
        out.append((name, label))
    return out


def _seed_truth(path: Path, spec: dict[str, Any], classes: list[str]) -> list[tuple[str, str]]:
    rows = D._read_csv(path)
    if not rows or "frame_path" not in rows[0]:
        raise D.DataError(f"{path}: not a seed CSV (needs frame_path, class, fold)")
    split = spec.get("split")
    if split:
        rows = [r for r in rows if D.SEED_SPLITS[split](int(float(r["fold"])))]
    if rows and "original_class" in rows[0] and all(r["original_class"] in classes for r in rows):
        return [(file_name(r["frame_path"]), r["original_class"]) for r in rows]
    if not spec.get("class_mapping"):
        raise D.DataError(f"{path}: the class column holds the seed's names: give --class-mapping "
                          "(the seed's class_mapping.json)")
    mapping = D.read_class_mapping(Path(spec["class_mapping"]), classes)
    bad = sorted({r["class"] for r in rows} - set(mapping))
    if bad:
        raise D.DataError(f"{path}: labels {bad} are not in {spec['class_mapping']}")
    return [(file_name(r["frame_path"]), mapping[r["class"]]) for r in rows]


def score(cfg: dict[str, Any]) -> dict[str, Any]:
    """Metrics of `score.predictions` against `score.truth` (see the module docstring)."""
    sc = cfg["score"]
    if not sc.get("predictions") or not sc.get("truth"):
        raise D.DataError("score: give the predictions and the truth (python -m train score PREDICTIONS --truth T)")
    classes = D.class_list(cfg["data"]["classes"])
    pred_path = Path(str(sc["predictions"]))
    preds = read_predictions(pred_path, classes)
    truth = read_truth(sc, classes)
    if not truth:
        raise D.DataError(f"{sc['truth']}: no labelled images")
    missing = sorted({n for n, _ in truth} - set(preds))
    if missing:
        raise D.DataError(f"{pred_path}: {len(missing)} images of the truth have no prediction (first: {missing[0]})")
    extra = sorted(set(preds) - {n for n, _ in truth})
    if extra:
        _logger.warning("%s: %d predictions are for images not in the truth (ignored; first: %s)", pred_path,
                        len(extra), extra[0])
    repeated = sum(n > 1 for n in collections.Counter(n for n, _ in truth).values())
    if repeated:
        _logger.info("%d image names are listed more than once in the truth (e.g. images with several findings): "
                     "each listing is scored", repeated)
    idx = {c: i for i, c in enumerate(classes)}
    y = np.asarray([idx[label] for _, label in truth])
    probs = np.stack([preds[n] for n, _ in truth])
    m = compute_metrics(y, probs, classes)
    out_dir = Path(str(sc.get("out") or pred_path.with_name(pred_path.stem + "_metrics")))
    write_metrics(m, out_dir)
    _logger.info("scored %d listings (%d images): mean AUC %s, balanced accuracy %.4f, macro F1 %.4f -> %s",
                 m["count"], len(set(n for n, _ in truth)), m["mean_auc"], m["balanced_accuracy"], m["f1"], out_dir)
    summary = {k: v for k, v in m.items() if k not in ("per_class", "confusion")}
    summary.update({"repeated_names": repeated, "extra_predictions": len(extra), "out": str(out_dir)})
    return summary

