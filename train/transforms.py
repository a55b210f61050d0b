"""Training augmentations (the seed recipe) and the validation transform (the bundle's own preprocessing).

Validation uses `capsule_batch.preprocess.reference_preprocess` with the Preprocess that goes into the
bundle, so what was validated is exactly what `capsule-batch run` computes. Mean/std come from that
Preprocess, never from literals here.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from capsule_batch.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, reference_preprocess


def make_preprocess(data_cfg: dict[str, Any], arch: str, model_args: dict[str, Any]) -> Preprocess:
    """The bundle's preprocessing from the config: the seed's ImageNet statistics, or the arch's own."""
    from capsule_batch.bundle import default_preprocess

    if data_cfg.get("normalisation", "imagenet") == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        base = default_preprocess(arch, model_args, "timm")
        mean, std = base.mean, base.std
    return Preprocess(input_size=int(data_cfg["input_size"]), resize=int(data_cfg["resize"]), crop="center",
                      interpolation=data_cfg.get("interpolation", "bilinear"), mean=mean, std=std)


class ValTransform:
    """PIL image -> normalized CHW float tensor, exactly `reference_preprocess`."""

    def __init__(self, pre: Preprocess):
        self.pre = pre

    def __call__(self, img: Any) -> Any:
        import torch

        return torch.from_numpy(reference_preprocess(img, self.pre))


class GridDistortion:
    """Albumentations-style grid distortion: the image is cut into `steps` x `steps` cells whose widths and
    heights are scaled by 1 + U(-limit, limit), then remapped piecewise-linearly."""

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
        return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="reflection", align_corners=True)[0]


class TrainTransform:
    """The seed's augmentations: random resized crop (ratio 1), colour jitter, flips, rotate-90, blur, grid
    distortion; then the bundle's normalisation."""

    def __init__(self, pre: Preprocess, aug: dict[str, Any]):
        import torchvision.transforms as T

        self.pre, self.aug = pre, aug
        interp = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}[pre.interpolation]
        self.crop = T.RandomResizedCrop(pre.input_size, scale=tuple(aug["crop_scale"]), ratio=(1.0, 1.0),
                                        interpolation=interp)
        lo, hi = aug["blur_kernel"]
        self.blur_sizes = [k for k in range(int(lo), int(hi) + 1) if k % 2]
        self.jitter = T.ColorJitter(aug["brightness"], aug["contrast"], aug["saturation"], aug["hue"])
        self.grid = GridDistortion(int(aug["grid_steps"]), float(aug["grid_limit"]))
        self.normalize = T.Normalize(pre.mean, pre.std)

    def __call__(self, img: Any) -> Any:
        import torch
        import torchvision.transforms.functional as TF

        a = self.aug
        img = self.crop(img)
        if random.random() < a["color_jitter_p"]:
            img = self.jitter(img)  # on PIL: torchvision's tensor hue shift is ~50x slower
        x = TF.pil_to_tensor(img).float() / 255.0
        if random.random() < a["hflip"]:
            x = x.flip(-1)
        if random.random() < a["vflip"]:
            x = x.flip(-2)
        if random.random() < a["rot90"]:
            x = torch.rot90(x, random.randint(1, 3), (-2, -1))
        if self.blur_sizes and random.random() < a["blur_p"]:
            x = TF.gaussian_blur(x, random.choice(self.blur_sizes))
        if random.random() < a["grid_distortion_p"]:
            x = self.grid(x)
        return self.normalize(x.clamp(0, 1)).contiguous()


def seed_worker(worker_id: int) -> None:
    """Distinct, reproducible augmentation streams per DataLoader worker."""
    import torch

    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)
