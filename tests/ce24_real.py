"""A small tree with the properties of the official Capsule Vision 2024 download, and the seed's files for it.

From the challenge's own file lists: `training/<Class>/<Source>/<file>` and `validation/...`; the class folder
"Foreign Body" with a space; Kvasir-Capsule names `<16 hex>_<frame>.jpg` (video id + frame) with one video's
frames in both splits; SEE-AI names `image<5 digits>.jpg`, an image with several findings stored once per class
folder (same name, same pixels) within a split, and some such images in both splits; KID names
`<class>-P<patient>-<n>.jpg`; AIIMS only in Ulcer and Worms; the ground-truth xlsx with Windows backslash
`image_path`s, `Dataset` and one-hot class columns; the seed's `train_val.csv` / `test.csv` (`frame_path` like
`capsulevision\\training\\...` relative to the folder above the CE24 root, the seed's label names, empty
`patient_id`s, fold 0 = validation, >= 1 = training, -1 = test) and `class_mapping.json`. Not from the lists: the
AIIMS file names (`aiims<n>.jpg` here) and the pixels (smooth random images of 336x336, 576x576 and 512x384).
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from capsule_batch.model.classes import CE24_CLASSES

SEED_NAMES = ["angioectasia", "bleeding", "erosion", "erythema", "foreign-body", "lymphangiectasia", "normal-mucosa",
              "polyp", "ulcer", "worms"]
SEED_DATASET = {"KID": "kid", "KVASIR": "kvasircapsule", "SEE-AI": "seeai", "AIIMS": "aiims"}
SIZES = {"KVASIR": (336, 336), "SEE-AI": (576, 576), "KID": (384, 512), "AIIMS": (384, 512)}  # (h, w)
VIDEOS = ["04a78ef00c5245e0", "3ada4222967f421d", "d369e4f163df4aba"]


@dataclass
class Ce24Tree:
    base: Path  # holds capsulevision/ (the seed's data root) and the seed's CSVs
    root: Path  # base/capsulevision: the CE24 root (training/, validation/, testing/)
    files: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)  # split -> (class, source, name)
    multi_within: dict[str, list[str]] = field(default_factory=dict)  # split -> names under several classes
    in_both: list[str] = field(default_factory=list)  # names (same pixels) in training and validation

    def count(self, split: str) -> Counter:
        return Counter(c for c, _, _ in self.files[split])


def _image(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    small = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    noise = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float64) + noise, 0, 255).astype(np.uint8))


def make_ce24_tree(base: Path, per_cell: int = 2, seed: int = 0) -> Ce24Tree:
    """Write the tree under `base/capsulevision` plus `base/train_val.csv`, `base/test.csv`,
    `base/class_mapping.json` and `<root>/<split>_data.xlsx`."""
    import openpyxl

    rng = np.random.default_rng(seed)
    root = base / "capsulevision"
    tree = Ce24Tree(base, root, {"training": [], "validation": []}, {"training": [], "validation": []})
    sources_of = {c: ["KVASIR", "SEE-AI"] for c in CE24_CLASSES}
    for c in ("Angioectasia", "Bleeding", "Lymphangiectasia", "Normal", "Polyp"):
        sources_of[c].append("KID")
    for c in ("Ulcer", "Worms"):
        sources_of[c] = [s for s in sources_of[c] if s != "SEE-AI"] + ["AIIMS"]
    sources_of["Worms"] = ["AIIMS"]
    pixels: dict[str, Image.Image] = {}
    counter = Counter()

    def put(split: str, cls: str, source: str, name: str, img: Image.Image) -> None:
        folder = root / split / cls / source
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / name, quality=90)
        tree.files[split].append((cls, source, name))

    for split in ("training", "validation"):
        for cls in CE24_CLASSES:
            for source in sources_of[cls]:
                for _ in range(per_cell):
                    counter[source] += 1
                    n = counter[source]
                    if source == "KVASIR":  # one video's frames lie in both splits, as in the official split
                        name = f"{VIDEOS[n % len(VIDEOS)]}_{1000 + 37 * n}.jpg"
                    elif source == "SEE-AI":
                        name = f"image{100 + n:05d}.jpg"
                    elif source == "KID":
                        name = f"{cls.lower()}-P{n % 3}-{n}.jpg"
                    else:
                        name = f"aiims{n}.jpg"
                    h, w = SIZES[source]
                    img = _image(rng, h, w)
                    pixels[name] = img
                    put(split, cls, source, name, img)
        # SEE-AI images with several findings: the same file under a second class folder of this split
        see = [(c, n) for c, s, n in tree.files[split] if s == "SEE-AI"]
        for cls, name in (see[0], see[3]):
            other = "Erythema" if cls != "Erythema" else "Erosion"
            put(split, other, "SEE-AI", name, pixels[name])
            tree.multi_within[split].append(name)
    # SEE-AI images in both splits: training files also stored (same name, same pixels) in validation
    for cls, _, name in [f for f in tree.files["training"] if f[1] == "SEE-AI"][5:8]:
        put("validation", cls, "SEE-AI", name, pixels[name])
        tree.in_both.append(name)
    # testing/Images/<10 random chars>.jpg
    letters = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    test = []
    (root / "testing" / "Images").mkdir(parents=True)
    for _ in range(4):
        name = "".join(rng.choice(letters, 10)) + ".jpg"
        _image(rng, *SIZES["KVASIR"]).save(root / "testing" / "Images" / name, quality=90)
        test.append(name)
    tree.files["testing"] = [("", "", n) for n in test]

    for split in ("training", "validation"):
        wb = openpyxl.Workbook()
        ws = wb.active
        ws.append(["image_path", "Dataset", *CE24_CLASSES])
        for cls, source, name in tree.files[split]:
            ws.append([f"{split}\\{cls}\\{source}\\{name}", source, *[1 if c == cls else 0 for c in CE24_CLASSES]])
        wb.save(root / f"{split}_data.xlsx")

    header = ["dataset", "patient_id", "frame_path", "proposed_name", "class", "fold", "original_class"]
    with open(base / "train_val.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for split, fold in (("training", None), ("validation", 0)):
            for k, (cls, source, name) in enumerate(tree.files[split]):
                patient = name.split("-")[1][1:] if source == "KID" else ""
                w.writerow([SEED_DATASET[source], patient, f"capsulevision\\{split}\\{cls}\\{source}\\{name}", name,
                            SEED_NAMES[CE24_CLASSES.index(cls)], fold if fold is not None else 1 + k % 4, cls])
    with open(base / "test.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for name in test:
            w.writerow(["capsulevision", "", f"capsulevision\\testing\\Images\\{name}", name, "", -1, ""])
    (base / "class_mapping.json").write_text(json.dumps({n: i for i, n in enumerate(SEED_NAMES)}), encoding="utf-8")
    return tree


def copy_tree(tree: Ce24Tree, dst: Path) -> Ce24Tree:
    shutil.copytree(tree.base, dst)
    return Ce24Tree(dst, dst / "capsulevision", tree.files, tree.multi_within, tree.in_both)
