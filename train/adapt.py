"""`python -m train adapt`: continued self-supervised pre-training on a hospital's own unlabelled recordings.

The backbone of a bundle (or checkpoint) is trained by masked image modelling against a frozen copy of
itself (`train/mim.py`) on frames streamed from unlabelled recordings (`train/recordings.py`): video files
and frame folders read through `capsule_batch.sources`, sampled across each whole recording, optionally
without the frames a given bundle calls uninformative. It runs like the supervised stages (layered config,
DDP under torchrun, resumable from `last.pt`, a run folder with its resolved config) and ends in a bundle
that `finetune` takes as `model.init`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from capsule_batch.model.bundle import META_FILE, ModelBundle, save_bundle
from capsule_batch.model.preprocess import Preprocess
from train import data as D
from train.config import git_revision
from train.mim import (
    batch_masks,
    freeze_off_path,
    grid_size,
    make_student,
    make_teacher,
    mim_loss,
    teacher_targets,
    weights_digest,
)
from train.recordings import FrameFilter, FrameStream, Recording, find_recordings
from train.trainer import (
    BUNDLE_DIR,
    LAST,
    Dist,
    TrainError,
    _autocast,
    _broadcast,
    _precision,
    build_model,
    epoch_lr,
    epoch_sums,
    run_folder,
    save_last,
)
from train.transforms import make_preprocess

_logger = logging.getLogger(__name__)

OBJECTIVE = "mim-frozen-teacher"
_ADAM_LIKE = ("adam", "belief", "lamb", "lion")


def init_bundle(cfg: dict[str, Any]) -> ModelBundle | None:
    """The bundle behind `model.init` (a bundle or run folder), or None for a checkpoint file / no init."""
    init = cfg["model"].get("init")
    if not init:
        return None
    p = Path(str(init))
    if p.is_dir() and not (p / META_FILE).is_file() and (p / BUNDLE_DIR / META_FILE).is_file():
        p = p / BUNDLE_DIR
    return ModelBundle.load(p) if p.is_dir() else None


@dataclass
class Start:
    cfg: dict[str, Any]  # with model.arch / model.model_args of the starting bundle
    classes: list[str]
    preprocess: Preprocess
    normal_class: str | None


def resolve_start(cfg: dict[str, Any]) -> Start:
    """The config with the architecture of the starting bundle, its class names and its preprocessing.

    Adapt continues a trained model, so the model is what `model.init` says it is: a bundle's arch,
    constructor args, classes and preprocessing are taken from it (a checkpoint file takes them from the
    config). Without starting weights there is no teacher worth matching: refused.
    """
    mc = cfg["model"]
    if not mc.get("init") and not mc.get("pretrained"):
        raise TrainError("adapt: give the starting weights (model.init=BUNDLE, a run folder or a checkpoint file); "
                         "they are the frozen teacher")
    bundle = init_bundle(cfg)
    cfg = {**cfg, "model": dict(mc)}
    if bundle is None:
        classes = D.class_list(cfg["data"]["classes"])
        pre = make_preprocess(cfg["data"], mc["arch"], dict(mc.get("model_args") or {}))
        return Start(cfg, classes, pre, "Normal" if "Normal" in classes else None)
    if (bundle.arch, dict(bundle.model_args)) != (mc["arch"], dict(mc.get("model_args") or {})):
        _logger.info("model %s %s, from %s", bundle.arch, bundle.model_args or "", bundle.path)
    cfg["model"].update(arch=bundle.arch, model_args=dict(bundle.model_args))
    return Start(cfg, list(bundle.class_names), bundle.preprocess, bundle.normal_class)


def _check(cfg: dict[str, Any], world: int) -> None:
    """The adapt keys, checked before anything starts: a bad value is a message naming the key."""
    ac, tc = cfg["adapt"], cfg["train"]
    batch = int(tc["batch_size"])

    def integer(v: Any, lo: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo

    checks: list[tuple[str, Callable[[Any], bool], str]] = [
        ("clip", lambda v: integer(v, 1), "must be an integer >= 1"),
        ("frames_per_epoch", lambda v: integer(v, batch * world),
         f"must be an integer >= train.batch_size x ranks ({batch * world})"),
        ("mask_ratio", lambda v: 0 < float(v) < 1, "must be in (0, 1)"),
        ("min_block", lambda v: integer(v, 1), "must be an integer >= 1"),
        ("crop_scale", lambda v: len(v) == 2 and 0 < float(v[0]) <= float(v[1]) <= 1,
         "must be [min, max] area fractions with 0 < min <= max <= 1"),
        *[(k, lambda v: 0 <= float(v) <= 1, "must be a probability in [0, 1]") for k in ("hflip", "vflip", "rot90")],
        ("warmup_steps", lambda v: integer(v, 0), "must be an integer >= 0"),
        ("shuffle_frames", lambda v: integer(v, 1), "must be an integer >= 1"),
    ]
    for key, ok, what in checks:
        try:
            good = bool(ok(ac[key]))
        except (TypeError, ValueError):
            good = False
        if not good:
            raise TrainError(f"adapt.{key}: {what}, got {ac[key]!r}")


def augment(x: Any, rng: np.random.Generator, ac: dict[str, Any]) -> Any:
    """Random resized crop (ratio 1), flips, rotate-90 per frame; the teacher and the student see the same view.

    No colour jitter: the look of the new recordings is what adapt should learn, not be made blind to.
    """
    import torch
    import torch.nn.functional as F

    n, _, s, _ = x.shape
    lo, hi = (float(v) for v in ac["crop_scale"])
    out = []
    for i in range(n):
        img = x[i]
        side = max(1, min(s, int(round(s * math.sqrt(rng.uniform(lo, hi))))))
        top, left = (int(v) for v in rng.integers(0, s - side + 1, 2))
        if side < s:
            img = F.interpolate(img[None, :, top : top + side, left : left + side], size=(s, s), mode="bilinear",
                                align_corners=False)[0]
        if rng.random() < float(ac["hflip"]):
            img = img.flip(-1)
        if rng.random() < float(ac["vflip"]):
            img = img.flip(-2)
        if rng.random() < float(ac["rot90"]):
            img = torch.rot90(img, int(rng.integers(1, 4)), (-2, -1))
        out.append(img)
    return torch.stack(out)


def train_step(student: Any, teacher: Any, optimizer: Any, scaler: Any, x: Any, mask: Any, params: list[Any],
               grad_clip: float, dtype: Any) -> Any:
    """One update: the teacher's targets for the whole frames, the student's loss on the masked patches, the
    optimizer step (gradients unscaled, then clipped); returns the loss, detached."""
    import torch

    with _autocast(x.device, dtype):
        loss = mim_loss(student(x, mask), teacher_targets(teacher, x), mask)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def make_optimizer(student: Any, tc: dict[str, Any]) -> Any:
    from timm.optim import create_optimizer_v2

    name = str(tc["optimizer"]).lower()
    kw = {"eps": float(tc["eps"]), "betas": tuple(tc["betas"])} if any(a in name for a in _ADAM_LIKE) else {}
    return create_optimizer_v2(student, opt=name, lr=float(tc["lr"]), weight_decay=float(tc["weight_decay"]),
                               filter_bias_and_bn=bool(tc["filter_bias_and_bn"]), **kw)


def run_adapt(cfg: dict[str, Any],
              on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Adapt the starting weights to `adapt.recordings`; returns the run summary (also summary.json)."""
    start = resolve_start(cfg)
    _check(start.cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before a run folder is made
    with run_folder(start.cfg, "adapt") as (dist, run_dir):
        return _adapt(start, dist, run_dir, on_epoch_end)


def _adapt(start: Start, dist: Dist, run_dir: Path,
           on_epoch_end: Callable[[int, dict[str, Any]], None] | None) -> dict[str, Any]:
    import torch

    cfg, classes, pre = start.cfg, start.classes, start.preprocess
    rc, tc, ac = cfg["run"], cfg["train"], cfg["adapt"]
    seed = int(rc["seed"])
    torch.manual_seed(seed)  # the same mask token and predictor on every rank
    random.seed(seed)
    entries = ac["recordings"] or []
    entries = [entries] if isinstance(entries, str) else list(entries)
    recordings: list[Recording] = _broadcast(
        dist, find_recordings(entries, pre, ac["source"], dist.device) if dist.main else None)
    fc = ac["filter"]
    frame_filter = None
    if fc.get("bundle"):
        frame_filter = FrameFilter(fc["bundle"], list(fc.get("classes") or []), float(fc["threshold"]), dist.device)

    model, init_info = build_model(cfg, classes)
    teacher = make_teacher(model).to(dist.device)  # copied before the student's hook is on `model`
    teacher_digest = weights_digest(teacher)
    # one move to the device for the backbone (`model`, trained in place) and the student's new layers
    student = make_student(model).to(dist.device)
    frozen = freeze_off_path(student, pre.input_size)
    _logger.info("teacher: the starting weights (%s), frozen; not trained (off the features' path): %s",
                 init_info.get("init"), ", ".join(frozen) or "-")
    dtype = _precision(rc["precision"], dist.device)
    optimizer = make_optimizer(student, tc)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=dtype == torch.float16)
    rec_list = [[str(r.path), r.frames] for r in recordings]

    start_epoch, step_total, frames_total = 0, 0, 0
    if rc["resume"] and (run_dir / LAST).exists():
        state = torch.load(run_dir / LAST, map_location="cpu", weights_only=True)
        if state.get("stage") != "adapt":
            raise TrainError(f"{run_dir / LAST}: not an adapt run ({state.get('stage') or 'a supervised stage'})")
        if state["teacher_sha256"] != teacher_digest:
            raise TrainError(f"{run_dir / LAST}: started from other weights than model.init={cfg['model']['init']} "
                             "(the teacher differs); resume with the run's own model.init")
        if state["recordings"] != rec_list:
            raise TrainError(f"{run_dir / LAST}: saved for other recordings ({len(state['recordings'])} then, "
                             f"{len(rec_list)} now); start a new run with model.init={run_dir} instead")
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step_total, frames_total = int(state["epoch"]) + 1, int(state["step"]), int(state["frames"])
        _logger.info("resuming %s after epoch %d", run_dir, start_epoch - 1)

    ddp = student
    if dist.active:
        ddp = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    grid = grid_size(model)
    batch = int(tc["batch_size"])
    per_epoch = int(ac["frames_per_epoch"])
    steps = math.ceil(per_epoch / (batch * dist.world))
    visits = math.ceil(per_epoch / int(ac["clip"]))
    warmup = int(ac["warmup_steps"])
    epochs = int(tc["epochs"])
    params = [p for p in student.parameters() if p.requires_grad]
    if start_epoch >= epochs:
        _logger.info("%s: all %d epochs are done already", run_dir, epochs)
    record: dict[str, Any] = {}
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        base_lr = epoch_lr(tc, epoch)
        stream = FrameStream(recordings, pre, source=ac["source"], clip=int(ac["clip"]), visits=visits, seed=seed,
                             epoch=epoch, rank=dist.rank, world=dist.world, device=dist.device,
                             buffer=int(ac["shuffle_frames"]), frame_filter=frame_filter)
        mask_rng = np.random.default_rng([seed, epoch, dist.rank, 0x6D61736B])
        aug_rng = np.random.default_rng([seed, epoch, dist.rank, 0x61756720])
        ddp.train()
        stats = epoch_sums(dist, 3)  # loss sum, frames, seconds waiting for frames
        wait = time.perf_counter()
        for step, (x, _, _) in enumerate(stream.batches(batch, steps)):
            stats[2] += time.perf_counter() - wait
            lr = base_lr * min(1.0, (step_total + 1) / warmup) if warmup else base_lr
            for g in optimizer.param_groups:
                g["lr"] = lr
            x = augment(x.to(dist.device, non_blocking=True), aug_rng, ac)
            mask = batch_masks(len(x), grid, float(ac["mask_ratio"]), mask_rng, int(ac["min_block"])).to(dist.device)
            loss = train_step(ddp, teacher, optimizer, scaler, x, mask, params, float(tc["grad_clip"]), dtype)
            step_total += 1
            stats[0] += loss.double() * len(x)
            stats[1] += len(x)
            if dist.main and step % int(rc["log_every"]) == 0:
                _logger.info("epoch %d step %d/%d loss %.4f lr %.3g", epoch, step, steps, float(loss), lr)
            wait = time.perf_counter()
        c = stream.counts
        counts = torch.tensor([c.visits, c.decoded, c.left_out, c.failures], dtype=torch.float64, device=dist.device)
        if dist.active:
            torch.distributed.all_reduce(stats)
            torch.distributed.all_reduce(counts)
        frames_total += int(stats[1])
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch, "lr": base_lr, "loss": float(stats[0] / max(float(stats[1]), 1.0)),
                  "frames": int(stats[1]), "frames_total": frames_total, "steps": steps, "visits": int(counts[0]),
                  "frames_decoded": int(counts[1]), "left_out": int(counts[2]), "decode_failures": int(counts[3]),
                  "world_size": dist.world, "seconds": round(seconds, 2),
                  "frames_per_s": round(float(stats[1]) / seconds, 2),
                  "wait_for_frames_s": round(float(stats[2]) / dist.world, 2)}
        if dist.main:
            _write_bundle(run_dir, student.backbone, start, init_info, epoch, record, recordings)
            with open(run_dir / "history.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            save_last(run_dir, {"stage": "adapt", "student": student.state_dict(), "optimizer": optimizer.state_dict(),
                                "scaler": scaler.state_dict(), "epoch": epoch, "step": step_total,
                                "frames": frames_total, "teacher_sha256": teacher_digest, "recordings": rec_list,
                                "classes": classes})
            _logger.info("epoch %d: masked-patch loss %.4f over %d frames (%d visits, %d left out), %.1f frames/s, "
                         "%.1fs", epoch, record["loss"], record["frames"], record["visits"], record["left_out"],
                         record["frames_per_s"], seconds)
        if dist.active:
            torch.distributed.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)

    summary: dict[str, Any] = {}
    if dist.main:
        summary = {"run_dir": str(run_dir), "bundle": str(run_dir / BUNDLE_DIR), "objective": OBJECTIVE,
                   "init": init_info.get("init"), "recordings": len(recordings),
                   "recording_frames": sum(r.frames for r in recordings), "frames_trained": frames_total,
                   "epochs": [json.loads(x)["epoch"] for x in (run_dir / "history.jsonl").read_text().splitlines()
                              if x.strip()] if (run_dir / "history.jsonl").exists() else [],
                   "final_loss": record.get("loss")}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        _logger.info("done: bundle %s (%d frames trained)", summary["bundle"], frames_total)
    if dist.active:
        torch.distributed.barrier()
    return summary


def _write_bundle(run_dir: Path, backbone: Any, start: Start, init_info: dict[str, Any], epoch: int,
                  record: dict[str, Any], recordings: list[Recording]) -> None:
    """The adapted weights as a bundle that `finetune` takes as model.init. The head is the starting weights'
    (adapt does not train it) and calibrated thresholds are dropped: fine-tune before triage."""
    mc = start.cfg["model"]
    prov = {"training_stage": "adapt", "training_run": str(run_dir), "git_revision": git_revision(), "epoch": epoch,
            "objective": OBJECTIVE, "init": init_info.get("init"), "head": "the starting weights' (not trained)",
            "adapt_loss": record["loss"], "frames_trained": record["frames_total"],
            "recordings": len(recordings), "recording_frames": sum(r.frames for r in recordings)}
    save_bundle(run_dir / BUNDLE_DIR, backbone.state_dict(), arch=mc["arch"], class_names=start.classes,
                preprocess=start.preprocess, model_args=dict(mc.get("model_args") or {}), provenance=prov,
                overwrite=True, normal_class=start.normal_class)
