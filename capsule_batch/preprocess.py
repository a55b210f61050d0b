"""Preprocessing owned by the bundle: resize (shorter side), center crop, normalize.

Two implementations of one definition:
- `reference_preprocess` — PIL, one image at a time; the fidelity reference that every source and
  the training module are checked against (it mirrors torchvision's Resize(int) + CenterCrop).
- `preprocess_batch` — torch, a whole uint8 NHWC batch on any device; what sources use.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from capsule_batch.errors import BundleError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
CROPS = ("center", "none")


@dataclass(frozen=True)
class Preprocess:
    """How frames become model input. `resize` is the target shorter side; `input_size` the square crop."""

    input_size: int = 224
    resize: int = 224
    crop: str = "center"
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: object, where: str = "preprocess") -> Preprocess:
        """Validate and build from model.json's `preprocess` object; unknown keys are an error."""
        if not isinstance(d, dict):
            raise BundleError(f"{where}: must be an object")
        known = {"input_size", "resize", "crop", "interpolation", "mean", "std"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise BundleError(f"{where}: unknown keys {unknown}")
        kw: dict[str, Any] = {}
        for k in ("input_size", "resize"):
            if k in d:
                v = d[k]
                if not isinstance(v, int) or isinstance(v, bool) or not 8 <= v <= 4096:
                    raise BundleError(f"{where}.{k}: must be an integer in 8..4096, got {v!r}")
                kw[k] = v
        if "crop" in d:
            if d["crop"] not in CROPS:
                raise BundleError(f"{where}.crop: must be one of {CROPS}, got {d['crop']!r}")
            kw["crop"] = d["crop"]
        if "interpolation" in d:
            if d["interpolation"] not in INTERPOLATIONS:
                raise BundleError(f"{where}.interpolation: must be one of {INTERPOLATIONS}, got {d['interpolation']!r}")
            kw["interpolation"] = d["interpolation"]
        for k in ("mean", "std"):
            if k in d:
                v = d[k]
                ok = isinstance(v, list) and len(v) == 3 and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v
                )
                if not ok or (k == "std" and min(v) <= 0):
                    raise BundleError(f"{where}.{k}: must be 3 finite numbers{' > 0' if k == 'std' else ''}, got {v!r}")
                kw[k] = tuple(float(x) for x in v)
        p = cls(**kw)
        if p.crop == "none" and p.resize != p.input_size:
            raise BundleError(f"{where}: crop 'none' needs resize == input_size")
        if p.resize < p.input_size:
            raise BundleError(f"{where}: resize ({p.resize}) is smaller than input_size ({p.input_size})")
        return p

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) after the resize step, as torchvision's Resize(int) computes it."""
        if self.crop == "none":
            return self.input_size, self.input_size
        short, long = (height, width) if height <= width else (width, height)
        new_short, new_long = self.resize, int(self.resize * long / short)
        return (new_short, new_long) if height <= width else (new_long, new_short)

    def crop_box(self, height: int, width: int) -> tuple[int, int]:
        """(top, left) of the center crop in the resized image, as torchvision's CenterCrop computes it."""
        rh, rw = self.resized_shape(height, width)
        s = self.input_size
        return int(round((rh - s) / 2.0)), int(round((rw - s) / 2.0))


def reference_preprocess(image: Any, pre: Preprocess) -> np.ndarray:
    """PIL reference: RGB image (PIL or HxWx3 uint8 array) -> float32 CHW normalized array."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    img = img.convert("RGB")
    w, h = img.size
    rh, rw = pre.resized_shape(h, w)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[pre.interpolation]
    if (rh, rw) != (h, w):
        img = img.resize((rw, rh), resample)
    top, left = pre.crop_box(h, w)
    s = pre.input_size
    img = img.crop((left, top, left + s, top + s))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return x.transpose(2, 0, 1).copy()


def preprocess_batch(frames: Any, pre: Preprocess, dtype: Any = None, device: Any = None) -> Any:
    """torch: uint8 (N,H,W,3) tensor -> (N,3,S,S) normalized tensor in `dtype` (default float32) on `device`
    (default: where the frames are).

    Bilinear/bicubic downscaling is antialiased, as PIL's is. uint8 frames on the CPU are resized in
    uint8: torch's antialiased uint8 kernels implement PIL's algorithm and its rounding (~20x faster
    than the float path on CPU and equal to the reference); elsewhere the resize runs in float. The
    crop is a view, and only the cropped frames move to `device` before normalisation.
    """
    import torch
    import torch.nn.functional as F

    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected (N,H,W,3) frames, got {tuple(frames.shape)}")
    _, h, w, _ = frames.shape
    x = frames.permute(0, 3, 1, 2)
    rh, rw = pre.resized_shape(h, w)
    if (rh, rw) != (h, w):
        # PIL's NEAREST samples pixel centres, which is torch's "nearest-exact"
        mode = "nearest-exact" if pre.interpolation == "nearest" else pre.interpolation
        aa = mode != "nearest-exact"
        if x.dtype == torch.uint8 and x.device.type == "cpu":
            x = F.interpolate(x, size=(rh, rw), mode=mode, antialias=aa)
        else:
            kw = {} if mode == "nearest-exact" else {"align_corners": False, "antialias": aa}
            x = F.interpolate(x.float(), size=(rh, rw), mode=mode, **kw).clamp_(0, 255)
    top, left = pre.crop_box(h, w)
    s = pre.input_size
    x = x[:, :, top : top + s, left : left + s]
    if device is not None:
        x = x.to(device)
    x = x.contiguous().float()
    std = torch.tensor(pre.std, device=x.device).view(1, 3, 1, 1)
    mean = torch.tensor(pre.mean, device=x.device).view(1, 3, 1, 1)
    x.mul_(1.0 / (255.0 * std)).sub_(mean / std)
    return x if dtype in (None, torch.float32) else x.to(dtype)


def to_rgb(pixels: Any, pre: Preprocess) -> np.ndarray:
    """One preprocessed (3, S, S) frame (numpy or torch, any float dtype and device) back to (S, S, 3) uint8 RGB
    with the bundle's mean/std: what the model saw (the study's thumbnails)."""
    x = pixels.detach().float().cpu().numpy() if hasattr(pixels, "detach") else np.asarray(pixels, np.float32)
    x = (x.transpose(1, 2, 0) * np.asarray(pre.std, np.float32) + np.asarray(pre.mean, np.float32)) * 255.0
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)
