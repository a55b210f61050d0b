"""Preprocessing owned by the bundle: resize, center crop, normalize.

What a `Preprocess` means, exactly:
- `resize_mode`: `shorter` scales the shorter side to `resize` (aspect ratio kept, torchvision's Resize(int));
  `whole` scales the whole frame to `resize` x `resize` (aspect ratio not kept, albumentations' Resize(h, w)).
  `crop: none` implies `whole` with `resize == input_size`.
- `crop`: `center` cuts the `input_size` square out of the middle (torchvision's CenterCrop rounding).
- `interpolation` + `antialias`: with `antialias` (the default) bilinear/bicubic downscaling widens the
  filter by the scale factor, as PIL does (PIL's kernels, bicubic a = -0.5); without it the kernel keeps its
  width (bilinear: 2 taps; bicubic: 4 taps, a = -0.75, half-pixel centres, replicated border), as OpenCV's
  INTER_LINEAR/INTER_CUBIC and torch's `interpolate(antialias=False)` compute it. `nearest` samples pixel
  centres (PIL's NEAREST) either way.
- The resized frame is uint8 (rounded, clamped) before normalisation, as in a PIL or OpenCV pipeline.
- `field_of_view`: `full` resizes the whole frame (the seed's recipe); `fov` first crops each frame to the lens
  image, black outside it (capsule_batch/model/fov.py), then resizes that.

The seed's checkpoints were validated with `SEED_PREPROCESS`: albumentations `Resize(224, 224,
interpolation=cv2.INTER_CUBIC)` on the whole frame (no antialiasing), `CenterCrop(224)` (a no-op) and
ImageNet `Normalize`.

Two implementations of one definition:
- `reference_preprocess` — one image at a time, PIL (antialiased modes) or numpy (the others, float64 and
  one rounding, as OpenCV's fixed-point kernel approximates it); the fidelity reference that every source and
  the training module are checked against.
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
RESIZE_MODES = ("shorter", "whole")
#: OpenCV's (and torch's non-antialiased) bicubic coefficient; PIL's antialiased bicubic uses -0.5
CUBIC_A = -0.75


@dataclass(frozen=True)
class Preprocess:
    """How frames become model input (see the module docstring). `resize` is the target shorter side
    (`shorter`) or square side (`whole`); `input_size` the square crop. The defaults are what bundles written
    before `resize_mode`/`antialias` existed meant: shorter side, bilinear, antialiased like PIL."""

    input_size: int = 224
    resize: int = 224
    crop: str = "center"
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_mode: str = "shorter"
    antialias: bool = True
    field_of_view: str = "full"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.crop == "none":  # no crop: the whole frame is resized to the input square
            object.__setattr__(self, "resize_mode", "whole")

    @property
    def exact_kernel(self) -> bool:
        """True when the resize is OpenCV's/torch's fixed-width kernel (no antialiasing) rather than PIL's."""
        return not self.antialias and self.interpolation != "nearest"

    def describe(self) -> str:
        """One line for people: what the bundle does to a frame."""
        if self.resize_mode == "whole":
            how = f"whole frame to {self.resize}x{self.resize} (aspect ratio not kept)"
        else:
            how = f"shorter side to {self.resize}"
        if self.interpolation == "nearest":
            kernel = "nearest (pixel centres)"
        elif self.antialias:
            kernel = f"{self.interpolation}, antialiased as PIL"
        else:
            kernel = f"{self.interpolation}" + (f" a={CUBIC_A}" if self.interpolation == "bicubic" else "") + \
                ", no antialiasing (OpenCV/torch kernel)"
        crop = f"center crop {self.input_size}" if self.crop == "center" else "no crop"
        fov = "crop to the field of view (black outside), then " if self.field_of_view == "fov" else ""
        return f"{fov}resize {how}, {kernel}, {crop}, mean {list(self.mean)}, std {list(self.std)}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if d["field_of_view"] == "full":  # the default: bundles that do not crop read as they did before the setting
            d.pop("field_of_view")
        return d

    @classmethod
    def from_dict(cls, d: object, where: str = "preprocess") -> Preprocess:
        """Validate and build from model.json's `preprocess` object; unknown keys are an error."""
        if not isinstance(d, dict):
            raise BundleError(f"{where}: must be an object")
        known = {"input_size", "resize", "crop", "interpolation", "mean", "std", "resize_mode", "antialias",
                 "field_of_view"}
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
        if "resize_mode" in d:
            if d["resize_mode"] not in RESIZE_MODES:
                raise BundleError(f"{where}.resize_mode: must be one of {RESIZE_MODES}, got {d['resize_mode']!r}")
            if d.get("crop") == "none" and d["resize_mode"] != "whole":
                raise BundleError(f"{where}: crop 'none' resizes the whole frame (resize_mode 'whole')")
            kw["resize_mode"] = d["resize_mode"]
        if "field_of_view" in d:
            from capsule_batch.model.fov import FIELDS_OF_VIEW

            if d["field_of_view"] not in FIELDS_OF_VIEW:
                raise BundleError(f"{where}.field_of_view: must be one of {FIELDS_OF_VIEW}, got {d['field_of_view']!r}")
            kw["field_of_view"] = d["field_of_view"]
        if "antialias" in d:
            if not isinstance(d["antialias"], bool):
                raise BundleError(f"{where}.antialias: must be true or false, got {d['antialias']!r}")
            kw["antialias"] = d["antialias"]
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
        """(h, w) after the resize step: `whole` -> the square; `shorter` as torchvision's Resize(int) computes it."""
        if self.resize_mode == "whole":
            return self.resize, self.resize
        short, long = (height, width) if height <= width else (width, height)
        new_short, new_long = self.resize, int(self.resize * long / short)
        return (new_short, new_long) if height <= width else (new_long, new_short)

    def crop_box(self, height: int, width: int) -> tuple[int, int]:
        """(top, left) of the center crop in the resized image, as torchvision's CenterCrop computes it."""
        rh, rw = self.resized_shape(height, width)
        s = self.input_size
        return int(round((rh - s) / 2.0)), int(round((rw - s) / 2.0))


def seed_preprocess(size: int = 224) -> Preprocess:
    """The seed's validation/inference transform at `size` (224 for its checkpoints)."""
    return Preprocess(input_size=size, resize=size, resize_mode="whole", crop="center", interpolation="bicubic",
                      antialias=False, mean=IMAGENET_MEAN, std=IMAGENET_STD)


SEED_PREPROCESS = seed_preprocess()


def _taps(n_in: int, n_out: int, interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """Source indices (n_out, taps) and weights of a fixed-width kernel along one axis: half-pixel centres,
    border replicated, bicubic with a = CUBIC_A."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    i0 = np.floor(src).astype(np.int64)
    t = src - i0
    if interpolation == "bicubic":
        offsets = np.arange(-1, 3)
        d = np.abs(t[:, None] - offsets[None, :])
        a = CUBIC_A
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        w = np.where(d <= 1, near, np.where(d < 2, far, 0.0))
    else:
        offsets = np.arange(0, 2)
        w = np.stack([1 - t, t], 1)
    return np.clip(i0[:, None] + offsets[None, :], 0, n_in - 1), w


def resize_fixed_kernel(img: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8 without antialiasing: separable, float64, one rounding."""
    x = np.asarray(img, dtype=np.float64)
    idx, w = _taps(x.shape[1], width, interpolation)
    x = (x[:, idx] * w[None, :, :, None]).sum(2)
    idx, w = _taps(x.shape[0], height, interpolation)
    x = (x[idx] * w[:, :, None, None]).sum(1)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def reference_preprocess(image: Any, pre: Preprocess) -> np.ndarray:
    """Reference: RGB image (PIL or HxWx3 uint8 array) -> float32 CHW normalized array (PIL for the antialiased
    modes, `resize_fixed_kernel` for the others)."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    img = img.convert("RGB")
    if pre.field_of_view == "fov":
        from capsule_batch.model.fov import crop_to_fov

        img = Image.fromarray(crop_to_fov(np.asarray(img)))
    w, h = img.size
    rh, rw = pre.resized_shape(h, w)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[pre.interpolation]
    if (rh, rw) != (h, w):
        if pre.exact_kernel:
            img = Image.fromarray(resize_fixed_kernel(np.asarray(img), rh, rw, pre.interpolation))
        else:
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

    For a CUDA `device`, CPU frames are uploaded first, as uint8, and everything after runs on the GPU with the same
    kernels and the same rounding as on the CPU. Antialiased modes: uint8 frames on the CPU are resized in uint8
    (torch's antialiased uint8 kernels implement PIL's algorithm and its rounding, ~20x faster than the float path
    on CPU and equal to the reference); elsewhere (a GPU) the resize runs in float and rounds once. Fixed-kernel
    modes (no antialiasing, OpenCV's INTER_LINEAR/INTER_CUBIC) always resize in float and round once: torch's uint8
    bicubic rounds and clamps between its two passes, which moves up to tens of levels where the kernel
    overshoots. The crop is a view.
    """
    import torch
    import torch.nn.functional as F

    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected (N,H,W,3) frames, got {tuple(frames.shape)}")
    if pre.field_of_view == "fov" and frames.shape[0]:  # each frame its own crop (sizes differ), then as usual
        from dataclasses import replace

        from capsule_batch.model.fov import crop_batch

        whole = replace(pre, field_of_view="full")
        return torch.cat([preprocess_batch(f, whole, dtype, device) for f in crop_batch(frames)])
    if device is not None and torch.device(device).type == "cuda" and frames.device.type == "cpu":
        from capsule_batch.devices import to_device_async

        # the decoded uint8 frames cross the bus (pinned, non-blocking; 4x fewer bytes than floats) and the resize
        # and normalisation run on the GPU: a host-side resize would make end to end CPU-bound far below the engine
        frames = to_device_async(frames, device)
    _, h, w, _ = frames.shape
    x = frames.permute(0, 3, 1, 2)
    rh, rw = pre.resized_shape(h, w)
    if (rh, rw) != (h, w):
        # PIL's NEAREST samples pixel centres, which is torch's "nearest-exact"
        mode = "nearest-exact" if pre.interpolation == "nearest" else pre.interpolation
        aa = mode != "nearest-exact" and pre.antialias
        if pre.exact_kernel:
            # planar uint8 first: torch's float bicubic is faster on planar (NCHW) input than on the decoder's
            # interleaved frames, and the layout change is cheaper on bytes than on floats (same values either way)
            x = F.interpolate(x.contiguous().float(), size=(rh, rw), mode=mode, align_corners=False, antialias=False)
            x = x.clamp_(0, 255).round_()
        elif x.dtype == torch.uint8 and x.device.type == "cpu":
            x = F.interpolate(x, size=(rh, rw), mode=mode, antialias=aa)
        else:
            kw = {} if mode == "nearest-exact" else {"align_corners": False, "antialias": aa}
            x = F.interpolate(x.float(), size=(rh, rw), mode=mode, **kw).clamp_(0, 255).round_()
    top, left = pre.crop_box(h, w)
    s = pre.input_size
    x = x[:, :, top : top + s, left : left + s]
    if device is not None and torch.device(device) != x.device:  # CPU frames went to a GPU above; this is the rest
        x = x.to(device)
    x = x.contiguous().float()
    scale, shift = _normalisation(pre, x.device)
    x.mul_(scale).sub_(shift)
    return x if dtype in (None, torch.float32) else x.to(dtype)


_NORMALISATION: dict[tuple[Any, ...], tuple[Any, Any]] = {}


def _normalisation(pre: Preprocess, device: Any) -> tuple[Any, Any]:
    """(scale, shift) with x * scale - shift = (x / 255 - mean) / std, as (1, 3, 1, 1) float32 tensors on `device`.
    On a GPU they are made once per device and bundle statistics: `torch.tensor(..., device=cuda)` copies from
    pageable memory, which synchronises the current stream (every batch would wait for the engine)."""
    import torch

    key = (str(device), pre.mean, pre.std)
    if key in _NORMALISATION:
        return _NORMALISATION[key]
    std = torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1)
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1)
    pair = ((1.0 / (255.0 * std)).to(device), (mean / std).to(device))
    if torch.device(device).type == "cuda":
        _NORMALISATION[key] = pair  # once per process and device: this one copy may synchronise
    return pair


def to_rgb(pixels: Any, pre: Preprocess) -> np.ndarray:
    """One preprocessed (3, S, S) frame (numpy or torch, any float dtype and device) back to (S, S, 3) uint8 RGB
    with the bundle's mean/std: what the model saw (the study's thumbnails)."""
    x = pixels.detach().float().cpu().numpy() if hasattr(pixels, "detach") else np.asarray(pixels, np.float32)
    x = (x.transpose(1, 2, 0) * np.asarray(pre.std, np.float32) + np.asarray(pre.mean, np.float32)) * 255.0
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)
