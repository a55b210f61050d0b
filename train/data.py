"""Datasets for training: readers for each input format, class mapping, grouped splits, leakage checks.

Every reader turns a dataset spec (a mapping from the config, `kind` picks the reader) into `Sample`s
with the dataset's own labels; `build_samples` then maps them onto the target class set. Formats:
- `ce24`: the Capsule Vision 2024 layout `<root>/<split>/<Class>/<Source>/*.jpg`, optionally with the
  official ground-truth xlsx (`image_path, Dataset, <10 one-hot class columns>`);
- `seed_csv`: the seed's CSV (`dataset, patient_id, frame_path, proposed_name, class, fold, original_class`);
- `folder`: `<root>/<label>/**/*.jpg` for any labelled image collection;
- `recording`: frames inside a video, by frame number, with a per-frame label CSV (Kvasir-Capsule's
  metadata, Galar's per-frame CSVs, capsule_batch.sources.synthesize's `<stem>.labels.csv`);
- `merged`: several of the above plus a class-mapping CSV (EE24-style corpora).
"""

from __future__ import annotations

import collections
import csv
import hashlib
import logging
import math
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from capsule_batch.errors import CapsuleError
from capsule_batch.model.classes import CE24_CLASSES, resolve_classes, validate_class_names
from capsule_batch.sources.listing import FRAME_SUFFIXES

_logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = FRAME_SUFFIXES  # the image types capsule-batch reads as frames
EXCLUDE_TARGETS = ("", "-", "exclude")


class DataError(CapsuleError):
    """A dataset, split or class mapping that cannot be used."""


@dataclass(frozen=True)
class Sample:
    """One labelled image: a file, or frame `frame` of the video `ref`."""

    ref: str
    label: str  # the dataset's own label until mapped, then a target class name
    group: str  # patient or recording: never on both sides of a split
    source: str
    name: str  # file name, as in the CE24 xlsx and submissions
    frame: int | None = None
    position: int | None = None  # frame number inside its recording (`group`), for lesion-level figures


def load_rgb(sample: Sample) -> Any:
    """The sample's pixels as an RGB PIL image (raises on an unreadable file)."""
    from PIL import Image

    if sample.frame is not None:
        from train.frame_refs import read_frame

        return Image.fromarray(read_frame(sample.ref, sample.frame))
    with Image.open(sample.ref) as im:
        return im.convert("RGB")


# ----------------------------------------------------------------------------------------------
# Readers

Reader = Callable[[dict[str, Any], str], list[Sample]]
READERS: dict[str, Reader] = {}
READER_KEYS: dict[str, frozenset[str]] = {}
COMMON_KEYS = ("kind", "name")  # `name`: the source's name inside `merged`


def reader(kind: str, keys: tuple[str, ...]) -> Callable[[Reader], Reader]:
    """Register a reader for `kind` with the spec keys it reads (any other key is refused: a typo in a
    key such as `none_label` would otherwise change the data without a word)."""

    def deco(fn: Reader) -> Reader:
        READERS[kind] = fn
        READER_KEYS[kind] = frozenset((*COMMON_KEYS, *keys))
        return fn

    return deco


def _need(spec: dict[str, Any], key: str, where: str) -> Any:
    if spec.get(key) in (None, ""):
        raise DataError(f"{where}: dataset spec needs '{key}'")
    return spec[key]


def _group_of(stem: str) -> str:
    """A recording id from a frame file name: Kvasir-Capsule's `<video>_<frame>` loses its frame number."""
    return re.sub(r"[_-]?\d+$", "", stem) or stem


_KVASIR_NAME = re.compile(r"^([0-9a-f]{16})_\d+$", re.IGNORECASE)
_KID_NAME = re.compile(r"^(.+)-P(\d+)-\d+$", re.IGNORECASE)


def ce24_group(source: str, stem: str) -> str:
    """The patient/recording of a CE24 image, from what its name carries: Kvasir-Capsule's `<16 hex>_<frame>` is
    the video id, KID's `<class>-P<patient>-<n>` the patient. SEE-AI (`image<5 digits>`) and AIIMS names carry
    neither: each image is its own group (its copies under other class folders share it), so a re-split keeps an
    image on one side but cannot keep a patient on one side."""
    m = _KVASIR_NAME.match(stem)
    if m:
        return f"{source}/video-{m.group(1).lower()}"
    m = _KID_NAME.match(stem)
    if m:
        return f"{source}/patient-{m.group(2)}"
    return f"{source}/image-{stem}"


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


@reader("ce24", ("root", "split", "classes", "allow_missing_classes", "xlsx"))
def read_ce24(spec: dict[str, Any], where: str) -> list[Sample]:
    root = Path(_need(spec, "root", where))
    split = spec.get("split", "training")
    base = root / split
    if not base.is_dir():
        raise DataError(f"{base}: no such folder (CE24 layout: <root>/{split}/<Class>/<Source>/*.jpg)")
    classes = list(spec.get("classes") or CE24_CLASSES)
    present = sorted(p.name for p in base.iterdir() if p.is_dir())
    missing = [c for c in classes if c not in present]
    extra = [c for c in present if c not in classes]
    if extra:
        raise DataError(f"{base}: unexpected class folders {extra} (expected {classes})")
    if missing and not spec.get("allow_missing_classes", False):
        raise DataError(f"{base}: missing class folders {missing} (set allow_missing_classes: true to accept)")
    if spec.get("xlsx"):
        return _read_ce24_xlsx(Path(spec["xlsx"]), root, base, classes)
    out = []
    for cls in classes:
        for p in _images_under(base / cls):
            rel = p.relative_to(base / cls)
            source = rel.parts[0] if len(rel.parts) > 1 else "unknown"
            out.append(Sample(str(p), cls, ce24_group(source, p.stem), source, p.name))
    return out


def _read_ce24_xlsx(xlsx: Path, root: Path, base: Path, classes: list[str]) -> list[Sample]:
    rows = read_xlsx(xlsx)
    if not rows:
        raise DataError(f"{xlsx}: no rows")
    header = list(rows[0])
    missing = [c for c in ["image_path", *classes] if c not in header]
    if missing:
        raise DataError(f"{xlsx}: missing columns {missing}")
    out, absent = [], []
    for r, row in enumerate(rows[1:], start=2):
        rec = dict(zip(header, row, strict=False))
        if rec.get("image_path") in (None, ""):
            continue  # spreadsheets often end in blank rows
        rel = str(rec["image_path"]).replace("\\", "/")
        try:
            hot = [c for c in classes if is_set(rec[c])]
        except ValueError:
            raise DataError(f"{xlsx}: row {r} ({rel}): class columns must hold 0 or 1") from None
        if len(hot) != 1:
            raise DataError(f"{xlsx}: row {r} ({rel}) has {len(hot)} classes set, expected exactly one")
        path = next((p for p in (base / rel, root / rel, xlsx.parent / rel) if p.is_file()), None)
        if path is None:
            absent.append(rel)
            continue
        source = str(rec.get("Dataset") or (Path(rel).parts[-2] if len(Path(rel).parts) > 1 else "unknown"))
        out.append(Sample(str(path), hot[0], ce24_group(source, path.stem), source, path.name))
    if absent:
        raise DataError(f"{xlsx}: {len(absent)} listed images not found under {base} (first: {absent[0]})")
    return out


@reader("folder", ("root",))
def read_folder(spec: dict[str, Any], where: str) -> list[Sample]:
    root = Path(_need(spec, "root", where))
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    name = spec.get("name", root.name)
    out = []
    for p in _images_under(root):
        rel = p.relative_to(root)
        if len(rel.parts) < 2:
            raise DataError(f"{p}: images must lie in <root>/<label>/ folders")
        out.append(Sample(str(p), rel.parts[0], f"{name}/{_group_of(p.stem)}", name, p.name))
    return out


#: the seed's fold convention (train_val.csv / test.csv): 0 validation, >= 1 training, -1 test
SEED_SPLITS = {"validation": lambda f: f == 0, "training": lambda f: f >= 1, "test": lambda f: f == -1}


def read_class_mapping(path: Path, classes: list[str] | None = None) -> dict[str, str]:
    """The seed's class_mapping.json (`{seed label: index}`, indices in CE24 output order) as label -> target class
    (`classes[index]`; without `classes`, the label itself)."""
    import json

    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a JSON class mapping ({e})") from None
    ok = isinstance(mapping, dict) and mapping and all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in mapping.items())
    if not ok or sorted(mapping.values()) != list(range(len(mapping))):
        raise DataError(f"{path}: expected an object of label -> index 0..N-1, each index once")
    if classes is not None and len(classes) != len(mapping):
        raise DataError(f"{path}: maps {len(mapping)} labels but the class set has {len(classes)} classes")
    return {k: (classes[v] if classes is not None else k) for k, v in mapping.items()}


def _seed_source(dataset: str, path: Path) -> str:
    """The source of a seed CSV row: its `dataset`, except for the CE24 layout's rows (`capsulevision`), whose
    source is the folder above the file (`...\\Angioectasia\\KID\\x.jpg` -> KID)."""
    if dataset.lower() == "capsulevision" and len(path.parts) >= 2:
        return path.parent.name
    return dataset


@reader("seed_csv", ("path", "root", "label_column", "folds", "split", "class_mapping"))
def read_seed_csv(spec: dict[str, Any], where: str) -> list[Sample]:
    """The seed's CSVs as they are: `frame_path` relative to `root` with Windows separators, the seed's labels
    mapped through its class_mapping.json, an empty `patient_id` grouped by what the file name carries
    (`ce24_group`), `split` selecting folds by the seed's convention (or `folds` by number)."""
    path = Path(_need(spec, "path", where))
    root = Path(spec.get("root") or path.parent)
    label_col = spec.get("label_column", "class")
    folds = spec.get("folds")
    folds = None if folds is None else {str(f) for f in (folds if isinstance(folds, list) else [folds])}
    split = spec.get("split")
    if split is not None and split not in SEED_SPLITS:
        raise DataError(f"{where}: split is one of {', '.join(SEED_SPLITS)} (the seed's folds), not {split!r}")
    if split is not None and folds is not None:
        raise DataError(f"{where}: give split or folds, not both")
    mapping = None
    if spec.get("class_mapping"):
        mapping = read_class_mapping(Path(spec["class_mapping"]), spec.get("_classes"))
    rows = _read_csv(path)
    need = ["dataset", "patient_id", "frame_path", label_col] + (["fold"] if folds or split else [])
    missing = [c for c in need if rows and c not in rows[0]]
    if missing:
        raise DataError(f"{path}: missing columns {missing}")
    out, absent = [], []
    for line, row in enumerate(rows, start=2):
        if folds is not None and str(row["fold"]).strip() not in folds:
            continue
        if split is not None:
            try:
                fold = int(float(row["fold"]))
            except ValueError:
                raise DataError(f"{path}: line {line}: fold {row['fold']!r} is not a number") from None
            if not SEED_SPLITS[split](fold):
                continue
        rel = Path(row["frame_path"].replace("\\", "/"))
        p = rel if rel.is_absolute() else root / rel
        if not p.is_file():
            absent.append(str(p))
            continue
        label = row[label_col]
        if mapping is not None:
            if label not in mapping:
                raise DataError(f"{path}: line {line}: label {label!r} is not in {spec['class_mapping']} "
                                f"(it maps {', '.join(mapping)})")
            label = mapping[label]
        source = _seed_source(row["dataset"], rel)
        patient = row["patient_id"].strip()
        group = f"{source}/patient-{patient}" if patient else ce24_group(source, p.stem)
        out.append(Sample(str(p), label, group, spec.get("name", source), p.name))
    if absent:
        raise DataError(f"{path}: {len(absent)} listed images are missing under {root} (first: {absent[0]}); "
                        "frame_path is relative to the spec's root")
    return out


@reader("recording", ("labels", "frame_column", "label_column", "label_columns", "none_label", "on_multiple",
                      "every", "select", "video", "frames", "frame_pattern", "file_column", "group"))
def read_recording(spec: dict[str, Any], where: str) -> list[Sample]:
    """Labelled frames of one recording: a video file (`video`, frames decoded by number) or a folder of
    extracted frames (`frames` + `frame_pattern`, as Galar ships them, or `file_column`: the CSV names each frame's
    file, as `capsule-batch export --labels` writes it), with a per-frame label CSV (`select` keeps the rows of one
    video from a metadata file covering many, as Kvasir-Capsule's does)."""
    labels = Path(_need(spec, "labels", where))
    frame_col = spec.get("frame_column", "frame")
    every = int(spec.get("every", 1))
    rows = _read_csv(labels)
    label_of = _row_labeller(spec, labels, where, list(rows[0]) if rows else [])
    if rows and frame_col not in rows[0]:
        raise DataError(f"{labels}: needs the frame column {frame_col!r}, has {list(rows[0])}")
    if rows and spec.get("file_column") and spec["file_column"] not in rows[0]:
        raise DataError(f"{labels}: needs the file column {spec['file_column']!r}, has {list(rows[0])}")
    select = spec.get("select") or {}  # one metadata file for many videos: keep this video's rows
    unknown = [k for k in select if rows and k not in rows[0]]
    if unknown:
        raise DataError(f"{labels}: select on missing columns {unknown}")
    rows = [r for r in rows if all(r[k] == str(v) for k, v in select.items())]
    if spec.get("video"):
        video = Path(spec["video"])
        if not video.is_file():
            raise DataError(f"{video}: no such video")
        from train.frame_refs import frame_count

        n, stem = frame_count(video), video.stem
    else:
        folder = Path(_need(spec, "frames", where))
        if not folder.is_dir():
            raise DataError(f"{folder}: no such frame folder")
        pattern, stem = spec.get("frame_pattern", "frame_{frame}.png"), folder.name
    name = spec.get("name", stem)
    group = f"{name}/{spec.get('group', stem)}"
    out = []
    for line, row in enumerate(rows, start=2):
        try:
            i = int(row[frame_col])
        except ValueError:
            raise DataError(f"{labels}: line {line}: frame {row[frame_col]!r} is not a frame number") from None
        label = label_of(row, line)
        if i % every or label is None:
            continue
        if spec.get("video"):
            if not 0 <= i < n:
                raise DataError(f"{labels}: frame {i} is outside {video} ({n} frames)")
            out.append(Sample(str(video), label, group, name, f"{stem}_{i}.jpg", frame=i, position=i))
        else:
            file_col = spec.get("file_column")
            p = folder / (row[file_col] if file_col else pattern.format(frame=i))
            if not p.is_file():
                raise DataError(f"{labels}: frame {i} has no file {p}")
            out.append(Sample(str(p), label, group, name, f"{stem}_{p.name}", position=i))
    label_of.report()
    return out


def is_set(value: Any) -> bool:
    """A one-hot/multi-hot cell: a number equal to 1 or 0 (1, 1.0, "1.00"), true/false, yes/no, empty = 0;
    ValueError otherwise."""
    text = str(value if value is not None else "").strip().lower()
    words = {"": False, "false": False, "no": False, "true": True, "yes": True}
    if text in words:
        return words[text]
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if number in (0.0, 1.0):
        return number == 1.0
    raise ValueError(f"{value!r} is not 0 or 1")


class _Labeller:
    """A row of a label CSV -> its label, or None for a row left out; `report` logs what was left out."""

    def __call__(self, row: dict[str, str], line: int) -> str | None:
        raise NotImplementedError

    def report(self) -> None:
        pass


class _MultiHot(_Labeller):
    """Per-frame labels from one-hot/multi-hot columns (Galar's per-frame CSVs: one 0/1 column per finding).

    `columns` are read in the listed order; a row with one of them set gets that column's name as its
    label; with none set, `none_label` (or the row is left out); with several, `on_multiple`: `exclude`
    (left out) or `first` (the first listed column wins, so the list is a priority order). Rows left out
    are counted and logged, never dropped silently."""

    def __init__(self, path: Path, columns: list[str], none_label: str | None, on_multiple: str):
        self.path, self.columns, self.none_label, self.on_multiple = path, columns, none_label, on_multiple
        self.left_out: collections.Counter[str] = collections.Counter()

    def __call__(self, row: dict[str, str], line: int) -> str | None:
        hot = []
        for c in self.columns:
            try:
                if is_set(row[c]):
                    hot.append(c)
            except ValueError as e:
                raise DataError(f"{self.path}: line {line}, column {c!r}: {e}") from None
        if len(hot) == 1:
            return hot[0]
        if not hot:
            if self.none_label is None:
                self.left_out["no label column set"] += 1
            return self.none_label
        if self.on_multiple == "first":
            return hot[0]
        self.left_out["several label columns set"] += 1
        return None

    HINTS = {"no label column set": "none_label: <label> keeps them",
             "several label columns set": "on_multiple: first keeps them, by column order"}

    def report(self) -> None:
        for why, n in sorted(self.left_out.items()):
            _logger.warning("%s: %d frames left out: %s (%s)", self.path, n, why, self.HINTS[why])


class _OneColumn(_Labeller):
    def __init__(self, column: str):
        self.column = column

    def __call__(self, row: dict[str, str], line: int) -> str | None:
        return row[self.column]


def _row_labeller(spec: dict[str, Any], path: Path, where: str, header: list[str]) -> _Labeller:
    """`label_column` (one column holding the label) or `label_columns` (one-hot/multi-hot, see _MultiHot)."""
    columns = spec.get("label_columns")
    if columns is None:
        col = spec.get("label_column", "label")
        if header and col not in header:
            raise DataError(f"{path}: needs the label column {col!r}, has {header}")
        return _OneColumn(col)
    if "label_column" in spec:
        raise DataError(f"{where}: give label_column or label_columns, not both")
    if isinstance(columns, str) or not columns or not all(isinstance(c, str) and c for c in columns):
        raise DataError(f"{where}: label_columns is a list of column names")
    if len(set(columns)) != len(columns):
        raise DataError(f"{where}: label_columns lists a column twice")
    missing = [c for c in columns if header and c not in header]
    if missing:
        raise DataError(f"{path}: label_columns {missing} are not columns of the file (has {header})")
    on_multiple = spec.get("on_multiple", "exclude")
    if on_multiple not in ("exclude", "first"):
        raise DataError(f"{where}: on_multiple is 'exclude' or 'first', not {on_multiple!r}")
    none_label = spec.get("none_label")
    return _MultiHot(path, list(columns), None if none_label in (None, "") else str(none_label), on_multiple)


@reader("merged", ("mapping", "granularity", "sources"))
def read_merged(spec: dict[str, Any], where: str) -> list[Sample]:
    """Several sources relabelled through a mapping CSV (`source, label, <one column per granularity>`).

    Labels without a row are excluded and counted (never relabelled); a row whose target is empty or `-`
    excludes that label on purpose.
    """
    mapping_path = Path(_need(spec, "mapping", where))
    granularity = _need(spec, "granularity", where)
    rows = _read_csv(mapping_path)
    if not rows or not {"source", "label", granularity} <= set(rows[0]):
        have = list(rows[0]) if rows else []
        raise DataError(f"{mapping_path}: needs columns source, label, {granularity} (has {have})")
    table: dict[tuple[str, str], str] = {}
    for row in rows:
        key = (row["source"].strip(), row["label"].strip())
        if key in table and table[key] != row[granularity].strip():
            raise DataError(f"{mapping_path}: {key} is mapped twice")
        table[key] = row[granularity].strip()
    sources = spec.get("sources") or []
    if not sources:
        raise DataError(f"{where}: a merged dataset needs 'sources'")
    out: list[Sample] = []
    unmapped: collections.Counter[tuple[str, str]] = collections.Counter()
    excluded: collections.Counter[tuple[str, str]] = collections.Counter()
    for k, sub in enumerate(sources):
        name = _need(sub, "name", f"{where}.sources.{k}")
        for s in read_spec({**sub}, f"{where}.sources.{k}"):
            target = table.get((name, s.label))
            if target is None:
                unmapped[(name, s.label)] += 1
            elif target.lower() in EXCLUDE_TARGETS:
                excluded[(name, s.label)] += 1
            else:
                out.append(replace(s, label=target, source=name, group=f"{name}/{s.group}"))
    for (src, lab), n in sorted(unmapped.items()):
        _logger.warning("%s: %d images of %s label %r are not in the mapping: excluded", mapping_path, n, src, lab)
    if excluded:
        _logger.info("%s: %d images excluded by the mapping", mapping_path, sum(excluded.values()))
    _logger.info("%s: %d images mapped, %d unmapped (excluded), %d excluded by mapping", mapping_path, len(out),
                 sum(unmapped.values()), sum(excluded.values()))
    return out


def read_spec(spec: dict[str, Any], where: str, classes: list[str] | None = None) -> list[Sample]:
    """Samples of one dataset spec; `classes` (the target class set) lets a reader map label indices (the seed's
    class_mapping.json) onto class names."""
    if not isinstance(spec, dict) or "kind" not in spec:
        raise DataError(f"{where}: a dataset spec is a mapping with 'kind' ({', '.join(READERS)})")
    fn = READERS.get(spec["kind"])
    if fn is None:
        raise DataError(f"{where}: unknown dataset kind {spec['kind']!r} (choose from {', '.join(READERS)})")
    unknown = sorted(set(spec) - READER_KEYS[spec["kind"]])
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown} for a {spec['kind']} dataset "
                        f"(it reads {', '.join(sorted(READER_KEYS[spec['kind']]))})")
    return fn({**spec, "_classes": classes} if classes is not None else spec, where)


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    try:
        dialect = csv.Sniffer().sniff(text.splitlines()[0] if text else ",", delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    return [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in csv.DictReader(text.splitlines(),
                                                                                             dialect=dialect)]


def read_xlsx(path: Path) -> list[tuple[Any, ...]]:
    """All rows of the first sheet (header first)."""
    try:
        import openpyxl
    except ImportError:
        from capsule_batch.errors import MissingPackageError

        raise MissingPackageError("openpyxl", "train", "reading CE24 xlsx files") from None
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # openpyxl raises many types for a broken file
        raise DataError(f"{path}: not a readable xlsx file ({e})") from e
    try:
        return [tuple(r) for r in wb.worksheets[0].iter_rows(values_only=True)]
    finally:
        wb.close()


# ----------------------------------------------------------------------------------------------
# Class sets, mapping onto them, checks


def class_list(spec: Any) -> list[str]:
    if isinstance(spec, list):
        return validate_class_names(spec, "data.classes")
    return resolve_classes(str(spec))


def build_samples(specs: list[dict[str, Any]], classes: list[str], where: str) -> list[Sample]:
    """Read every spec of one set; a label outside the class set is an error naming it (map it instead)."""
    out: list[Sample] = []
    for k, spec in enumerate(specs or []):
        samples = read_spec(spec, f"{where}.{k}", classes)
        bad = collections.Counter(s.label for s in samples if s.label not in classes)
        if bad:
            shown = ", ".join(f"{lab!r} ({n})" for lab, n in bad.most_common(5))
            hint = ("give the seed's class_mapping.json as the spec's class_mapping" if spec.get("kind") == "seed_csv"
                    else "use a 'merged' dataset with a mapping file to relabel or exclude them")
            raise DataError(f"{where}.{k}: labels not in the class set: {shown} -- {hint}")
        out.extend(samples)
    return out


def check_images(samples: list[Sample], workers: int = 4) -> tuple[list[Sample], list[str]]:
    """Decode every sample once; return the readable ones and their pixel hashes. Corrupt ones are
    counted and skipped (logged), so every later count refers to images that can be scored."""

    def one(s: Sample) -> str | None:
        try:
            arr = np.asarray(load_rgb(s))
        except Exception as e:  # any decoder error means the same thing: this image cannot be used
            _logger.warning("skipping unreadable image %s%s: %s", s.ref, "" if s.frame is None else f"#{s.frame}", e)
            return None
        return hashlib.sha1(arr.tobytes() + str(arr.shape).encode()).hexdigest()

    with ThreadPoolExecutor(max(1, workers)) as pool:
        hashes = list(pool.map(one, samples))
    good = [(s, h) for s, h in zip(samples, hashes, strict=True) if h is not None]
    bad = len(samples) - len(good)
    if bad:
        _logger.warning("%d of %d images are corrupt or unreadable: skipped", bad, len(samples))
    return [s for s, _ in good], [h for _, h in good]


def check_leakage(a: list[Sample], b: list[Sample], a_hash: list[str] | None = None,
                  b_hash: list[str] | None = None, names: tuple[str, str] = ("train", "val")) -> list[str]:
    """Problems (empty when clean): a file name, a group, or pixel content present in both sets."""
    problems = []
    same_names = sorted({s.name for s in a} & {s.name for s in b})
    if same_names:
        problems.append(f"{len(same_names)} file names in both {names[0]} and {names[1]} (e.g. {same_names[0]})")
    if a_hash is not None and b_hash is not None:
        same_px = set(a_hash) & set(b_hash)
        if same_px:
            ex = next(s.ref for s, h in zip(b, b_hash, strict=True) if h in same_px)
            problems.append(f"{len(same_px)} images with the same pixels in both {names[0]} and {names[1]} (e.g. {ex})")
    return problems


OVERLAP_POLICIES = ("refuse", "keep", "drop_from_val", "resplit")
DUPLICATE_RULES = ("keep", "first", "drop")


def _counts(samples: list[Sample]) -> dict[str, Any]:
    by_class = collections.Counter(s.label for s in samples)
    by_source = collections.Counter(s.source for s in samples)
    return {"images": len(samples), "per_class": dict(sorted(by_class.items())),
            "per_source": dict(sorted(by_source.items()))}


@dataclass
class Overlap:
    """What validation shares with training: images (same source and file name, or same decoded pixels) and
    patients/recordings (groups). `val_index` are the indices of the shared validation images."""

    val_index: list[int]
    train_index: list[int]
    why: dict[int, str]  # val index -> "name+pixels" | "name" | "pixels"
    groups: list[str]

    @property
    def images(self) -> int:
        return len(self.val_index)

    def summary(self, train: list[Sample], val: list[Sample]) -> dict[str, Any]:
        kinds = collections.Counter(self.why.values())
        group_sources = collections.Counter(g.split("/", 1)[0] for g in self.groups)
        return {"val_images_also_in_train": _counts([val[i] for i in self.val_index]),
                "train_images_also_in_val": _counts([train[i] for i in self.train_index]),
                "matched_by": dict(sorted(kinds.items())),
                "groups_on_both_sides": len(self.groups), "groups_on_both_sides_per_source": dict(group_sources)}

    def rows(self, train: list[Sample], val: list[Sample]) -> list[dict[str, str]]:
        """The file list: every shared image on both sides."""
        out = [{"split": "val", "source": val[i].source, "class": val[i].label, "name": val[i].name,
                "path": val[i].ref, "match": self.why[i]} for i in self.val_index]
        out += [{"split": "train", "source": train[i].source, "class": train[i].label, "name": train[i].name,
                 "path": train[i].ref, "match": ""} for i in self.train_index]
        return out


def find_overlap(train: list[Sample], val: list[Sample], train_hash: list[str] | None,
                 val_hash: list[str] | None) -> Overlap:
    """Validation images that training also holds (by source + file name, and by pixel hash where known), and the
    groups on both sides."""
    names = collections.defaultdict(list)
    for i, s in enumerate(train):
        names[(s.source, s.name)].append(i)
    pixels: dict[str, list[int]] = collections.defaultdict(list)
    if train_hash is not None and val_hash is not None:
        for i, h in enumerate(train_hash):
            pixels[h].append(i)
    why: dict[int, str] = {}
    train_hit: set[int] = set()
    for i, s in enumerate(val):
        by_name = names.get((s.source, s.name), [])
        by_px = pixels.get(val_hash[i], []) if val_hash is not None and pixels else []
        if by_name or by_px:
            why[i] = "name+pixels" if by_name and by_px else ("name" if by_name else "pixels")
            train_hit.update(by_name)
            train_hit.update(by_px)
    groups = sorted({s.group for s in train} & {s.group for s in val})
    return Overlap(sorted(why), sorted(train_hit), why, groups)


def write_overlap(overlap: Overlap, train: list[Sample], val: list[Sample], folder: Path) -> None:
    """overlap.json (counts) and overlap.csv (the file list) in a run folder."""
    import json

    (folder / "overlap.json").write_text(json.dumps(overlap.summary(train, val), indent=2), encoding="utf-8")
    with open(folder / "overlap.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, ["split", "source", "class", "name", "path", "match"])
        w.writeheader()
        w.writerows(overlap.rows(train, val))


def log_overlap(overlap: Overlap, train: list[Sample], val: list[Sample], policy: str) -> None:
    summ = overlap.summary(train, val)
    shared = summ["val_images_also_in_train"]
    _logger.warning("train/val overlap (data.overlap=%s): %d validation images are also in training (matched by %s); "
                    "per class %s; per source %s", policy, shared["images"], summ["matched_by"], shared["per_class"],
                    shared["per_source"])
    if overlap.groups:
        _logger.warning("train/val overlap: %d patients/recordings on both sides (per source %s, e.g. %s)",
                        len(overlap.groups), summ["groups_on_both_sides_per_source"], overlap.groups[0])


def within_split_duplicates(samples: list[Sample], hashes: list[str] | None, rule: str,
                            classes: list[str], where: str) -> tuple[list[Sample], list[str] | None, dict[str, Any]]:
    """Images stored under several class folders of one split (SEE-AI images with several findings: same name, same
    pixels): `keep` every copy with its folder's label (as the challenge lists and scores them), `first` only the
    copy whose class comes first in the class order, `drop` all copies. Returns the samples, their hashes and the
    counts."""
    if rule not in DUPLICATE_RULES:
        raise DataError(f"data.duplicates is one of {', '.join(DUPLICATE_RULES)}, not {rule!r}")
    copies: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    for i, s in enumerate(samples):
        copies[(s.source, s.name)].append(i)
    multi = {k: v for k, v in copies.items() if len({samples[i].label for i in v}) > 1}
    info = {"images_under_several_classes": len(multi),
            "copies": sum(len(v) for v in multi.values()),
            "per_source": dict(sorted(collections.Counter(k[0] for k in multi).items())), "rule": rule}
    if not multi:
        return samples, hashes, info
    order = {c: i for i, c in enumerate(classes)}
    drop: set[int] = set()
    for idx in multi.values():
        if rule == "drop":
            drop.update(idx)
        elif rule == "first":
            keep = min(idx, key=lambda i: (order.get(samples[i].label, len(order)), i))
            drop.update(i for i in idx if i != keep)
    _logger.warning("%s: %d images are stored under several class folders (%d copies, per source %s): %s", where,
                    info["images_under_several_classes"], info["copies"], info["per_source"],
                    {"keep": "every copy kept with its folder's label",
                     "first": "only the copy of the first class (class order) kept",
                     "drop": "all copies left out"}[rule])
    info["left_out"] = len(drop)
    kept = [i for i in range(len(samples)) if i not in drop]
    return [samples[i] for i in kept], None if hashes is None else [hashes[i] for i in kept], info


def merge_pixel_groups(samples: list[Sample], hashes: list[str] | None) -> list[Sample]:
    """Give images with identical pixels one group (the first one's), so a grouped split keeps them together."""
    if hashes is None:
        return samples
    first: dict[str, str] = {}
    out = []
    for s, h in zip(samples, hashes, strict=True):
        g = first.setdefault(h, s.group)
        out.append(s if g == s.group else replace(s, group=g))
    return out


def check_groups(a: list[Sample], b: list[Sample]) -> list[str]:
    both = sorted({s.group for s in a} & {s.group for s in b})
    return [f"{len(both)} patients/recordings on both sides of the split (e.g. {both[0]})"] if both else []


def grouped_split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A stratified split that keeps every patient/recording on one side (sklearn StratifiedGroupKFold)."""
    tr, va = grouped_split_indices(samples, val_fraction, seed)
    return [samples[i] for i in tr], [samples[i] for i in va]


def grouped_split_indices(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of `grouped_split`'s two sides."""
    from sklearn.model_selection import StratifiedGroupKFold

    if not 0 < val_fraction < 1:
        raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    groups = sorted({s.group for s in samples})
    n_splits = max(2, round(1 / val_fraction))
    if len(groups) < n_splits:
        raise DataError(f"cannot split {len(groups)} patients/recordings into a {val_fraction:.0%} validation part "
                        f"(needs at least {n_splits})")
    y = [s.label for s in samples]
    g = [s.group for s in samples]
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    tr, va = next(folds.split(np.zeros(len(samples)), y, g))
    problems = check_groups([samples[i] for i in tr], [samples[i] for i in va])
    if problems:  # StratifiedGroupKFold guarantees this; a wrong group key would break it
        raise DataError("grouped split: " + "; ".join(problems))
    return [int(i) for i in tr], [int(i) for i in va]


def class_counts(samples: list[Sample], classes: list[str]) -> dict[str, int]:
    c = collections.Counter(s.label for s in samples)
    return {k: c.get(k, 0) for k in classes}


# ----------------------------------------------------------------------------------------------
# torch datasets


class ImageDataset:
    """Samples -> (tensor, label index, sample index). A sample that fails to load yields None (counted by
    the collate function), so a file that breaks during training is skipped, not fatal."""

    def __init__(self, samples: list[Sample], classes: list[str], transform: Callable[[Any], Any]):
        self.samples = samples
        self.index = {c: i for i, c in enumerate(classes)}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def labels(self) -> np.ndarray:
        return np.asarray([self.index[s.label] for s in self.samples], np.int64)

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        s = self.samples[i]
        try:
            x = self.transform(load_rgb(s))
        except Exception as e:  # a decoder error on one file must not end a long run
            _logger.warning("skipping %s: %s", s.ref, e)
            x = None
        return x, self.index[s.label], i


def collate(batch: list[tuple[Any, int, int]]) -> tuple[Any, Any, Any, int]:
    """Stack the loadable items; the 4th element counts the skipped ones."""
    import torch

    ok = [b for b in batch if b[0] is not None]
    if not ok:
        return None, None, None, len(batch)
    x = torch.stack([b[0] for b in ok])
    y = torch.tensor([b[1] for b in ok], dtype=torch.long)
    idx = torch.tensor([b[2] for b in ok], dtype=torch.long)
    return x, y, idx, len(batch) - len(ok)
