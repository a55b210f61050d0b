"""Masked image modelling against a frozen teacher: the objective of `python -m train adapt`.

EVA-02's recipe with the starting weights as the teacher: the student sees a frame whose patches are
replaced, in rectangular blocks, by a learned mask token, and predicts through a linear head what the
frozen teacher computes for those patches on the whole frame (its final patch features, standardised
over the frame's patches); the loss is 1 - cosine similarity, over the masked patches only. The teacher
never changes, so the targets cannot collapse and the features stay in the space the classifier was
trained on, while the student learns the look of the new recordings (why this objective: docs/training.md).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from typing import Any

import numpy as np

_logger = logging.getLogger(__name__)


def block_mask(grid: tuple[int, int], ratio: float, rng: np.random.Generator, min_block: int = 4,
               aspect: tuple[float, float] = (0.3, 1 / 0.3), attempts: int = 10) -> np.ndarray:
    """A (rows, cols) bool mask with exactly round(ratio * rows * cols) patches masked, in rectangles.

    BEiT-style blockwise masking: rectangles of random area (at least `min_block` patches, at most what is
    left to mask) and aspect ratio (log-uniform in `aspect`) at random places, until the count is reached;
    when no rectangle adds patches without overshooting, the rest are single random patches.
    """
    rows, cols = grid
    target = int(round(ratio * rows * cols))
    mask = np.zeros((rows, cols), bool)
    lo_ar, hi_ar = math.log(aspect[0]), math.log(aspect[1])
    failures = 0
    while mask.sum() < target and failures < attempts:
        left = target - int(mask.sum())
        area = rng.uniform(min(min_block, left), left)
        ar = math.exp(rng.uniform(lo_ar, hi_ar))
        h = max(1, min(rows, int(round(math.sqrt(area * ar)))))
        w = max(1, min(cols, int(round(math.sqrt(area / ar)))))
        top, lft = int(rng.integers(0, rows - h + 1)), int(rng.integers(0, cols - w + 1))
        block = mask[top : top + h, lft : lft + w]
        new = int((~block).sum())
        if 0 < new <= left:
            block[...] = True
            failures = 0
        else:
            failures += 1
    left = target - int(mask.sum())
    if left > 0:
        free = np.flatnonzero(~mask.ravel())
        mask.ravel()[rng.choice(free, left, replace=False)] = True
    return mask


def batch_masks(n: int, grid: tuple[int, int], ratio: float, rng: np.random.Generator, min_block: int) -> Any:
    """(n, rows*cols) bool tensor of block masks, one per frame."""
    import torch

    return torch.from_numpy(np.stack([block_mask(grid, ratio, rng, min_block).ravel() for _ in range(n)]))


def make_student(backbone: Any) -> Any:
    """The student: `backbone` (a timm ViT, trained in place) + a mask token + a linear predictor.

    The mask token replaces the patch embeddings of masked patches through a forward hook on
    `patch_embed`, so timm's own `forward_features` (position embeddings, RoPE, blocks, final norm) runs
    unchanged. The predictor starts as the identity: before any step the student's unmasked patches
    already equal the teacher's, and the loss measures only what masking removed.
    """
    import torch

    class Student(torch.nn.Module):
        def __init__(self, backbone: Any):
            super().__init__()
            self.backbone = backbone
            dim = int(backbone.embed_dim)
            self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
            torch.nn.init.trunc_normal_(self.mask_token, std=0.02)
            self.predictor = torch.nn.Linear(dim, dim)
            with torch.no_grad():
                self.predictor.weight.copy_(torch.eye(dim))
                self.predictor.bias.zero_()
            self._mask: Any = None
            backbone.patch_embed.register_forward_hook(self._replace_masked)

        def _replace_masked(self, module: Any, args: Any, out: Any) -> Any:
            if self._mask is None:
                return out
            m = self._mask.reshape(out.shape[:-1] + (1,)).to(out.dtype)  # (B, N, 1) or (B, H, W, 1)
            return out * (1 - m) + self.mask_token.to(out.dtype).reshape((1,) * (out.ndim - 1) + (-1,)) * m

        def forward(self, x: Any, mask: Any) -> Any:
            """Predictions for the masked patches only: (number of masked patches in the batch, dim)."""
            self._mask = mask
            try:
                feats = self.backbone.forward_features(x)
            finally:
                self._mask = None
            patches = feats[:, self.backbone.num_prefix_tokens :]
            return self.predictor(patches[mask])

    return Student(backbone)


def make_teacher(backbone: Any) -> Any:
    """A frozen copy of the starting weights, in eval mode."""
    teacher = copy.deepcopy(backbone).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def teacher_targets(teacher: Any, x: Any) -> Any:
    """The teacher's final patch features of the unmasked frames, standardised per channel over each frame's
    patches: (B, N, dim).

    A ViT's patch features share a large common component (their cosine similarity is near 1 whatever the
    content), which would let a student score almost perfectly by predicting it; removing each frame's mean
    over its patches (and scaling each channel to unit variance, data2vec's instance norm) leaves what is
    specific to each patch.
    """
    import torch

    with torch.no_grad():
        feats = teacher.forward_features(x)[:, teacher.num_prefix_tokens :].float()
        mean = feats.mean(1, keepdim=True)
        var = feats.var(1, unbiased=False, keepdim=True)
        return (feats - mean) / torch.sqrt(var + 1e-6)


def mim_loss(pred: Any, targets: Any, mask: Any) -> Any:
    """Mean 1 - cosine similarity between the predictions and the teacher's features of the masked patches;
    the targets of unmasked patches are never read."""
    import torch.nn.functional as F

    return (1 - F.cosine_similarity(pred.float(), targets[mask].float(), dim=-1)).mean()


def grid_size(backbone: Any) -> tuple[int, int]:
    rows, cols = backbone.patch_embed.grid_size
    return int(rows), int(cols)


def freeze_off_path(student: Any, input_size: int) -> list[str]:
    """Freeze the parameters the features do not depend on (the classifier head, a pooling norm) and return
    their names: they keep their values, and DDP needs every trainable parameter to get a gradient."""
    import torch

    dev = next(student.parameters()).device
    grid = grid_size(student.backbone)
    mask = torch.zeros((1, grid[0] * grid[1]), dtype=torch.bool, device=dev)
    mask[0, 0] = True
    student.zero_grad(set_to_none=True)
    student(torch.zeros(1, 3, input_size, input_size, device=dev), mask).sum().backward()
    unused = [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in student.named_parameters():
        p.grad = None
        if n in unused:
            p.requires_grad_(False)
    return unused


def weights_digest(module: Any) -> str:
    """sha256 over a module's tensors (names, shapes, dtypes, bytes): the identity of the teacher on resume."""
    import torch

    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
