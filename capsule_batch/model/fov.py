"""The field of view: the lens image inside a capsule frame, without the dark border and what is burned in around it.

Capsule exports put the round or octagonal lens image on a dark canvas, and many burn text into that canvas (clock,
date, frame counter, the device's name): on a PillCam export about 28 % of a whole-frame resize is border and text.
A bundle whose `Preprocess.field_of_view` is `fov` crops every frame to its field of view before the usual resize:
the model sees the lens image, enlarged, and black outside it. `full` (the default, and the seed's recipe) resizes the
whole frame. The same function does it for training (augmentations start from the cropped frame), for validation
(`reference_preprocess`) and for every source (`preprocess_batch`), so what was trained is what runs.

Detection, per frame, on a copy scaled to `GRID` pixels on its longer side (so it costs the same for any frame size):
1. dark = luminance below `DARK` (0..255);
2. the background is the dark pixels connected to the frame's edge (flood fill by repeated 3x3 dilation); dark
   pixels inside the lens (the lumen) are not connected to the edge and stay in;
3. the field of view is the part of the rest that is connected to the frame's centre: text and logos in the border
   are separated from the lens by background and fall out.
The mask is scaled back to the frame (bilinear, at 0.5: a smooth edge), the frame is cropped to the mask's bounding
box and pixels outside the mask are set to black. A frame without a usable field of view (the mask covers less than
`MIN_SHARE` of the frame: a black or blown-out frame) is kept whole.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FIELDS_OF_VIEW = ("full", "fov")
#: longer side of the detection grid, in pixels
GRID = 96
#: luminance (0..255) below which a pixel may be border
DARK = 24.0
#: a field of view covering less of the frame than this is taken as a failed detection (the frame is kept whole)
MIN_SHARE = 0.1


def _flood(seed: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Grow `seed` inside `allowed` ((N,h,w) bool) through 8-connected neighbours until it stops changing."""
    region = seed & allowed
    for step in range(region.shape[1] + region.shape[2]):
        grown = region.copy()
        grown[:, 1:] |= region[:, :-1]
        grown[:, :-1] |= region[:, 1:]
        rows = grown.copy()
        grown[:, :, 1:] |= rows[:, :, :-1]
        grown[:, :, :-1] |= rows[:, :, 1:]
        grown &= allowed
        if step % 4 == 3 and np.array_equal(grown, region):
            return grown
        region = grown
    return region


def fov_masks(frames: Any) -> Any:
    """(N,H,W,3) uint8 frames (torch, any device) -> (N,H,W) bool field-of-view masks on the CPU (see the module
    docstring; a frame without a usable field of view gets an all-true mask)."""
    import torch
    import torch.nn.functional as F

    n, h, w, _ = frames.shape
    scale = GRID / max(h, w)
    gh, gw = max(3, round(h * scale)), max(3, round(w * scale))
    step = max(1, int(1 / scale) // 2)  # every step-th pixel is plenty for a GRID-pixel average: 4x less to convert
    sub = frames.detach()[:, ::step, ::step].to("cpu", torch.float32)
    lum = sub.mean(-1, keepdim=True).permute(0, 3, 1, 2)
    dark = F.interpolate(lum, size=(gh, gw), mode="area")[:, 0].numpy() < DARK
    edge = np.zeros_like(dark)
    edge[:, [0, -1], :] = True
    edge[:, :, [0, -1]] = True
    background = _flood(edge, dark)
    centre = np.zeros_like(dark)
    centre[:, gh // 2 - 1: gh // 2 + 2, gw // 2 - 1: gw // 2 + 2] = True
    inside = _flood(centre, ~background)
    inside[inside.mean(axis=(1, 2)) < MIN_SHARE] = True
    up = F.interpolate(torch.from_numpy(inside[:, None].astype(np.float32)), size=(h, w), mode="bilinear",
                       align_corners=False)
    return up[:, 0] >= 0.5


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def crop_to_fov(frame: np.ndarray) -> np.ndarray:
    """One (H,W,3) uint8 frame cropped to its field of view, black outside it (training's and the reference's
    path; `crop_batch` is the same for a batch)."""
    import torch

    return crop_batch(torch.from_numpy(np.require(frame, np.uint8, ['C', 'W']))[None])[0][0].numpy()


def crop_batch(frames: Any) -> list[Any]:
    """(N,H,W,3) uint8 torch frames -> each cropped to its field of view and black outside it, as (1,h,w,3) uint8
    tensors on the frames' device (sizes differ from frame to frame; only the low-resolution masks are computed on
    the CPU)."""
    masks = fov_masks(frames).numpy()
    out = []
    for i in range(frames.shape[0]):
        m = masks[i]
        if m.all():
            out.append(frames[i:i + 1])
            continue
        y0, y1, x0, x1 = _box(m)
        keep = frames.new_tensor(m[y0:y1, x0:x1, None].astype(np.uint8))
        out.append((frames[i, y0:y1, x0:x1] * keep)[None])
    return out


__all__ = ["DARK", "FIELDS_OF_VIEW", "GRID", "MIN_SHARE", "crop_batch", "crop_to_fov", "fov_masks"]
