"""Training augmentations (the seed recipe, in the seed's order) and the validation transform (the bundle's own
preprocessing).

Validation uses `capsule_batch.model.preprocess.reference_preprocess` with the Preprocess that goes into the
bundle, so what was validated is exactly what `capsule-batch run` computes. Mean/std come from that
Preprocess, never from literals here.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from capsule_batch.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, reference_preprocess


def make_preprocess(data_cfg: dict[str, Any], arch: str, model_args: dict[str, Any]) -> Preprocess:
    """The bundle's preprocessing from the config (the defaults are the seed's validation transform), with the
    seed's ImageNet statistics or the arch's own."""
    from capsule_batch.errors import BundleError
    from capsule_batch.model.bundle import default_preprocess

    if data_cfg.get("normalisation", "imagenet") == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        base = default_preprocess(arch, model_args, "timm")
        mean, std = base.mean, base.std
    d = {"input_size": data_cfg["input_size"], "resize": data_cfg["resize"], "crop": "center",
         "interpolation": data_cfg.get("interpolation", "bicubic"), "resize_mode": data_cfg.get("resize_mode", "whole"),
         "antialias": data_cfg.get("antialias", False), "mean": list(mean), "std": list(std),
         "field_of_view": data_cfg.get("field_of_view", "full")}
    try:
        return Preprocess.from_dict(d, "data")
    except BundleError as e:
        from train.config import ConfigError

        raise ConfigError(str(e)) from None


class ValTransform:
    """PIL image -> normalized CHW float tensor, exactly `reference_preprocess`."""

    def __init__(self, pre: Preprocess):
        self.pre = pre

    def __call__(self, img: Any) -> Any:
        import torch

        return torch.from_numpy(reference_preprocess(img, self.pre))


class GridDistortion:
    """Albumentations-style grid distortion: the image is cut into `steps` x `steps` cells whose widths and
    heights are scaled by 1 + U(-limit, limit), then remapped piecewise-linearly; pixels are taken by nearest
    neighbour and the outside is black (the seed's INTER_NEAREST, BORDER_CONSTANT)."""

    def __init__(self, steps: int, limit: float):
        self.steps, self.limit = steps, limit

    def _axis(self, n: int) -> Any:
        import torch

        scales = 1 + torch.empty(self.steps).uniform_(-self.limit, self.limit)
        edges = torch.cat([torch.zeros(1), torch.cumsum(scales, 0)])
        edges = edges / edges[-1]  # distorted cell borders, in [0, 1]
        src = torch.linspace(0, 1, self.steps + 1)
        pos = torch.linspace(0, 1, n)
        cell = torch.clamp(torch.searchsorted(edges, pos, right=True) - 1, 0, self.steps - 1)
        t = (pos - edges[cell]) / (edges[cell + 1] - edges[cell])
        return (src[cell] + t * (src[cell + 1] - src[cell])) * 2 - 1

    def __call__(self, x: Any) -> Any:
        import torch
        import torch.nn.functional as F

        _, h, w = x.shape
        gy, gx = torch.meshgrid(self._axis(h), self._axis(w), indexing="ij")
        grid = torch.stack([gx, gy], -1)[None]
        return F.grid_sample(x[None], grid, mode="nearest", padding_mode="zeros", align_corners=True)[0]


def blur_kernel_size(lo: int, hi: int) -> int:
    """A kernel size drawn as albumentations' GaussianBlur draws it: uniform in lo..hi, an even draw moved to the
    next odd size (so for 3..7: 3 with 1/5, 5 and 7 with 2/5 each)."""
    k = random.randint(lo, hi)
    return k if k % 2 else (k + 1) % (hi + 1)


class TrainTransform:
    """The seed's augmentations in the seed's order (albumentations 1.4.19 there, torch/PIL here): h/v flips,
    rotate by k x 90 degrees (k in 0..3), Gaussian blur, random resized crop (ratio 1), grid distortion, colour
    jitter; then the bundle's normalisation. Differences that remain are listed in docs/training.md."""

    def __init__(self, pre: Preprocess, aug: dict[str, Any]):
        import torchvision.transforms as T

        self.pre, self.aug = pre, aug
        interp = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}[aug.get("crop_interpolation", "bilinear")]
        self.crop_interp = interp
        self.crop_scale = tuple(aug["crop_scale"])
        lo, hi = (int(v) for v in aug["blur_kernel"])
        self.blur_range = (lo, hi) if hi >= 3 else None
        self.blur_sigma = tuple(float(v) for v in aug.get("blur_sigma", (0.0, 2.55)))
        self.jitter = T.ColorJitter(aug["brightness"], aug["contrast"], aug["saturation"], aug["hue"])
        self.grid = GridDistortion(int(aug["grid_steps"]), float(aug["grid_limit"]))
        self.normalize = T.Normalize(pre.mean, pre.std)

    def __call__(self, img: Any) -> Any:
        import torch
        import torchvision.transforms as T
        import torchvision.transforms.functional as TF

        a = self.aug
        if self.pre.field_of_view == "fov":  # the same crop as inference, before any augmentation
            from capsule_batch.model.fov import crop_to_fov

            img = TF.to_pil_image(crop_to_fov(np.asarray(img.convert("RGB"))))
        x = TF.pil_to_tensor(img).float()
        if random.random() < a["hflip"]:
            x = x.flip(-1)
        if random.random() < a["vflip"]:
            x = x.flip(-2)
        if random.random() < a["rot90"]:
            x = torch.rot90(x, random.randint(0, 3), (-2, -1))
        if self.blur_range and random.random() < a["blur_p"]:
            k = blur_kernel_size(*self.blur_range)
            sigma = random.uniform(*self.blur_sigma)
            if sigma <= 1e-3:  # OpenCV's sigma for a given kernel size when none is given
                sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
            x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
        i, j, h, w = T.RandomResizedCrop.get_params(x, scale=self.crop_scale, ratio=(1.0, 1.0))
        s = self.pre.input_size
        x = TF.resized_crop(x, i, j, h, w, [s, s], interpolation=self.crop_interp, antialias=False)
        if random.random() < a["grid_distortion_p"]:
            x = self.grid(x)
        x = x.clamp_(0, 255).round_()
        if random.random() < a["color_jitter_p"]:  # on PIL: torchvision's tensor hue shift is ~50x slower
            x = TF.pil_to_tensor(self.jitter(TF.to_pil_image(x.to(torch.uint8)))).float()
        return self.normalize(x / 255.0).contiguous()


def seed_worker(worker_id: int) -> None:
    """Distinct, reproducible augmentation streams per DataLoader worker."""
    import torch

    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)
