"""The training loop: the seed recipe, single process or DDP under torchrun, resumable, ending in a bundle.

Recipe (docs/training.md): cross-entropy, class-balanced sampling with replacement, the seed's augmentations,
AdaBelief from timm's optimizer factory, lr x decay^(epoch/2), mixed precision, gradient clipping. The
best epoch is chosen by a metric over the whole validation set (every sample scored once, across ranks);
its weights are written as a ModelBundle whose preprocessing is the validation transform.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from capsule_batch.errors import CapsuleError
from capsule_batch.exits import exit_now
from capsule_batch.model.bundle import (
    META_FILE,
    ModelBundle,
    create_model,
    fit_state_dict,
    read_checkpoint,
    save_bundle,
)
from capsule_batch.model.preprocess import Preprocess
from train import data as D
from train.config import git_revision, save_resolved
from train.metrics import compute_metrics, save_plots
from train.transforms import TrainTransform, ValTransform, make_preprocess, seed_worker

_logger = logging.getLogger(__name__)

LAST = "last.pt"
BUNDLE_DIR = "bundle"
VAL_PREDICTIONS = "val_predictions.npz"


class TrainError(CapsuleError):
    """A training run that cannot start or continue."""


# ----------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


_joined_process_group = False


def exit_process(code: int) -> None:
    """End the process with `code`; after this process joined a process group, without interpreter finalization.

    Why: gloo's worker threads (torch 2.14) drop the work of the last collective a moment after the caller saw it
    complete. When that moment falls into Python's finalization, the thread cannot take the GIL to free the work's
    tensors and the process aborts (SIGABRT, "terminate called without an active exception") after a run that
    succeeded: 2 of 80 two-rank CPU runs here, seen under gdb in ProcessGroupGloo::runLoop. Everything a run keeps
    is written and closed before this point, so ending without finalization loses nothing.
    """
    if not _joined_process_group:
        sys.exit(code)
    exit_now(code)


def setup_dist(device_spec: str) -> Dist:
    """Under torchrun (WORLD_SIZE > 1) join the process group: nccl on GPUs, gloo on CPU."""
    global _joined_process_group
    import torch

    from capsule_batch.devices import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _joined_process_group = True
    return Dist(rank, world, local, device)


def _broadcast(dist: Dist, obj: Any) -> Any:
    if not dist.active:
        return obj
    import torch

    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class Prepared:
    classes: list[str]
    train: list[D.Sample]
    val: list[D.Sample]
    #: train/val overlap found by the leakage check (None: none found, or the check is off)
    overlap: D.Overlap | None = None
    #: the overlap of the sets as read, before the policy changed them (what overlap.json/csv describe)
    overlap_sets: tuple[list[D.Sample], list[D.Sample]] | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def prepare_data(cfg: dict[str, Any]) -> Prepared:
    """Read, map, check and split the configured datasets; every problem is a DataError naming its source.

    `data.duplicates` handles images stored under several class folders within a split; `data.overlap` what
    happens when validation shares images or patients/recordings with training: `refuse` (the default), `keep`
    (train on the split as given, e.g. CE24's official one, with the overlap reported), `drop_from_val` (the
    shared images leave validation) or `resplit` (train + val pooled, copies merged, re-split by
    `data.val_fraction` keeping every group and every identical image on one side)."""
    dc = cfg["data"]
    classes = D.class_list(dc["classes"])
    policy = dc.get("overlap") or "refuse"
    if policy not in D.OVERLAP_POLICIES:
        raise D.DataError(f"data.overlap is one of {', '.join(D.OVERLAP_POLICIES)}, not {policy!r}")
    rule = dc.get("duplicates") or "keep"
    train = D.build_samples(dc.get("train") or [], classes, "data.train")
    val = D.build_samples(dc.get("val") or [], classes, "data.val")
    if not train:
        raise D.DataError("the training set is empty: data.train lists no images")
    workers = max(1, int(cfg["run"]["workers"]))
    train_hash = val_hash = None
    if dc.get("check_images", True):
        train, train_hash = D.check_images(train, workers)
        if val:
            val, val_hash = D.check_images(val, workers)
    notes: dict[str, Any] = {}
    train, train_hash, notes["train_duplicates"] = D.within_split_duplicates(train, train_hash, rule, classes,
                                                                             "data.train")
    if val:
        val, val_hash, notes["val_duplicates"] = D.within_split_duplicates(val, val_hash, rule, classes, "data.val")
    if not val:
        if dc.get("val") or not dc.get("val_fraction"):
            raise D.DataError("the validation set is empty: give data.val datasets or data.val_fraction")
        train, train_hash, val, val_hash = _split(train, train_hash, float(dc["val_fraction"]), cfg)
    if not train:
        raise D.DataError("the training set is empty after checking images")
    if not val:
        raise D.DataError("the validation set is empty after checking images")
    overlap, overlap_sets = None, None
    if dc.get("leakage_check", True):
        found = D.find_overlap(train, val, train_hash, val_hash)
        if found.images or found.groups:
            overlap, overlap_sets = found, (train, val)
            if policy == "refuse":
                problems = D.check_leakage(train, val, train_hash, val_hash) + D.check_groups(train, val)
                raise D.DataError("train/val leakage: " + "; ".join(problems) + " (data.overlap=keep trains on the "
                                  "split as given and reports the overlap, drop_from_val or resplit remove it; "
                                  "data.leakage_check=false skips every check)")
            D.log_overlap(found, train, val, policy)
            if policy == "drop_from_val":
                gone = set(found.val_index)
                val = [s for i, s in enumerate(val) if i not in gone]
                notes["dropped_from_val"] = len(gone)
                _logger.warning("data.overlap=drop_from_val: %d validation images left out, %d remain", len(gone),
                                len(val))
                if not val:
                    raise D.DataError("the validation set is empty after dropping the images training also has")
            elif policy == "resplit":
                if not dc.get("val_fraction"):
                    raise D.DataError("data.overlap=resplit needs data.val_fraction (e.g. 0.2, the seed's 80/20)")
                pool, pool_hash = train + val, (train_hash + val_hash) if train_hash and val_hash else None
                pool, pool_hash = _unique(pool, pool_hash)
                train, train_hash, val, val_hash = _split(pool, pool_hash, float(dc["val_fraction"]), cfg)
                notes["resplit"] = {"pooled_unique": len(pool), "train": len(train), "val": len(val)}
                _logger.warning("data.overlap=resplit: %d unique images re-split into %d train / %d val, groups kept "
                                "apart", len(pool), len(train), len(val))
    _logger.info("classes: %s", ", ".join(classes))
    _logger.info("train %d images %s", len(train), D.class_counts(train, classes))
    _logger.info("val %d images %s", len(val), D.class_counts(val, classes))
    return Prepared(classes, train, val, overlap, overlap_sets, notes)


def _unique(samples: list[D.Sample], hashes: list[str] | None) -> tuple[list[D.Sample], list[str] | None]:
    """One sample per (image, label): the same file listed in both splits counts once."""
    seen: set[tuple[str, str]] = set()
    keep = []
    for i, s in enumerate(samples):
        key = (hashes[i] if hashes else f"{s.source}/{s.name}", s.label)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return [samples[i] for i in keep], None if hashes is None else [hashes[i] for i in keep]


def _split(samples: list[D.Sample], hashes: list[str] | None, fraction: float,
           cfg: dict[str, Any]) -> tuple[list[D.Sample], list[str] | None, list[D.Sample], list[str] | None]:
    """A grouped stratified split; identical images share a group first, so they land on one side."""
    merged = D.merge_pixel_groups(samples, hashes)
    train_i, val_i = D.grouped_split_indices(merged, fraction, int(cfg["run"]["seed"]))
    hashed = hashes is not None
    return ([merged[i] for i in train_i], [hashes[i] for i in train_i] if hashed else None,
            [merged[i] for i in val_i], [hashes[i] for i in val_i] if hashed else None)


def describe_data(p: Prepared) -> dict[str, Any]:
    """Counts of a prepared train/val split: images, groups (patients/recordings) and images per class and
    per source, the classes without a training or validation image, duplicates within a split and the train/val
    overlap (with the policy that handled it)."""

    def split(samples: list[D.Sample]) -> dict[str, Any]:
        return {"images": len(samples), "groups": len({s.group for s in samples}),
                "per_class": D.class_counts(samples, p.classes),
                "per_source": dict(sorted(collections.Counter(s.source for s in samples).items()))}

    splits = {"train": split(p.train), "val": split(p.val)}
    empty = {k: [c for c, n in v["per_class"].items() if n == 0] for k, v in splits.items()}
    out = {"classes": p.classes, **splits, "classes_without_images": empty, **p.notes}
    if p.overlap is not None and p.overlap_sets is not None:
        out["overlap"] = p.overlap.summary(*p.overlap_sets)
    return out


class BalancedSampler:
    """Class-balanced sampling with replacement (weight 1/class count) that also works under DDP: every
    rank draws the same global sequence from (seed, epoch) and takes its own stride of it."""

    def __init__(self, labels: np.ndarray, num_samples: int, dist: Dist, seed: int, balanced: bool):
        counts = np.bincount(labels)
        self.weights = (1.0 / counts[labels]) if balanced else np.ones(len(labels))
        self.per_rank = math.ceil(num_samples / dist.world)
        self.dist, self.seed, self.balanced, self.epoch = dist, seed, balanced, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Any:
        import torch

        g = torch.Generator().manual_seed(self.seed + self.epoch)
        total = self.per_rank * self.dist.world
        w = torch.as_tensor(self.weights, dtype=torch.float64)
        if self.balanced:
            idx = torch.multinomial(w, total, replacement=True, generator=g)
        else:
            idx = torch.cat([torch.randperm(len(w), generator=g) for _ in range(math.ceil(total / len(w)))])[:total]
        return iter(idx[self.dist.rank :: self.dist.world].tolist())


# ----------------------------------------------------------------------------------------------
# Model


RANDOM_INIT = "random"
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def check_init(mc: dict[str, Any]) -> None:
    """Refuse a run whose initial weights are not said: random weights only when asked for (`model.init: random`)."""
    init = mc.get("init")
    if mc.get("pretrained"):
        if init:
            raise TrainError("model.pretrained=true and model.init both give initial weights: keep one")
        return
    if not init:
        raise TrainError(
            "model.init is not set: give the initial weights (a Hugging Face snapshot folder of "
            f"timm/{mc['arch']}.mim_in22k or another timm checkpoint, a stage-1 run or bundle folder, a .ckpt/.pt/"
            ".safetensors file), or model.init=random to start from random weights")
    if init != RANDOM_INIT and not Path(str(init)).exists():
        raise TrainError(f"model.init: {init}: no such file or folder")


def _is_hub_snapshot(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file() and any((p / w).is_file() for w in HUB_WEIGHTS)


def _hub_state_dict(p: Path, arch: str) -> dict[str, Any]:
    """A Hugging Face hub snapshot of timm weights: `config.json` + `model.safetensors` (or `pytorch_model.bin`)."""
    try:
        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainError(f"{p / 'config.json'}: not valid JSON ({e})") from None
    their = config.get("architecture") if isinstance(config, dict) else None
    if their and their != arch:
        raise TrainError(f"{p}: holds weights for {their}, but model.arch is {arch}")
    weights = next(p / w for w in HUB_WEIGHTS if (p / w).is_file())
    return read_checkpoint(weights).state_dict


def _timm_filter(model: Any, sd: dict[str, Any]) -> dict[str, Any]:
    """What timm applies to its own pretrained files before loading them: the model module's checkpoint filter
    (`timm.models.eva.checkpoint_filter_fn` for EVA-02: MIM-only keys dropped, `norm` -> `fc_norm`, patch and
    position embeddings resampled to the model's size), then the classifier dropped where its shape differs."""
    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is not None:
        sd = fn(sd, model)
    own = model.state_dict()
    head = [k for k in own if k.startswith("head.")]
    if any(k in sd and tuple(sd[k].shape) != tuple(own[k].shape) for k in head):
        sd = {k: v for k, v in sd.items() if k not in head}
    return sd


def _resolve_init(path: str, model: Any, arch: str) -> tuple[dict[str, Any], str, list[str] | None]:
    """Weights from a bundle folder, a run folder (its bundle), a hub snapshot folder or a checkpoint file, in
    timm key names (timm's checkpoint filter applied to timm-format weights)."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir() and not (p / META_FILE).is_file() and (p / BUNDLE_DIR / META_FILE).is_file():
        p = p / BUNDLE_DIR
    if _is_hub_snapshot(p) and not (p / META_FILE).is_file():
        return _timm_filter(model, _hub_state_dict(p, arch)), str(p), None
    if p.is_dir():
        bundle = ModelBundle.load(p)
        bundle.verify_weights()
        return load_file(str(bundle.weights_path)), str(p), bundle.class_names
    ckpt = read_checkpoint(p)
    sd = ckpt.state_dict if ckpt.format == "lightning-seed" else _timm_filter(model, ckpt.state_dict)
    return sd, str(p), None


def build_model(cfg: dict[str, Any], classes: list[str]) -> tuple[Any, dict[str, Any]]:
    """A timm model with the configured initial weights, loaded strictly; the head is reused only where its shape
    matches, else it starts as the seed's does (a default `nn.Linear`)."""
    import torch

    mc = cfg["model"]
    check_init(mc)
    arch, margs = mc["arch"], dict(mc.get("model_args") or {})
    info: dict[str, Any] = {"init": None}
    if mc.get("pretrained"):
        import timm

        model = timm.create_model(arch, pretrained=True, num_classes=len(classes), **margs)
        info["init"] = f"timm:{arch}"
        return model, info
    model = create_model(arch, len(classes), margs)
    head = model.get_classifier()
    if mc["init"] == RANDOM_INIT:
        _logger.warning("model.init=random: training starts from random weights (not the %s.mim_in22k weights the "
                        "recipe starts from)", arch)
        if isinstance(head, torch.nn.Linear):
            head.reset_parameters()
        return model, {"init": RANDOM_INIT}
    sd, where, init_classes = _resolve_init(str(mc["init"]), model, arch)
    own = model.state_dict()
    head_keys = {k for k in own if k.startswith("head.")}
    fits = all(k in sd and tuple(sd[k].shape) == tuple(own[k].shape) for k in head_keys)
    reuse = bool(mc.get("reuse_head", True)) and fits
    if init_classes is not None and reuse and init_classes != classes:
        _logger.warning("%s: reusing a head trained for classes %s as %s", where, init_classes, classes)
    if not reuse and isinstance(head, torch.nn.Linear):
        head.reset_parameters()  # the seed's head: a separate nn.Linear with torch's default initialisation
        own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")} | {k: sd[k] if reuse else own[k] for k in head_keys}
    fit_state_dict(model, sd, where, arch)
    _logger.info("initial weights from %s (head %s)", where, "reused" if reuse else "newly initialised")
    return model, {"init": where, "head_reused": reuse}


# ----------------------------------------------------------------------------------------------
# Loops


def _precision(spec: str, device: Any) -> Any:

    if spec == "auto":
        spec = "fp16" if device.type == "cuda" else "fp32"
    from capsule_batch.devices import torch_dtype

    return torch_dtype(spec)


def _autocast(device: Any, dtype: Any) -> Any:
    import torch

    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def predict_probs(model: Any, samples: list[D.Sample], classes: list[str], pre: Preprocess, *, batch_size: int,
                  device: Any, dtype: Any, workers: int = 0, dist: Dist | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities for every sample, computed with the bundle's preprocessing, in sample order.

    Under DDP each rank scores a strided share and rank 0 gathers them: the whole set, each sample once.
    """
    import torch

    dist = dist or Dist()
    ds = D.ImageDataset(samples, classes, ValTransform(pre))
    share = list(range(dist.rank, len(ds), dist.world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, share), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=D.collate, drop_last=False)
    model.eval()
    idx_out, prob_out = [], []
    with torch.no_grad():
        for x, _, idx, skipped in loader:
            if skipped:
                raise TrainError(f"{skipped} images could not be read while scoring; check them (data.check_images)")
            with _autocast(device, dtype):
                logits = model(x.to(device, non_blocking=True))
            prob_out.append(torch.softmax(logits.float(), 1).cpu().numpy())
            idx_out.append(idx.numpy().astype(np.int64))
    idx = np.concatenate(idx_out) if idx_out else np.zeros(0, np.int64)
    probs = np.concatenate(prob_out) if prob_out else np.zeros((0, len(classes)), np.float32)
    if dist.active:
        gathered: list[Any] = [None] * dist.world
        torch.distributed.all_gather_object(gathered, (idx, probs))
        idx = np.concatenate([g[0] for g in gathered])
        probs = np.concatenate([g[1] for g in gathered])
    order = np.argsort(idx)
    idx, probs = idx[order], probs[order]
    if not np.array_equal(idx, np.arange(len(samples))):
        raise TrainError(f"scored {len(idx)} of {len(samples)} samples (or some twice): refusing partial metrics")
    return probs, ds.labels()


def epoch_sums(dist: Dist, n: int) -> Any:
    """`n` running sums for an epoch, on the rank's device: NCCL (the process group of GPU runs) reduces CUDA tensors
    only, and adding a step's loss to a sum on the device does not make the host wait for the GPU every step."""
    import torch

    return torch.zeros(n, dtype=torch.float64, device=dist.device)


def _any_rank(dist: Dist, flag: bool) -> bool:
    if not dist.active:
        return flag
    import torch

    t = torch.tensor([int(flag)], device=dist.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _history(run_dir: Path) -> list[dict[str, Any]]:
    p = run_dir / "history.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def run_training(cfg: dict[str, Any], stage: str,
                 on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train, validate every epoch, keep the best bundle; returns the run summary (also summary.json)."""
    with run_folder(cfg, stage) as (dist, run_dir):
        return _train(cfg, stage, dist, run_dir, on_epoch_end)


@contextmanager
def run_folder(cfg: dict[str, Any], stage: str) -> Iterator[tuple[Dist, Path]]:
    """A stage's process group and run folder (the same on every rank): a folder that holds a run is refused
    unless resuming; rank 0 writes config.yaml and train.log; the process group is left at the end."""
    import torch

    rc = cfg["run"]
    check_init(cfg["model"])  # before anything is written: a run without its initial weights is refused
    dist = setup_dist(rc["device"])
    if not dist.main:
        logging.getLogger().setLevel(logging.WARNING)
    run_dir = Path(rc["dir"] or f"runs/{stage}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    run_dir = Path(_broadcast(dist, str(run_dir)))
    if dist.main:
        if (run_dir / LAST).exists() and not rc["resume"]:
            raise TrainError(f"{run_dir}: holds a run already (run.resume=true to continue it, or another run.dir)")
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir, stage)
    log_handler = _add_file_log(run_dir) if dist.main else None
    try:
        yield dist, run_dir
    finally:
        if log_handler is not None:
            logging.getLogger().removeHandler(log_handler)
            log_handler.close()
        if dist.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def epoch_lr(tc: dict[str, Any], epoch: int) -> float:
    """The recipe's learning rate for an epoch: train.lr x train.lr_decay^(epoch/2)."""
    return float(tc["lr"]) * float(tc["lr_decay"]) ** (epoch / 2)


def save_last(run_dir: Path, state: dict[str, Any]) -> None:
    """Write the resume state `last.pt` atomically (a crash mid-write keeps the previous one)."""
    import torch

    torch.save(state, run_dir / (LAST + ".tmp"))
    os.replace(run_dir / (LAST + ".tmp"), run_dir / LAST)


def _train(cfg: dict[str, Any], stage: str, dist: Dist, run_dir: Path,
           on_epoch_end: Callable[[int, dict[str, Any]], None] | None) -> dict[str, Any]:
    import torch
    from timm.optim import create_optimizer_v2

    rc, tc = cfg["run"], cfg["train"]
    torch.manual_seed(int(rc["seed"]) + dist.rank)
    np.random.seed(int(rc["seed"]) + dist.rank)
    random.seed(int(rc["seed"]) + dist.rank)  # augmentations in the main process (run.workers=0)

    prepared = _broadcast(dist, prepare_data(cfg) if dist.main else None)
    if dist.main and prepared.overlap is not None and prepared.overlap_sets is not None:
        D.write_overlap(prepared.overlap, *prepared.overlap_sets, run_dir)
    classes = prepared.classes
    mc = cfg["model"]
    pre = make_preprocess(cfg["data"], mc["arch"], dict(mc.get("model_args") or {}))
    model, init_info = build_model(cfg, classes)
    model.to(dist.device)
    dtype = _precision(rc["precision"], dist.device)
    betas = tuple(tc["betas"])
    opt_kwargs = {"eps": float(tc["eps"]), "betas": betas} if tc["optimizer"] in ("adabelief", "radabelief") else {}
    optimizer = create_optimizer_v2(model, opt=tc["optimizer"], lr=float(tc["lr"]),
                                    weight_decay=float(tc["weight_decay"]),
                                    filter_bias_and_bn=bool(tc["filter_bias_and_bn"]), **opt_kwargs)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=dtype == torch.float16)

    start_epoch, best, best_epoch = 0, -math.inf, -1
    if rc["resume"] and (run_dir / LAST).exists():
        state = torch.load(run_dir / LAST, map_location="cpu", weights_only=True)
        if state["classes"] != classes:
            raise TrainError(f"{run_dir / LAST}: saved for classes {state['classes']}, the data now have {classes}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best, best_epoch = int(state["epoch"]) + 1, float(state["best"]), int(state["best_epoch"])
        _logger.info("resuming %s after epoch %d (best %.4f at epoch %d)", run_dir, start_epoch - 1, best, best_epoch)

    ddp_model = model
    if dist.active:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)

    train_ds = D.ImageDataset(prepared.train, classes, TrainTransform(pre, cfg["augment"]))
    sampler = BalancedSampler(train_ds.labels(), int(tc["samples_per_epoch"] or len(train_ds)), dist,
                              int(rc["seed"]), bool(tc["balanced_sampling"]))
    workers = int(rc["workers"])
    loader = torch.utils.data.DataLoader(train_ds, batch_size=int(tc["batch_size"]), sampler=sampler,
                                         num_workers=workers, collate_fn=D.collate, worker_init_fn=seed_worker,
                                         pin_memory=dist.device.type == "cuda", drop_last=False)
    loss_fn = torch.nn.CrossEntropyLoss()
    epochs = int(tc["epochs"])
    if start_epoch >= epochs:
        _logger.info("%s: all %d epochs are done already", run_dir, epochs)
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        lr = epoch_lr(tc, epoch)
        for g in optimizer.param_groups:
            g["lr"] = lr
        sampler.set_epoch(epoch)
        ddp_model.train()
        stats = epoch_sums(dist, 3)  # loss sum, samples, skipped
        for step, (x, y, _, skipped) in enumerate(loader):
            stats[2] += skipped
            if _any_rank(dist, x is None):  # a wholly unreadable batch: every rank skips the step together
                continue
            x, y = x.to(dist.device, non_blocking=True), y.to(dist.device, non_blocking=True)
            with _autocast(dist.device, dtype):
                loss = loss_fn(ddp_model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(tc["grad_clip"]))
            scaler.step(optimizer)
            scaler.update()
            stats[0] += loss.detach().double() * len(y)
            stats[1] += len(y)
            if dist.main and step % int(rc["log_every"]) == 0:
                _logger.info("epoch %d step %d/%d loss %.4f", epoch, step, len(loader), float(loss.detach()))
        if dist.active:
            torch.distributed.all_reduce(stats)
        probs, labels = predict_probs(model, prepared.val, classes, pre, batch_size=int(tc["eval_batch_size"]),
                                      device=dist.device, dtype=dtype, workers=workers, dist=dist)
        record: dict[str, Any] = {"epoch": epoch, "lr": lr, "train_loss": float(stats[0] / max(stats[1], 1)),
                                  "train_samples": int(stats[1]), "train_skipped": int(stats[2]),
                                  "world_size": dist.world}
        if dist.main:
            m = compute_metrics(labels, probs, classes)
            record.update({k: m[k] for k in ("count", "balanced_accuracy", "mean_auc", "f1", "mAP", "recall")})
            record["val_count"] = record.pop("count")
            score = m[tc["best_metric"]]
            score = -math.inf if score is None else float(score)
            if score > best:
                best, best_epoch = score, epoch
                _write_best(run_dir, model, cfg, classes, pre, stage, init_info, epoch, m, probs, labels,
                            prepared.val)
            record["seconds"] = round(time.perf_counter() - t0, 2)
            record["best_epoch"] = best_epoch
            with open(run_dir / "history.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            save_last(run_dir, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "scaler": scaler.state_dict(), "epoch": epoch, "best": best, "best_epoch": best_epoch,
                                "classes": classes})
            _logger.info("epoch %d: loss %.4f val %s %.4f (%d images), best %.4f at epoch %d, %.1fs", epoch,
                         record["train_loss"], tc["best_metric"], score, record["val_count"], best, best_epoch,
                         record["seconds"])
        if dist.active:
            torch.distributed.barrier()
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)

    summary: dict[str, Any] = {}
    if dist.main:
        summary = _finish(run_dir, classes, prepared, best, best_epoch, tc["best_metric"])
    if dist.active:
        torch.distributed.barrier()
    return summary


def _write_best(run_dir: Path, model: Any, cfg: dict[str, Any], classes: list[str], pre: Preprocess, stage: str,
                init_info: dict[str, Any], epoch: int, m: dict[str, Any], probs: np.ndarray, labels: np.ndarray,
                val: list[D.Sample]) -> None:
    mc = cfg["model"]
    prov = {"training_stage": stage, "training_run": str(run_dir), "git_revision": git_revision(), "epoch": epoch,
            "val_balanced_accuracy": m["balanced_accuracy"], "val_mean_auc": m["mean_auc"], "val_count": m["count"],
            "init": init_info.get("init")}
    save_bundle(run_dir / BUNDLE_DIR, model.state_dict(), arch=mc["arch"], class_names=classes, preprocess=pre,
                model_args=dict(mc.get("model_args") or {}), provenance=prov, overwrite=True,
                normal_class="Normal" if "Normal" in classes else None)
    np.savez(run_dir / VAL_PREDICTIONS, probs=probs, labels=labels, refs=np.asarray([s.ref for s in val]),
             frames=np.asarray([-1 if s.frame is None else s.frame for s in val]), epoch=epoch)


def _finish(run_dir: Path, classes: list[str], prepared: Prepared, best: float, best_epoch: int,
            metric: str) -> dict[str, Any]:
    summary: dict[str, Any] = {"run_dir": str(run_dir), "bundle": str(run_dir / BUNDLE_DIR), "best_metric": metric,
                               "best": best, "best_epoch": best_epoch, "train_count": len(prepared.train),
                               "val_count": len(prepared.val), "classes": classes,
                               "epochs": [r["epoch"] for r in _history(run_dir)]}
    if (run_dir / VAL_PREDICTIONS).exists():
        z = np.load(run_dir / VAL_PREDICTIONS)
        m = compute_metrics(z["labels"], z["probs"], classes)
        (run_dir / "metrics.json").write_text(json.dumps(m, indent=2), encoding="utf-8")
        save_plots(z["labels"], z["probs"], classes, run_dir)
        summary["val_metrics"] = {k: m[k] for k in ("balanced_accuracy", "mean_auc", "f1", "mAP", "count")}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    _logger.info("done: bundle %s (best %s %.4f at epoch %d)", summary["bundle"], metric, best, best_epoch)
    return summary


def _add_file_log(run_dir: Path) -> logging.Handler:
    h = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(h)
    return h
