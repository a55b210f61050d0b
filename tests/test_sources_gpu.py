"""DALI on a GPU: NVDEC video (H.264, several keyframe-aligned readers) and nvJPEG images, every frame once,
frame-exact `start`, pixels on the GPU in the engine's dtype, parity with the reference. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capsule_batch.sources import open_source
from capsule_batch.sources.base import choose_source
from tests.test_sources import BATCH, CROP_PRE, FRAMES, read_all, rec, reference  # noqa: F401 - rec is a fixture

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.dali,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GPU_CASES = [("h264.mp4", {}), ("h264.mp4", {"readers": 3, "chunk": 10}), ("vp9.webm", {}), ("jpg", {}), ("png", {})]
GPU_IDS = ["h264", "h264-ranges", "vp9", "jpg", "png"]


@pytest.mark.parametrize("name,kw", GPU_CASES, ids=GPU_IDS)
@pytest.mark.parametrize("start", [0, 37])
def test_dali_gpu_every_frame_once(rec: Path, name: str, kw: dict, start: int) -> None:  # noqa: F811
    index, stamps, _, failures, src = read_all(rec / name, "dali", device=torch.device("cuda", 0), start=start, **kw)
    assert index == stamps == list(range(start, FRAMES))
    assert failures == []


@pytest.mark.parametrize("name,kw", GPU_CASES, ids=GPU_IDS)
def test_dali_gpu_parity_device_and_dtype(rec: Path, name: str, kw: dict) -> None:  # noqa: F811
    with open_source(rec / name, CROP_PRE, source="dali", batch_size=BATCH, device=torch.device("cuda", 0),
                     dtype=torch.float16, **kw) as src:
        batches = list(src)
    assert all(b.pixels.is_cuda and b.pixels.dtype == torch.float16 for b in batches)
    got = torch.cat([b.pixels for b in batches]).float().cpu()
    ref = torch.from_numpy(reference(rec / name))
    # nvJPEG/NVDEC colour conversion differs from libjpeg/swscale by a few uint8 levels (0.0174 each)
    bound = 0.2 if not (rec / name).is_dir() else 0.07
    assert (got - ref).abs().max().item() <= bound


def test_auto_picks_dali_on_a_gpu(rec: Path) -> None:  # noqa: F811
    assert choose_source(rec / "h264.mp4", torch.device("cuda", 0)) == "dali"
    assert choose_source(rec / "png", torch.device("cuda", 0)) == "dali"


@pytest.mark.parametrize("name", ["h264.mp4", "vp9.webm", "jpg", "png"])
def test_dali_gpu_seed_transform_matches_albumentations(rec: Path, name: str) -> None:  # noqa: F811
    """The seed's whole-frame INTER_CUBIC without antialiasing on the GPU: DALI decodes (NVDEC/nvJPEG), torch
    resizes on the GPU; within one uint8 level of albumentations applied to the frames DALI decoded."""
    import os

    import numpy as np

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A
    import cv2

    from capsule_batch.preprocess import IMAGENET_STD, Preprocess, seed_preprocess

    cuda = torch.device("cuda", 0)
    pre = seed_preprocess(64)
    with open_source(rec / name, pre, source="dali", batch_size=BATCH, device=cuda, dtype=torch.float16) as src:
        batches = list(src)
    assert all(b.pixels.is_cuda and b.pixels.dtype == torch.float16 for b in batches)
    got = torch.cat([b.pixels for b in batches]).float().cpu().numpy()
    identity = Preprocess(input_size=96, resize=96, resize_mode="whole", interpolation="bicubic", antialias=False,
                          mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    with open_source(rec / name, identity, source="dali", batch_size=BATCH, device=cuda) as src:
        frames = torch.cat([b.pixels for b in src]).permute(0, 2, 3, 1).cpu().numpy()
    frames = np.clip(np.rint(frames * 255), 0, 255).astype(np.uint8)
    alb = A.Compose([A.Resize(64, 64, interpolation=cv2.INTER_CUBIC), A.Normalize()])
    ref = np.stack([alb(image=f)["image"].transpose(2, 0, 1) for f in frames])
    std = np.asarray(IMAGENET_STD).reshape(1, 3, 1, 1)
    # fp16 output adds at most ~0.001 in normalised units (~0.06 levels) to the one level
    assert (np.abs(got - ref) * std * 255).max() <= 1.1
