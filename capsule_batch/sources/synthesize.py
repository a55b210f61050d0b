"""Synthetic capsule-like recordings with ground truth, deterministic by seed.

Frames are textured mucosa seen through a capsule's round field of view: a toroidal texture crop that
drifts slowly (camera motion), vignetting, slow lighting changes, and injected findings of CE24
classes over known frame ranges. Each finding has its own look (a red pool for bleeding, a shaded
bump for a polyp, a white base with a red rim for an ulcer, ...) so that a small model can learn
them. Recordings are written with real encoders (PyAV's FFmpeg: libx264, MJPEG, libvpx-vp9) or as
PNG/JPEG frame folders, with `<stem>.labels.csv` (frame -> class) and `<stem>.findings.csv` (one
row per injected finding) beside them.

A `Style` changes how the camera sees the same scene (overall lighting, a colour cast, the texture's
scale, the strength of the vignetting) without changing its schedule of findings: recordings of one
seed in two styles show the same findings on the same frames in two visual domains. The default
style is the original look, byte for byte.

An optional stamp encodes the frame number as 20 black/white cells in the top-left corner, sized
relative to the frame so it survives resizing; `read_stamp` reads it back.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from capsule_batch.errors import CapsuleError
from capsule_batch.files import output_folder_problem
from capsule_batch.model.classes import CE24_CLASSES

_logger = logging.getLogger(__name__)

#: codec name -> (file suffix, FFmpeg encoder, pixel format); frame folders have no encoder.
CODECS: dict[str, tuple[str, str | None, str | None]] = {
    "h264": (".mp4", "libx264", "yuv420p"),
    "mjpeg": (".avi", "mjpeg", "yuvj420p"),
    "vp9": (".webm", "libvpx-vp9", "yuv420p"),
    "png": ("", None, None),
    "jpg": ("", None, None),
}
SUFFIX_TO_CODEC = {".mp4": "h264", ".avi": "mjpeg", ".webm": "vp9"}
FINDING_CLASSES = tuple(c for c in CE24_CLASSES if c != "Normal")
NORMAL = "Normal"
STAMP_BITS = 20
_STAMP_COLS, _STAMP_ROWS, _STAMP_DIV = 10, 2, 21.0


@dataclass(frozen=True)
class Finding:
    """One injected finding: `cls` visible on frames start..end (inclusive) at texture position (tx, ty)."""

    cls: str
    start: int
    end: int
    tx: float
    ty: float
    radius: float
    seed: int


@dataclass(frozen=True)
class Style:
    """How the camera renders a scene: one visual domain. The defaults are the original look.

    `lighting` scales the illumination, `color_cast` multiplies R, G, B (white balance of another sensor),
    `texture_scale` > 1 magnifies the mucosa texture about the frame centre (a closer or wider-angle camera;
    findings keep their size), `vignette` scales the darkening towards the edge (0: none, 1: the original).
    """

    lighting: float = 1.0
    color_cast: tuple[float, float, float] = (1.0, 1.0, 1.0)
    texture_scale: float = 1.0
    vignette: float = 1.0

    def __post_init__(self) -> None:
        cast = tuple(float(c) for c in self.color_cast)
        object.__setattr__(self, "color_cast", cast)
        if not 0 < self.lighting <= 4:
            raise CapsuleError(f"lighting must be in (0, 4], got {self.lighting}")
        if len(cast) != 3 or not all(0 < c <= 4 for c in cast):
            raise CapsuleError(f"color cast must be three gains in (0, 4], got {self.color_cast}")
        if not 0.25 <= self.texture_scale <= 8:
            raise CapsuleError(f"texture scale must be in [0.25, 8], got {self.texture_scale}")
        if not 0 <= self.vignette <= 4:
            raise CapsuleError(f"vignette must be in [0, 4], got {self.vignette}")

    def to_dict(self) -> dict[str, object]:
        return {"lighting": self.lighting, "color_cast": list(self.color_cast), "texture_scale": self.texture_scale,
                "vignette": self.vignette}


DEFAULT_STYLE = Style()


@dataclass
class SynthResult:
    path: Path
    labels_csv: Path
    findings_csv: Path
    frames: int
    fps: float
    findings: list[Finding]


def codec_for(path: str | os.PathLike, codec: str | None) -> str:
    """The codec to use for an output path: explicit, else from the suffix, else a PNG folder."""
    suffix = Path(path).suffix.lower()
    if codec is None:
        return SUFFIX_TO_CODEC.get(suffix, "png")
    if codec not in CODECS:
        raise CapsuleError(f"unknown codec {codec!r} (choose from {', '.join(CODECS)})")
    want = CODECS[codec][0]
    if want and suffix != want:
        raise CapsuleError(f"{path}: codec {codec} is written to a {want} file")
    if not want and suffix in SUFFIX_TO_CODEC:
        raise CapsuleError(f"{path}: codec {codec} writes a folder of frames, not a {suffix} file")
    return codec


# ----------------------------------------------------------------------------------------------
# Scene


def _smooth_noise(rng: np.random.Generator, size: int, octaves: tuple[int, ...]) -> np.ndarray:
    """Tileable multi-octave value noise in [0, 1], shape (size, size)."""
    out = np.zeros((size, size), np.float32)
    total = 0.0
    for i, cells in enumerate(octaves):
        grid = rng.random((cells, cells), dtype=np.float32)
        # tileable bilinear upsampling: wrap the grid by one cell
        grid = np.concatenate([grid, grid[:1]], 0)
        grid = np.concatenate([grid, grid[:, :1]], 1)
        t = np.linspace(0, cells, size, endpoint=False, dtype=np.float32)
        i0 = t.astype(np.int64)
        f = t - i0
        f = f * f * (3 - 2 * f)
        rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]
        layer = rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]
        w = 0.55**i
        out += w * layer
        total += w
    return out / total


class Scene:
    """Renders frame i of a recording; all randomness comes from the seed."""

    def __init__(self, size: int, frames: int, seed: int, fps: float, findings_per_1000: float,
                 classes: tuple[str, ...] = FINDING_CLASSES, stamp: bool = False, style: Style = DEFAULT_STYLE):
        self.size, self.frames, self.seed, self.stamp, self.style = size, frames, seed, stamp, style
        rng = np.random.default_rng(seed)
        self.tex_size = t = 4 * size
        n1 = _smooth_noise(rng, t, (6, 12, 24, 48, 96))
        n2 = _smooth_noise(rng, t, (4, 8, 16))
        folds = np.abs(np.sin(n2 * 18.0)) ** 0.35  # dark creases of mucosal folds
        villi = _smooth_noise(rng, t, (160,))
        base = np.array([205.0, 112.0, 88.0], np.float32)
        shade = (0.62 + 0.45 * n1) * (0.70 + 0.30 * folds) * (0.93 + 0.14 * villi)
        tint = np.stack([np.ones_like(n1), 0.92 + 0.2 * n2, 0.9 + 0.25 * n2], -1)
        self.texture = np.clip(base * shade[..., None] * tint, 0, 255).astype(np.float32)
        # camera path: slow drift with occasional faster movement, integrated velocity
        vel = rng.normal(0, 1, (max(frames, 1), 2)).astype(np.float32)
        k = max(1, int(fps * 4))
        kernel = np.ones(k, np.float32) / k
        vel = np.stack([np.convolve(vel[:, j], kernel, mode="same") for j in range(2)], 1) * 6.0
        self.path = np.cumsum(vel, 0) + rng.uniform(0, t, 2).astype(np.float32)
        # the style multiplies by exactly 1.0 by default, which leaves every value unchanged
        light = 0.9 + 0.1 * np.sin(np.arange(max(frames, 1)) / (fps * 20.0) + rng.uniform(0, 6.3))
        self.light = light * style.lighting
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        r = np.hypot(xx - size / 2 + 0.5, yy - size / 2 + 0.5) / (size / 2)
        self.vignette = (np.clip(1.05 - 0.55 * style.vignette * r**2, 0, 1) * (r < 0.98))[..., None].astype(np.float32)
        self.findings = self._schedule(rng, frames, fps, findings_per_1000, classes)
        self._patches: dict[Finding, tuple[np.ndarray, np.ndarray, int]] = {}
        self._by_frame: dict[int, Finding] = {}
        for f in self.findings:
            for i in range(f.start, f.end + 1):
                self._by_frame[i] = f

    def _schedule(self, rng: np.random.Generator, frames: int, fps: float, per_1000: float,
                  classes: tuple[str, ...]) -> list[Finding]:
        n = int(round(frames * per_1000 / 1000.0))
        if per_1000 > 0 and frames >= 20:
            n = max(n, 1)
        out: list[Finding] = []
        if n == 0:
            return out
        slot = frames / n
        order = [classes[i % len(classes)] for i in rng.permutation(max(n, len(classes)))][:n]
        for j in range(n):
            dur = int(rng.integers(max(3, int(fps * 1.5)), max(4, int(fps * 6)) + 1))
            dur = min(dur, max(1, int(slot * 0.6)))
            lo = int(j * slot + slot * 0.2)
            hi = max(lo, int((j + 1) * slot - dur - slot * 0.1))
            start = int(rng.integers(lo, hi + 1))
            end = min(frames - 1, start + dur - 1)
            # anchor the finding near the field-of-view centre at its middle frame, then let it drift
            mid = (start + end) // 2
            off = rng.uniform(-0.12, 0.12, 2) * self.size
            tx, ty = self.path[mid] + self.size / 2 + off
            radius = float(rng.uniform(0.09, 0.16) * self.size)
            out.append(Finding(order[j], start, end, float(tx), float(ty), radius, int(rng.integers(1 << 31))))
        return out

    def label(self, i: int) -> str:
        f = self._by_frame.get(i)
        return f.cls if f else NORMAL

    def render(self, i: int) -> np.ndarray:
        """Frame i as (size, size, 3) uint8 RGB."""
        s, t, scale = self.size, self.tex_size, self.style.texture_scale
        ox, oy = (int(v) % t for v in self.path[i])
        if scale != 1.0:
            img = self._magnified(ox, oy)
        elif ox + s <= t and oy + s <= t:
            img = self.texture[oy : oy + s, ox : ox + s]
        else:
            img = self.texture[((oy + np.arange(s)) % t)[:, None], ((ox + np.arange(s)) % t)[None, :]]
        img = img * (self.light[i] * self.vignette)
        f = self._by_frame.get(i)
        if f is not None:
            if scale != 1.0:  # the texture point under the finding, seen through the magnification
                c = s / 2
                cx = c + (((f.tx - ox - c + t / 2) % t) - t / 2) * scale
                cy = c + (((f.ty - oy - c + t / 2) % t) - t / 2) * scale
            else:
                cx, cy = (f.tx - ox) % t, (f.ty - oy) % t
            self._overlay(img, f, cx, cy, self.light[i])
        if self.style.color_cast != (1.0, 1.0, 1.0):
            img = img * np.asarray(self.style.color_cast, np.float32)
        out = np.clip(img, 0, 255).astype(np.uint8)
        if self.stamp:
            draw_stamp(out, i)
        return out

    def _magnified(self, ox: int, oy: int) -> np.ndarray:
        """The texture under the frame magnified `texture_scale` times about the frame centre (bilinear, wrapping)."""
        s, t, scale = self.size, self.tex_size, self.style.texture_scale
        rel = (np.arange(s, dtype=np.float64) - s / 2) / scale + s / 2

        def axis(o: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            pos = o + rel
            lo = np.floor(pos)
            frac = (pos - lo).astype(np.float32)
            return lo.astype(np.int64) % t, (lo.astype(np.int64) + 1) % t, frac

        y0, y1, fy = axis(oy)
        x0, x1, fx = axis(ox)
        rows = self.texture[y0] * (1 - fy)[:, None, None] + self.texture[y1] * fy[:, None, None]
        return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]

    def _overlay(self, img: np.ndarray, f: Finding, cx: float, cy: float, light: float) -> None:
        """Apply the finding's cached affine patch (out = img * A + B) centred at (cx, cy), clipped to the frame.

        Every drawing operation of a finding is affine in the pixel values, so rendering it once onto
        zeros (-> B) and ones (-> A + B) captures it exactly; it then costs one multiply-add per frame.
        """
        if f not in self._patches:
            rad = int(3.0 * f.radius) + 2
            n = 2 * rad + 1
            zeros, ones = np.zeros((n, n, 3), np.float32), np.ones((n, n, 3), np.float32)
            _draw_finding(zeros, f, rad, rad)
            _draw_finding(ones, f, rad, rad)
            self._patches[f] = (ones - zeros, zeros, rad)
        a, b, rad = self._patches[f]
        x0, y0 = int(round(cx)) - rad, int(round(cy)) - rad
        h, w = img.shape[:2]
        ys, xs = max(0, y0), max(0, x0)
        ye, xe = min(h, y0 + a.shape[0]), min(w, x0 + a.shape[1])
        if ys >= ye or xs >= xe:
            return
        pa = a[ys - y0 : ye - y0, xs - x0 : xe - x0]
        pb = b[ys - y0 : ye - y0, xs - x0 : xe - x0]
        vig = self.vignette[ys:ye, xs:xe]
        # the finding is lit like the mucosa around it: B scales with light and vignetting
        img[ys:ye, xs:xe] = img[ys:ye, xs:xe] * pa + pb * (light * vig)


def _blob(h: int, w: int, cx: float, cy: float, radius: float, rng: np.random.Generator,
          wobble: float = 0.25) -> np.ndarray:
    """Soft irregular disc mask in [0,1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = np.arctan2(yy - cy, xx - cx)
    ph = rng.uniform(0, 6.3, 3)
    rr = radius * (1 + wobble * (0.5 * np.sin(3 * ang + ph[0]) + 0.3 * np.sin(5 * ang + ph[1])
                                 + 0.2 * np.sin(7 * ang + ph[2])))
    d = np.hypot(xx - cx, yy - cy)
    return np.clip((rr - d) / max(radius * 0.25, 1.0), 0, 1)


def _paint(img: np.ndarray, mask: np.ndarray, color: tuple[float, float, float], alpha: float = 1.0) -> None:
    m = (mask * alpha)[..., None]
    img *= 1 - m
    img += m * np.asarray(color, np.float32)


def _draw_finding(img: np.ndarray, f: Finding, cx: float, cy: float) -> None:
    h, w, _ = img.shape
    rng = np.random.default_rng(f.seed)  # same shape on every frame of the finding
    r = f.radius
    cls = f.cls
    if cls == "Bleeding":
        _paint(img, _blob(h, w, cx, cy, r * 1.3, rng, 0.35), (120, 8, 12), 0.92)
        _paint(img, _blob(h, w, cx + r * 0.3, cy - r * 0.2, r * 0.6, rng), (175, 20, 25), 0.7)
    elif cls == "Angioectasia":
        for _ in range(5):
            dx, dy = rng.normal(0, r * 0.35, 2)
            _paint(img, _blob(h, w, cx + dx, cy + dy, r * rng.uniform(0.15, 0.3), rng, 0.5), (235, 25, 35), 0.95)
    elif cls == "Polyp":
        m = _blob(h, w, cx, cy, r, rng, 0.1)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        shade = np.clip(1.15 - ((xx - cx + r * 0.3) ** 2 + (yy - cy + r * 0.3) ** 2) / (2.2 * r * r), 0.55, 1.2)
        img *= (1 - m[..., None]) + m[..., None] * shade[..., None] * np.array([1.12, 1.18, 1.2], np.float32)
        _paint(img, _blob(h, w, cx - r * 0.35, cy - r * 0.35, r * 0.14, rng, 0.1), (250, 245, 240), 0.8)
    elif cls == "Ulcer":
        _paint(img, _blob(h, w, cx, cy, r * 1.15, rng, 0.2), (200, 40, 40), 0.8)
        _paint(img, _blob(h, w, cx, cy, r * 0.8, rng, 0.2), (238, 228, 170), 0.95)
    elif cls == "Erosion":
        _paint(img, _blob(h, w, cx, cy, r * 0.6, rng, 0.4), (236, 214, 196), 0.75)
        _paint(img, _blob(h, w, cx + r * 0.5, cy, r * 0.35, rng, 0.4), (236, 214, 196), 0.65)
    elif cls == "Erythema":
        _paint(img, _blob(h, w, cx, cy, r * 2.2, rng, 0.3), (230, 45, 45), 0.55)
    elif cls == "Lymphangiectasia":
        for _ in range(22):
            dx, dy = rng.normal(0, r * 0.6, 2)
            _paint(img, _blob(h, w, cx + dx, cy + dy, r * 0.09 + 1.5, rng, 0.1), (250, 250, 238), 0.95)
    elif cls == "Foreign Body":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        a = rng.uniform(0, math.pi)
        u = (xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)
        v = -(xx - cx) * math.sin(a) + (yy - cy) * math.cos(a)
        m = np.clip(1.0 - np.maximum(np.abs(u) / (r * 1.6), np.abs(v) / (r * 0.5)), 0, 0.15) / 0.15
        _paint(img, m, (95, 105, 125), 1.0)
        _paint(img, m * (np.abs(v) < r * 0.12), (200, 210, 225), 0.8)
    elif cls == "Worms":
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        ts = np.linspace(-1, 1, 48)
        a, b = rng.uniform(0, 6.3, 2)
        px = cx + r * 1.6 * ts
        py = cy + r * 0.6 * np.sin(3 * ts + a) + r * 0.2 * np.cos(5 * ts + b)
        d = np.full((h, w), 1e9, np.float32)
        for x0, y0 in zip(px, py, strict=True):
            d = np.minimum(d, (xx - x0) ** 2 + (yy - y0) ** 2)
        width = max(2.5, r * 0.14)
        _paint(img, np.clip((width**2 - d) / width**2 * 3, 0, 1), (238, 226, 205), 0.95)
    else:  # pragma: no cover - schedule only uses known classes
        raise ValueError(cls)


# ----------------------------------------------------------------------------------------------
# Frame-number stamp


def _stamp_cells(h: int, w: int) -> Iterator[tuple[int, int, int, int, int]]:
    cw, ch = w / _STAMP_DIV, h / _STAMP_DIV
    for bit in range(STAMP_BITS):
        r, c = divmod(bit, _STAMP_COLS)
        x0, y0 = (0.5 + c) * cw, (0.5 + r) * ch
        yield bit, int(round(y0)), int(round(y0 + ch)), int(round(x0)), int(round(x0 + cw))


def draw_stamp(img: np.ndarray, value: int) -> None:
    """Write `value` (< 2**20) into the top-left corner of an (H,W,3) uint8 frame, in place."""
    h, w = img.shape[:2]
    for bit, y0, y1, x0, x1 in _stamp_cells(h, w):
        img[y0:y1, x0:x1] = 255 if (value >> bit) & 1 else 0


def read_stamp(img: np.ndarray) -> int:
    """Read the frame number from an (H,W,3) or (3,H,W) image of any size (values 0..255)."""
    a = np.asarray(img, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    lum = a.mean(-1)
    h, w = lum.shape
    value = 0
    for bit, y0, y1, x0, x1 in _stamp_cells(h, w):
        qy, qx = max(1, (y1 - y0) // 4), max(1, (x1 - x0) // 4)
        if lum[y0 + qy : y1 - qy, x0 + qx : x1 - qx].mean() > 127.5:
            value |= 1 << bit
    return value


# ----------------------------------------------------------------------------------------------
# Writing


def _vfr_pts(frames: int, fps: float, rng: np.random.Generator) -> list[Fraction]:
    """Irregular timestamps (ms resolution): frame gaps alternate between fast and slow phases."""
    gaps = np.where((np.arange(frames) // 10) % 2 == 0, 1.0 / fps, 2.5 / fps) * rng.uniform(0.8, 1.2, frames)
    t = np.concatenate([[0.0], np.cumsum(gaps)[:-1]])
    return [Fraction(int(round(x * 1000)), 1000) for x in t]


def synthesize(
    out: str | os.PathLike,
    frames: int,
    *,
    codec: str | None = None,
    size: int = 336,
    fps: float = 4.0,
    seed: int = 0,
    stamp: bool = False,
    style: Style = DEFAULT_STYLE,
    findings_per_1000: float = 15.0,
    classes: tuple[str, ...] = FINDING_CLASSES,
    vfr: bool = False,
    quality: int = 18,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> SynthResult:
    """Write a synthetic recording and its ground truth; returns where everything went.

    `workers` > 1 renders frames in that many processes (each builds the same seeded scene, so the
    output is identical); encoding stays in this process, in frame order. `style` picks the visual domain;
    the findings and labels of a seed are the same in every style.
    """
    out = Path(out)
    codec = codec_for(out, codec)
    if frames < 1:
        raise CapsuleError(f"--frames must be >= 1, got {frames}")
    if not 32 <= size <= 2048 or size % 2:
        raise CapsuleError(f"--size must be an even number in 32..2048, got {size}")
    if fps <= 0:
        raise CapsuleError(f"--fps must be > 0, got {fps}")
    bad = [c for c in classes if c not in FINDING_CLASSES]
    if bad:
        raise CapsuleError(f"unknown finding classes {bad} (choose from {', '.join(FINDING_CLASSES)})")
    if vfr and codec not in ("h264", "vp9"):
        raise CapsuleError("variable frame rate needs the h264 or vp9 codec")
    parent = out.parent
    why = output_folder_problem(parent)
    if why:
        raise CapsuleError(f"{parent}: {why}")
    if out.exists() and not overwrite:
        raise CapsuleError(f"{out}: already exists (use --overwrite)")

    scene_args = (size, frames, seed, fps, findings_per_1000, tuple(classes), stamp, style)
    scene = Scene(*scene_args)
    rng = np.random.default_rng(seed + 1)
    pts = _vfr_pts(frames, fps, rng) if vfr else [Fraction(i) / Fraction(fps).limit_denominator(1000)
                                                   for i in range(frames)]
    with _rendered(scene, scene_args, workers) as images:
        if codec in ("png", "jpg"):
            _write_folder(out, images, frames, codec, overwrite, progress)
        else:
            _write_video(out, images, frames, size, codec, fps, pts, vfr, quality, progress)

    stem = out.name if codec in ("png", "jpg") else out.stem
    labels_csv = out.with_name(stem + ".labels.csv")
    findings_csv = out.with_name(stem + ".findings.csv")
    with open(labels_csv, "w", newline="", encoding="utf-8") as fh:
        wr = csv.writer(fh)
        wr.writerow(["frame", "pts", "label"])
        for i in range(frames):
            wr.writerow([i, f"{float(pts[i]):.6f}", scene.label(i)])
    with open(findings_csv, "w", newline="", encoding="utf-8") as fh:
        wr = csv.writer(fh)
        wr.writerow(["finding", "class", "start_frame", "end_frame"])
        for k, f in enumerate(scene.findings):
            wr.writerow([k, f.cls, f.start, f.end])
    _logger.info("wrote %s (%d frames, %d findings)", out, frames, len(scene.findings))
    return SynthResult(out, labels_csv, findings_csv, frames, fps, scene.findings)


_WORKER_SCENE: Scene | None = None


def _init_worker(scene_args: tuple) -> None:
    global _WORKER_SCENE
    _WORKER_SCENE = Scene(*scene_args)


def _render_in_worker(i: int) -> np.ndarray:
    assert _WORKER_SCENE is not None
    return _WORKER_SCENE.render(i)


@contextlib.contextmanager
def _rendered(scene: Scene, scene_args: tuple, workers: int) -> Iterator[Iterator[np.ndarray]]:
    """Frames 0..N-1 in order, rendered here or by a pool of spawned processes."""
    if workers <= 1 or scene.frames < 256:
        yield (scene.render(i) for i in range(scene.frames))
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(scene_args,)) as pool:
        yield pool.imap(_render_in_worker, range(scene.frames), chunksize=32)


def _write_folder(out: Path, images: Iterator[np.ndarray], frames: int, codec: str, overwrite: bool,
                  progress: Callable[[int, int], None] | None) -> None:
    from PIL import Image

    if out.exists() and overwrite:
        for p in out.iterdir():
            p.unlink()
    out.mkdir(exist_ok=True)
    # un-padded numbers, like Kvasir-Capsule's `<video>_<frame>.jpg`: readers must sort naturally
    for i, frame in enumerate(images):
        img = Image.fromarray(frame)
        if codec == "png":
            img.save(out / f"frame_{i}.png", compress_level=1)
        else:
            img.save(out / f"frame_{i}.jpg", quality=95)
        if progress:
            progress(i + 1, frames)


def _write_video(out: Path, images: Iterator[np.ndarray], frames: int, size: int, codec: str, fps: float,
                 pts: list[Fraction], vfr: bool, quality: int, progress: Callable[[int, int], None] | None) -> None:
    import av

    _, encoder, pix_fmt = CODECS[codec]
    tmp = out.with_name(out.name + ".tmp" + out.suffix)
    rate = Fraction(fps).limit_denominator(1000)
    try:
        with av.open(str(tmp), "w") as container:
            stream = container.add_stream(encoder, rate=rate)
            stream.width = stream.height = size
            stream.pix_fmt = pix_fmt
            if codec == "h264":
                stream.options = {"crf": str(quality), "preset": "veryfast", "g": str(max(1, int(fps * 10)))}
            elif codec == "vp9":
                stream.options = {"crf": str(quality + 12), "b": "0", "deadline": "realtime", "cpu-used": "8",
                                  "g": str(max(1, int(fps * 10)))}
            else:
                stream.options = {"q:v": "3"}
                stream.codec_context.qmin = stream.codec_context.qmax = 3
            tb = Fraction(1, 1000) if vfr else 1 / rate
            stream.codec_context.time_base = tb
            stream.time_base = tb
            for i, image in enumerate(images):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = int(pts[i] / tb)
                frame.time_base = tb
                container.mux(stream.encode(frame))
                if progress:
                    progress(i + 1, frames)
            container.mux(stream.encode())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
