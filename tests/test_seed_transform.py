"""The seed's validation/inference transform, checked against albumentations itself (the seed's version, 1.4.19):
`A.Resize(224, 224, interpolation=cv2.INTER_CUBIC)` on the whole frame, `CenterCrop(224)`, `Normalize()`.

Every CPU source (decord, images, DALI on images and VP9/MJPEG video) on 336x336, 576x576 and 512x384 frames is
within one uint8 level per pixel of albumentations applied to the same decoded frames, and a seed-format
checkpoint imported as a bundle gives probabilities within 2e-3 of the seed's own pipeline. Old bundles keep
their meaning."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would look for updates on import

import albumentations as A  # noqa: E402
import av  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from capsule_batch.errors import BundleError  # noqa: E402
from capsule_batch.model.bundle import ModelBundle, import_checkpoint  # noqa: E402
from capsule_batch.model.preprocess import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    SEED_PREPROCESS,
    Preprocess,
    preprocess_batch,
    reference_preprocess,
)
from capsule_batch.sources import open_source  # noqa: E402
from capsule_batch.sources.base import list_frames  # noqa: E402

SIZES = [(336, 336), (576, 576), (384, 512)]  # (height, width): 512x384 is the non-square one
IDS = ["336x336", "576x576", "512x384"]
FRAMES = 5
SEED_ALB = A.Compose([A.Resize(224, 224, interpolation=cv2.INTER_CUBIC), A.CenterCrop(224, 224), A.Normalize()])
VIDEO = {"h264.mp4": ("libx264", "yuv420p"), "vp9.webm": ("libvpx-vp9", "yuv420p"), "mjpeg.avi": ("mjpeg", "yuvj420p")}


def frames_of(h: int, w: int, seed: int) -> list[np.ndarray]:
    """Smooth colour fields with sharp-edged shapes and fine texture: the cubic kernel overshoots at the edges."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(FRAMES):
        base = np.asarray(Image.fromarray(rng.integers(30, 230, (10, 10, 3), dtype=np.uint8)).resize((w, h),
                          Image.BICUBIC), np.float64)
        for _ in range(6):
            y, x = rng.integers(0, h - 40), rng.integers(0, w - 40)
            base[y:y + rng.integers(8, 80), x:x + rng.integers(8, 80)] = rng.integers(0, 256, 3)
        base += rng.normal(0, 5, (h, w, 3))
        out.append(np.clip(base, 0, 255).astype(np.uint8))
    return out


def write_video(path: Path, frames: list[np.ndarray]) -> None:
    encoder, pix_fmt = VIDEO[path.name]
    with av.open(str(path), "w") as c:
        s = c.add_stream(encoder, rate=Fraction(4))
        s.height, s.width = frames[0].shape[:2]
        s.pix_fmt = pix_fmt
        s.options = {"crf": "18"} if encoder != "mjpeg" else {"q:v": "3"}
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], Path]:
    out = {}
    for k, (h, w) in enumerate(SIZES):
        d = tmp_path_factory.mktemp(f"rec{h}x{w}")
        frames = frames_of(h, w, k)
        for ext in ("jpg", "png"):
            (d / ext).mkdir()
            for i, f in enumerate(frames):
                Image.fromarray(f).save(d / ext / f"frame_{i}.{ext}", **({"quality": 92} if ext == "jpg" else {}))
        for name in VIDEO:
            write_video(d / name, frames)
        out[(h, w)] = d
    return out


def dali_run(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, np.ndarray]:
    """The DALI source's output and the uint8 frames DALI decoded for it (its own YUV->RGB conversion), captured
    where they are handed to the resize."""
    import capsule_batch.sources.dali as dali

    seen: list[np.ndarray] = []
    real = dali.preprocess_batch

    def capture(frames: torch.Tensor, pre: Preprocess, *a: object, **kw: object) -> torch.Tensor:
        seen.append(frames.cpu().numpy().copy())
        return real(frames, pre, *a, **kw)

    monkeypatch.setattr(dali, "preprocess_batch", capture)
    with open_source(path, SEED_PREPROCESS, source="dali", batch_size=3) as src:
        got = torch.cat([b.pixels for b in src]).numpy()
    return got, np.concatenate(seen)


def reference_decode(path: Path) -> np.ndarray:
    if path.is_dir():
        return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in list_frames(path)])
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def seed_pixels(frames: np.ndarray) -> np.ndarray:
    """The seed's own pipeline: albumentations on uint8 RGB frames -> (N, 3, 224, 224) float32."""
    return np.stack([SEED_ALB(image=f)["image"].transpose(2, 0, 1) for f in frames])


def levels(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference in uint8 levels between two ImageNet-normalized (N, 3, H, W) arrays."""
    std = np.asarray(IMAGENET_STD, np.float64).reshape(1, 3, 1, 1)
    return float((np.abs(a.astype(np.float64) - b.astype(np.float64)) * std * 255).max())


CASES = [("h264.mp4", "decord"), ("jpg", "images"), ("png", "images"), ("jpg", "dali"), ("png", "dali"),
         ("vp9.webm", "dali"), ("mjpeg.avi", "dali")]


@pytest.mark.parametrize("hw", SIZES, ids=IDS)
@pytest.mark.parametrize(("name", "source"), CASES, ids=[f"{s}-{n}" for n, s in CASES])
def test_every_cpu_source_matches_albumentations(recordings, hw: tuple[int, int], name: str, source: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = recordings[hw] / name
    if source == "dali" and not path.is_dir():
        # DALI decodes video with its own YUV->RGB conversion (tens of levels from FFmpeg's at sharp colour
        # edges): the transform is compared on the frames DALI decoded
        got, frames = dali_run(path, monkeypatch)
        assert frames.dtype == np.uint8 and frames.shape == (FRAMES, *hw, 3)
    else:
        with open_source(path, SEED_PREPROCESS, source=source, batch_size=3) as src:
            got = torch.cat([b.pixels for b in src]).numpy()
        frames = reference_decode(path)
    assert got.shape == (FRAMES, 3, 224, 224)
    assert levels(got, seed_pixels(frames)) <= 1.0 + 1e-3


@pytest.mark.parametrize("hw", SIZES, ids=IDS)
def test_reference_and_batch_paths_match_albumentations_and_cv2(hw: tuple[int, int]) -> None:
    frames = np.stack(frames_of(*hw, seed=7))
    ref = seed_pixels(frames)
    assert levels(np.stack([reference_preprocess(f, SEED_PREPROCESS) for f in frames]), ref) <= 1.0 + 1e-3
    assert levels(preprocess_batch(torch.from_numpy(frames), SEED_PREPROCESS).numpy(), ref) <= 1.0 + 1e-3
    # torch's uint8 bicubic kernel would not do: it rounds and clamps between its two passes
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    u8 = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False, antialias=False)
    cv = np.stack([cv2.resize(f, (224, 224), interpolation=cv2.INTER_CUBIC) for f in frames])
    assert np.abs(u8.permute(0, 2, 3, 1).numpy().astype(int) - cv).max() >= 1


@pytest.fixture(scope="module")
def seed_bundle(tmp_path_factory: pytest.TempPathFactory) -> ModelBundle:
    """A seed-format Lightning checkpoint (backbone.* + classifier.linear.*) imported as a bundle."""
    torch.manual_seed(3)
    backbone = timm.create_model("eva02_tiny_patch14_224", pretrained=False, num_classes=0, depth=2)
    head = torch.nn.Linear(backbone.num_features, 10)
    with torch.no_grad():  # confident predictions, so that pixel differences show in the probabilities
        head.weight.normal_(0, 1.5)
    sd = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    sd |= {f"classifier.linear.{k}": v for k, v in head.state_dict().items()}
    d = tmp_path_factory.mktemp("seedckpt")
    torch.save({"state_dict": sd, "epoch": 3}, d / "seed.ckpt")
    return import_checkpoint(d / "seed.ckpt", d / "bundle", arch="eva02_tiny_patch14_224", model_args={"depth": 2})


def _probs(model: torch.nn.Module, x: np.ndarray | torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(model(torch.as_tensor(x)), 1).numpy()


@pytest.mark.parametrize("hw", SIZES, ids=IDS)
def test_seed_checkpoint_probabilities_match_the_seed_pipeline(recordings, seed_bundle: ModelBundle,
                                                               hw: tuple[int, int]) -> None:
    assert seed_bundle.preprocess == SEED_PREPROCESS
    model = seed_bundle.create_model()
    path = recordings[hw] / "jpg"
    with open_source(path, seed_bundle.preprocess, source="images", batch_size=8) as src:
        got = _probs(model, torch.cat([b.pixels for b in src]))
    frames = reference_decode(path)
    seed = _probs(model, seed_pixels(frames))
    assert np.abs(got - seed).max() <= 2e-3
    # what the import recorded before (bilinear shorter side, antialiased, center crop) is far off
    old = Preprocess(input_size=224, resize=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    old_probs = _probs(model, np.stack([reference_preprocess(f, old) for f in frames]))
    assert np.abs(old_probs - seed).max() > 10 * max(np.abs(got - seed).max(), 2e-3)


def test_old_bundles_keep_their_meaning() -> None:
    old = Preprocess.from_dict({"input_size": 224, "resize": 256, "crop": "center", "interpolation": "bilinear",
                                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})
    assert (old.resize_mode, old.antialias) == ("shorter", True)
    assert old.resized_shape(300, 400) == (256, 341) and old.crop_box(300, 400) == (16, 58)
    no_crop = Preprocess.from_dict({"input_size": 56, "resize": 56, "crop": "none"})
    assert no_crop.resize_mode == "whole" and no_crop.resized_shape(30, 90) == (56, 56)
    assert Preprocess.from_dict(old.to_dict()) == old
    assert Preprocess.from_dict(SEED_PREPROCESS.to_dict()) == SEED_PREPROCESS
    # an antialiased bundle still matches PIL exactly
    img = frames_of(336, 336, 1)[0]
    pil = np.asarray(Image.fromarray(img).resize((256, 256), Image.BILINEAR), np.float32)
    ref = reference_preprocess(img, old)
    top = (256 - 224) // 2
    expect = ((pil[top:top + 224, top:top + 224] / 255 - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
    assert np.abs(ref - expect).max() < 1e-5


@pytest.mark.parametrize(("change", "message"), [
    ({"resize_mode": "longer"}, "resize_mode: must be one of"),
    ({"antialias": "no"}, "antialias: must be true or false"),
    ({"crop": "none", "resize_mode": "shorter"}, "crop 'none' resizes the whole frame"),
    ({"antialiasing": False}, "unknown keys ['antialiasing']"),
])
def test_bad_preprocess_fields_are_refused(change: dict, message: str) -> None:
    with pytest.raises(BundleError, match=__import__("re").escape(message)):
        Preprocess.from_dict({"input_size": 224, "resize": 224, **change})
