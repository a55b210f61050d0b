"""Synthetic labelled images in the CE24 layout, from capsule_batch.sources.synthesize scenes (tests and demos).

Each (class, recording) pair is one synthetic scene whose frames showing the class are kept, so every
recording holds several similar frames: exactly the grouping a patient-level split must respect.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from capsule_batch.model.classes import CE24_CLASSES
from capsule_batch.sources.synthesize import NORMAL, Scene


def class_frames(cls: str, n: int, size: int, seed: int, zoom: float = 2.0) -> Iterator[tuple[int, np.ndarray]]:
    """Up to `n` (frame number, RGB frame) pairs of one synthetic recording that show `cls`.

    The scene is rendered `zoom` times larger and its centre cut out, so a finding covers a larger part of
    the image (tiny test models learn it in a few epochs); frames whose finding lies outside the cut are
    not used."""
    frames = max(60, 4 * n)
    big = int(round(size * zoom / 2)) * 2
    per_1000 = 120.0 if cls != NORMAL else 40.0
    finding_classes = (cls,) if cls != NORMAL else ("Polyp",)
    scene = Scene(big, frames, seed, 4.0, per_1000, finding_classes)
    lo = (big - size) // 2
    k = 0
    for i in range(frames):
        if scene.label(i) != cls:
            continue
        if cls != NORMAL and not _finding_in_view(scene, i, lo, lo + size):
            continue
        yield i, scene.render(i)[lo : lo + size, lo : lo + size]
        k += 1
        if k >= n:
            return


def _finding_in_view(scene: Scene, i: int, lo: int, hi: int) -> bool:
    t = scene.tex_size
    ox, oy = scene.path[i]
    for f in scene.findings:
        if f.start <= i <= f.end:
            cx, cy = (f.tx - int(ox)) % t, (f.ty - int(oy)) % t
            m = f.radius * 0.5
            return lo + m <= cx <= hi - m and lo + m <= cy <= hi - m
    return False


def make_ce24_folder(root: str | Path, per_class: int = 12, recordings: int = 2, size: int = 80, seed: int = 0,
                     splits: tuple[str, ...] = ("training", "validation"),
                     sources: tuple[str, ...] = ("KID", "KVASIR"), classes: tuple[str, ...] = CE24_CLASSES,
                     xlsx: bool = True) -> dict[str, int]:
    """Write `<root>/<split>/<Class>/<Source>/<recording>_<frame>.jpg` and, with `xlsx`, the ground-truth
    `<root>/<split>_data.xlsx` (image_path relative to the split, Dataset, one-hot class columns).
    Returns the image count per split."""
    from PIL import Image

    root = Path(root)
    counts = {}
    for si, split in enumerate(splits):
        rows = []
        for ci, cls in enumerate(classes):
            for r in range(recordings):
                source = sources[r % len(sources)]
                folder = root / split / cls / source
                folder.mkdir(parents=True, exist_ok=True)
                rec_seed = seed * 100_003 + si * 10_007 + ci * 101 + r
                stem = f"{split[:3]}{cls.replace(' ', '')[:6].lower()}{r}"
                for i, img in class_frames(cls, per_class // recordings, size, rec_seed):
                    name = f"{stem}_{i}.jpg"
                    Image.fromarray(img).save(folder / name, quality=92)
                    rows.append((f"{cls}/{source}/{name}", source, cls))
        counts[split] = len(rows)
        if xlsx:
            import openpyxl

            wb = openpyxl.Workbook()
            ws = wb.active
            ws.append(["image_path", "Dataset", *CE24_CLASSES])
            for path, source, cls in rows:
                ws.append([path, source, *[1 if c == cls else 0 for c in CE24_CLASSES]])
            wb.save(root / f"{split}_data.xlsx")
    return counts
