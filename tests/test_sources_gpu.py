"""DALI on a GPU: NVDEC video (H.264, several keyframe-aligned readers) and nvJPEG images, every frame once,
frame-exact `start`, pixels on the GPU in the engine's dtype, parity with the reference; decoding never waits for
the engine's stream. Skipped without CUDA.

The recordings here are 160x160, not the CPU tests' 96x96: NVDEC has minimum frame sizes per codec (queried at
run time with cuvidGetDecoderCaps; 128x128 is the figure usually given for VP9 and AV1, 144x144 for HEVC), and 96
is under them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from capsule_batch.sources import open_source
from capsule_batch.sources.base import choose_source
from capsule_batch.sources.synthesize import synthesize
from tests.test_sources import BATCH, CROP_PRE, FRAMES, read_all, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.dali,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GPU_SIZE = 160


@pytest.fixture(scope="module")
def rec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("gpu-recordings")
    for name in ("h264.mp4", "vp9.webm", "png", "jpg"):
        codec = {"h264.mp4": "h264", "vp9.webm": "vp9"}.get(name, name)
        synthesize(d / name, FRAMES, codec=codec, size=GPU_SIZE, stamp=True, seed=1)
    return d

GPU_CASES = [("h264.mp4", {}), ("h264.mp4", {"readers": 3, "chunk": 10}), ("vp9.webm", {}), ("jpg", {}), ("png", {})]
GPU_IDS = ["h264", "h264-ranges", "vp9", "jpg", "png"]


@pytest.mark.parametrize("name,kw", GPU_CASES, ids=GPU_IDS)
@pytest.mark.parametrize("start", [0, 37])
def test_dali_gpu_every_frame_once(rec: Path, name: str, kw: dict, start: int) -> None:
    index, stamps, _, failures, src = read_all(rec / name, "dali", device=torch.device("cuda", 0), start=start, **kw)
    assert index == stamps == list(range(start, FRAMES))
    assert failures == []


@pytest.mark.parametrize("name,kw", GPU_CASES, ids=GPU_IDS)
def test_dali_gpu_parity_device_and_dtype(rec: Path, name: str, kw: dict) -> None:
    with open_source(rec / name, CROP_PRE, source="dali", batch_size=BATCH, device=torch.device("cuda", 0),
                     dtype=torch.float16, **kw) as src:
        batches = list(src)
    assert all(b.pixels.is_cuda and b.pixels.dtype == torch.float16 for b in batches)
    got = torch.cat([b.pixels for b in batches]).float().cpu()
    ref = torch.from_numpy(reference(rec / name))
    # nvJPEG/NVDEC colour conversion differs from libjpeg/swscale by a few uint8 levels (0.0174 each)
    bound = 0.2 if not (rec / name).is_dir() else 0.07
    assert (got - ref).abs().max().item() <= bound


def test_auto_picks_dali_on_a_gpu(rec: Path) -> None:
    assert choose_source(rec / "h264.mp4", torch.device("cuda", 0)) == "dali"
    assert choose_source(rec / "png", torch.device("cuda", 0)) == "dali"


@pytest.mark.parametrize("name", ["h264.mp4", "vp9.webm", "jpg", "png"])
def test_dali_gpu_seed_transform_matches_albumentations(rec: Path, name: str) -> None:
    """The seed's whole-frame INTER_CUBIC without antialiasing on the GPU: DALI decodes (NVDEC/nvJPEG), torch
    resizes on the GPU; within one uint8 level of albumentations applied to the frames DALI decoded."""
    import os

    import numpy as np

    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A
    import cv2

    from capsule_batch.model.preprocess import IMAGENET_STD, Preprocess, seed_preprocess

    cuda = torch.device("cuda", 0)
    pre = seed_preprocess(64)
    with open_source(rec / name, pre, source="dali", batch_size=BATCH, device=cuda, dtype=torch.float16) as src:
        batches = list(src)
    assert all(b.pixels.is_cuda and b.pixels.dtype == torch.float16 for b in batches)
    got = torch.cat([b.pixels for b in batches]).float().cpu().numpy()
    identity = Preprocess(input_size=GPU_SIZE, resize=GPU_SIZE, resize_mode="whole", interpolation="bicubic",
                          antialias=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    with open_source(rec / name, identity, source="dali", batch_size=BATCH, device=cuda) as src:
        frames = torch.cat([b.pixels for b in src]).permute(0, 2, 3, 1).cpu().numpy()
    frames = np.clip(np.rint(frames * 255), 0, 255).astype(np.uint8)
    alb = A.Compose([A.Resize(64, 64, interpolation=cv2.INTER_CUBIC), A.Normalize()])
    ref = np.stack([alb(image=f)["image"].transpose(2, 0, 1) for f in frames])
    std = np.asarray(IMAGENET_STD).reshape(1, 3, 1, 1)
    # fp16 output adds at most ~0.001 in normalised units (~0.06 levels) to the one level
    assert (np.abs(got - ref) * std * 255).max() <= 1.1


def _busy_default_stream() -> torch.cuda.Event:
    """Queue about a second of GPU work on the legacy default stream (where a run's engine works); the event is
    done when that work is."""
    torch.cuda._sleep(2_000_000_000)  # GPU clock cycles
    done = torch.cuda.Event()
    done.record()
    return done


@pytest.mark.parametrize("how", ["decord-path", "dali-h264", "dali-seed"])
def test_decoding_never_waits_for_the_engine_stream(rec: Path, how: str) -> None:
    """A decode thread's copies and kernels go to its own stream: no pageable copy (`x.to(cuda)`), no
    `torch.tensor(..., device=cuda)`, no boolean-mask indexing and no synchronise on the default stream, so a batch
    is ready while the engine's work queued before it is still running."""
    from capsule_batch.model.preprocess import seed_preprocess
    from capsule_batch.sources.base import to_pixels

    cuda = torch.device("cuda", 0)
    if how == "decord-path":
        frames = np.random.default_rng(0).integers(0, 255, (BATCH, GPU_SIZE, GPU_SIZE, 3), dtype=np.uint8)
        to_pixels(frames, CROP_PRE, cuda, torch.float16)  # first use: pinned pool, constants
        busy = _busy_default_stream()
        pixels = to_pixels(frames, CROP_PRE, cuda, torch.float16)
    else:
        pre = seed_preprocess(64) if how == "dali-seed" else CROP_PRE
        src = open_source(rec / "h264.mp4", pre, source="dali", batch_size=BATCH, device=cuda, dtype=torch.float16)
        batches = iter(src)
        next(batches)  # the pipeline is built and running
        busy = _busy_default_stream()
        pixels = next(batches).pixels
    assert not busy.query(), "decoding waited for the work queued on the default stream"
    assert pixels.is_cuda and pixels.dtype == torch.float16 and torch.isfinite(pixels).all()
    torch.cuda.synchronize()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_the_result_copy_of_cuda_1_is_waited_for_on_cuda_1() -> None:
    """A thread whose current device is 0 (every thread starts so) copies results from cuda:1: the copy's event is
    recorded on cuda:1's stream, so the host waits for the copy, queued here behind a second of work on cuda:1."""
    from capsule_batch.run.stages import _host_result, _start_host_copy

    x = torch.randn(4096, 10, device="cuda:1")
    expected = x.cpu().numpy()
    with torch.cuda.device(1):
        torch.cuda._sleep(2_000_000_000)
    assert torch.cuda.current_device() == 0
    host, done = _start_host_copy(x)
    np.testing.assert_array_equal(_host_result(host, done), expected)

