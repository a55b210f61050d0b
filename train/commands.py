"""evaluate / calibrate / predict: work on a finished bundle, with the bundle's own preprocessing."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from capsule_batch.devices import resolve_device
from capsule_batch.model.bundle import ModelBundle, save_bundle
from train import data as D
from train.metrics import calibrate_thresholds, compute_metrics, save_plots, write_metrics
from train.trainer import TrainError, _precision, predict_probs

_logger = logging.getLogger(__name__)


def _bundle(cfg: dict[str, Any], section: str) -> ModelBundle:
    path = cfg[section].get("bundle")
    if not path:
        raise TrainError(f"{section}.bundle: give the bundle folder ({section}.bundle=PATH)")
    p = Path(path)
    if (p / "bundle" / "model.json").is_file():
        p = p / "bundle"  # a run folder
    return ModelBundle.load(p)


def _score(cfg: dict[str, Any], bundle: ModelBundle, samples: list[D.Sample]) -> np.ndarray:
    device = resolve_device(cfg["run"]["device"])
    model = bundle.create_model().to(device)
    probs, _ = predict_probs(model, samples, bundle.class_names, bundle.preprocess,
                             batch_size=int(cfg["train"]["eval_batch_size"]), device=device,
                             dtype=_precision(cfg["run"]["precision"], device), workers=int(cfg["run"]["workers"]))
    return probs


def _labelled_set(cfg: dict[str, Any], classes: list[str], section: str) -> list[D.Sample]:
    samples = D.build_samples(cfg["data"].get("val") or [], classes, "data.val")
    if cfg["data"].get("check_images", True):
        samples, _ = D.check_images(samples, int(cfg["run"]["workers"]) or 1)
    if not samples:
        raise D.DataError(f"{section}: the evaluation set is empty (data.val lists no readable images)")
    return samples


def _scored_set(cfg: dict[str, Any], section: str) -> tuple[Any, list[Any], np.ndarray, np.ndarray]:
    """The section's bundle, its labelled data.val samples, their probabilities and label indices."""
    bundle = _bundle(cfg, section)
    samples = _labelled_set(cfg, bundle.class_names, section)
    probs = _score(cfg, bundle, samples)
    idx = {c: i for i, c in enumerate(bundle.class_names)}
    return bundle, samples, probs, np.asarray([idx[s.label] for s in samples])


def evaluate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Challenge metrics, per-class table, predictions and plots for the bundle on data.val."""
    bundle, samples, probs, labels = _scored_set(cfg, "evaluate")
    m = compute_metrics(labels, probs, bundle.class_names)
    out = Path(cfg["evaluate"].get("out") or bundle.path.parent / "eval")
    write_metrics(m, out)
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "frame", "label", *bundle.class_names])
        for s, p in zip(samples, probs, strict=True):
            w.writerow([s.ref, "" if s.frame is None else s.frame, s.label, *[f"{v:.6f}" for v in p]])
    save_plots(labels, probs, bundle.class_names, out)
    _logger.info("evaluated %d images: balanced accuracy %.4f, mean AUC %s -> %s", m["count"],
                 m["balanced_accuracy"], m["mean_auc"], out)
    return m


def calibrate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Per-class thresholds reaching the target sensitivity on data.val, or the highest common target that fits a
    reading budget (train.budget), written into the bundle, with what they buy on data.val."""
    from train import budget as B

    section = cfg["calibrate"]
    budget, model = B.budget_from_config(section), B.reading_from_config(section)
    bundle, samples, probs, labels = _scored_set(cfg, "calibrate")
    target = float(section["target_sensitivity"])
    skip = (bundle.normal_class,) if bundle.normal_class else ()
    ev = B.Evaluator(labels, probs, bundle.class_names, bundle.normal_class, B.recordings_of(samples),
                     section.get("study_frames"), model, merge_classes=bool(section.get("merge_classes", True)))
    if budget.given:
        table, reached, _ = B.fit_budget(ev, budget, target, skip)
    else:
        table, reached = calibrate_thresholds(labels, probs, bundle.class_names, target, skip=skip), target
    if not table:
        raise D.DataError("calibrate: no class other than the normal class has positives in data.val")
    missing = [c for c in bundle.class_names if c not in table and c not in skip]
    if missing:
        _logger.warning("no validation positives for %s: no threshold (those classes flag on argmax)", missing)
    thresholds = {c: table[c]["threshold"] for c in table}
    flagged = np.zeros(len(samples), bool)
    for c, t in thresholds.items():
        flagged |= probs[:, bundle.class_names.index(c)] >= t
    report = {"target_sensitivity": target, "count": len(samples), "classes": table,
              "overall_flag_rate": float(flagged.mean()), "budget": asdict(budget) if budget.given else None,
              "common_target_sensitivity": reached, "buys": ev.buys(thresholds)}
    from safetensors.torch import load_file

    bundle.verify_weights()
    sd = load_file(str(bundle.weights_path))
    prov = dict(bundle.provenance)
    prov["calibration"] = {"target_sensitivity": target, "count": len(samples),
                           "overall_flag_rate": report["overall_flag_rate"], "budget": report["budget"],
                           "common_target_sensitivity": reached}
    save_bundle(bundle.path, sd, arch=bundle.arch, class_names=bundle.class_names, preprocess=bundle.preprocess,
                normal_class=bundle.normal_class, thresholds=thresholds, model_args=bundle.model_args,
                provenance=prov, overwrite=True)
    (bundle.path.parent / "calibration.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    for c, row in table.items():
        _logger.info("%-18s threshold %.4f sensitivity %.3f flag rate %.4f", c, row["threshold"],
                     row["sensitivity"], row["flag_rate"])
    _logger.info("all classes together flag %.2f%% of %d frames", 100 * report["overall_flag_rate"], len(samples))
    B.log_buys(report["buys"])
    return report


def _listed_images(listing: Path, root: Path) -> list[Path]:
    """The images of a seed CSV (`frame_path` relative to `root`, Windows separators), in the listed order."""
    rows = D._read_csv(listing)
    if rows and "frame_path" not in rows[0]:
        raise D.DataError(f"{listing}: needs a frame_path column (the seed's test.csv), has {list(rows[0])}")
    paths = [root / Path(r["frame_path"].replace("\\", "/")) for r in rows if r["frame_path"]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise D.DataError(f"{listing}: {len(missing)} listed images are missing under {root} (first: {missing[0]}); "
                          "frame_path is relative to predict.root")
    return paths


def _folder_images(folder: Path, exclude: list[str] | None) -> list[Path]:
    """A folder's images and those of its sub-folders, by capsule-batch's frame listing rule (masks and labels left
    out, other files skipped with a warning); names must be unique, since a submission names images by file name."""
    from capsule_batch.errors import SourceError
    from capsule_batch.sources.listing import scan_frames

    try:
        found = scan_frames(folder, exclude, recursive=True)
    except SourceError as e:
        raise D.DataError(str(e)) from None
    found.report(_logger)
    by_name: dict[str, list[Path]] = {}
    for p in found.files:
        by_name.setdefault(p.name, []).append(p)
    dup = {n: ps for n, ps in by_name.items() if len(ps) > 1}
    if dup:
        n, ps = next(iter(dup.items()))
        raise D.DataError(f"{folder}: {len(dup)} image name(s) occur more than once (e.g. {n}: "
                          f"{', '.join(str(p.relative_to(folder)) for p in ps[:3])}); a submission names images by "
                          "file name: predict one folder at a time, or leave the others out with predict.exclude")
    return found.files


def predict(cfg: dict[str, Any]) -> Path:
    """A CE24 submission xlsx: image_path (file name), one probability column per class, predicted_class."""
    import openpyxl

    bundle = _bundle(cfg, "predict")
    images = cfg["predict"].get("images")
    if not images:
        raise TrainError("predict.images: give a folder of images (e.g. CE24 testing/Images) or the seed's test.csv")
    listing = Path(images)
    if listing.is_file() and listing.suffix.lower() == ".csv":
        paths = _listed_images(listing, Path(cfg["predict"].get("root") or listing.parent))
        folder = listing
    else:
        folder = listing
        if not folder.is_dir():
            raise D.DataError(f"{folder}: no such folder")
        paths = _folder_images(folder, cfg["predict"].get("exclude"))
    if not paths:
        raise D.DataError(f"{folder}: no images")
    label = bundle.class_names[0]  # unlabelled: any valid class name serves the dataset
    samples = [D.Sample(str(p), label, "", "", p.name) for p in paths]
    unreadable = len(samples) - len(D.check_images(samples, int(cfg["run"]["workers"]) or 1)[0])
    if unreadable:
        raise D.DataError(f"{folder}: {unreadable} images cannot be read; a submission must score every image")
    probs = _score(cfg, bundle, samples)
    out = Path(cfg["predict"]["out"])
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["image_path", *bundle.class_names, "predicted_class"])
    for s, p in zip(samples, probs, strict=True):
        ws.append([s.name, *[float(v) for v in p], bundle.class_names[int(p.argmax())]])
    out.parent.mkdir(parents=True, exist_ok=True)
    wb.save(out)
    _logger.info("wrote %s (%d images)", out, len(samples))
    return out
