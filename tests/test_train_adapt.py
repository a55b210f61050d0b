"""`python -m train adapt` on CPU with a tiny EVA-02: block masks, the masked-patch loss, the frozen teacher,
resume, frames read from recordings through the sources across each whole recording, the uninformative-frame
filter, the CLI and its hand-off to `finetune`, and DDP under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from capsule_batch.model.bundle import ModelBundle, create_model, save_bundle
from capsule_batch.model.classes import CE24_CLASSES
from capsule_batch.model.preprocess import Preprocess
from capsule_batch.sources import open_source
from capsule_batch.sources.synthesize import read_stamp, synthesize
from train import adapt as A
from train.__main__ import main
from train.config import load_config
from train.mim import (
    batch_masks,
    block_mask,
    freeze_off_path,
    grid_size,
    make_student,
    make_teacher,
    mim_loss,
    teacher_targets,
    weights_digest,
)
from train.recordings import FrameFilter, FrameStream, Recording, find_recordings, plan_visits, rank_visits
from train.trainer import build_model

REPO = Path(__file__).resolve().parent.parent
ARCH = "eva02_tiny_patch14_224"
ARGS = {"depth": 2, "img_size": 64, "patch_size": 8}
PRE = Preprocess(input_size=64, resize=64)
#: a short run: 4 steps of 16 frames per epoch, visits of 8 frames
FAST = ["train.batch_size=16", "adapt.frames_per_epoch=64", "adapt.clip=8", "adapt.shuffle_frames=32",
        "adapt.warmup_steps=2", "train.optimizer=adamw", "train.lr=1.0e-3", "train.eps=1.0e-8", "run.log_every=1000",
        "run.workers=0"]


def _tiny_bundle(path: Path, seed: int, pre: Preprocess = PRE) -> Path:
    torch.manual_seed(seed)
    args = {**ARGS, "img_size": pre.input_size}
    model = create_model(ARCH, len(CE24_CLASSES), args)
    with torch.no_grad():  # spread the head's outputs so that frames get different probabilities
        model.head.weight.normal_(0.0, 0.3)
        model.head.bias.normal_(0.0, 0.5)
    save_bundle(path, model.state_dict(), arch=ARCH, class_names=list(CE24_CLASSES), preprocess=pre, model_args=args,
                normal_class="Normal")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapt")
    video = synthesize(root / "hospital_a.mp4", 240, size=128, seed=11, stamp=True).path
    folder = synthesize(root / "hospital_b", 160, size=128, seed=12, stamp=True, codec="jpg").path
    return {"root": root, "video": video, "folder": folder, "bundle": _tiny_bundle(root / "start", 0)}


def adapt_args(d: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    return [f"model.init={d['bundle']}", f"adapt.recordings=['{d['video']}', '{d['folder']}']", f"run.dir={run_dir}",
            *FAST, *extra]


def _stamp(pixels: torch.Tensor, pre: Preprocess = PRE) -> int:
    """The frame number stamped into a preprocessed frame."""
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    return read_stamp(((pixels.cpu() * std + mean) * 255).clamp(0, 255).numpy())


# ----------------------------------------------------------------------------------------------
# The objective


def test_block_masks_mask_the_requested_count_in_blocks() -> None:
    rng = np.random.default_rng(0)
    for grid, ratio in (((8, 8), 0.4), ((16, 16), 0.4), ((7, 9), 0.6), ((4, 4), 0.1)):
        target = round(ratio * grid[0] * grid[1])
        masks = [block_mask(grid, ratio, rng) for _ in range(50)]
        assert all(m.shape == grid and m.sum() == target for m in masks)
        if target >= 8:  # blocks, not scattered patches: most masked patches touch another masked patch
            touching = []
            for m in masks:
                p = np.pad(m, 1)
                nb = p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
                touching.append((m & nb).sum() / m.sum())
            assert np.mean(touching) > 0.9
    a, b = (batch_masks(4, (8, 8), 0.4, np.random.default_rng(s), 4) for s in (1, 1))
    assert a.dtype == torch.bool and a.shape == (4, 64) and torch.equal(a, b)
    assert not torch.equal(a, batch_masks(4, (8, 8), 0.4, np.random.default_rng(2), 4))


@pytest.fixture()
def models(data: dict[str, Path]) -> tuple[Any, Any]:
    model = ModelBundle.load(data["bundle"]).create_model()
    teacher = make_teacher(model)
    student = make_student(model)
    freeze_off_path(student, 64)
    return student, teacher


def _frames(data: dict[str, Path], n: int) -> torch.Tensor:
    with open_source(data["video"], PRE, batch_size=n, start=100) as src:
        return next(iter(src)).pixels


def test_loss_falls_on_a_fixed_batch(data: dict[str, Path], models: tuple[Any, Any]) -> None:
    student, teacher = models
    x = _frames(data, 8)
    mask = batch_masks(8, grid_size(student.backbone), 0.4, np.random.default_rng(0), 4)
    targets = teacher_targets(teacher, x)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(20):
        loss = mim_loss(student(x, mask), targets, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[0] > 0.05  # masking removed something to predict
    assert losses[-1] < 0.5 * losses[0], losses


def test_loss_covers_the_masked_patches_only(data: dict[str, Path], models: tuple[Any, Any]) -> None:
    student, teacher = models
    x = _frames(data, 4)
    mask = batch_masks(4, grid_size(student.backbone), 0.4, np.random.default_rng(3), 4)
    targets = teacher_targets(teacher, x).clone().requires_grad_(True)
    pred = student(x, mask)
    assert pred.shape == (int(mask.sum()), student.backbone.embed_dim)  # one prediction per masked patch
    loss = mim_loss(pred, targets, mask)
    # other targets on the unmasked patches: the same loss, bit for bit; on masked patches: another loss
    other = targets.detach().clone()
    other[~mask] = torch.randn_like(other[~mask]) * 10
    assert torch.equal(mim_loss(pred, other, mask), loss)
    other = targets.detach().clone()
    other[mask] = torch.randn_like(other[mask])
    assert not torch.allclose(mim_loss(pred, other, mask), loss)
    (grad,) = torch.autograd.grad(loss, targets)
    assert torch.all(grad[~mask] == 0) and torch.all(grad[mask].abs().sum(-1) > 0)
    # the student cannot see what it predicts: other pixels under the masked patches change nothing
    px = x.clone()
    cells = mask.reshape(4, 8, 8).repeat_interleave(8, 1).repeat_interleave(8, 2)
    px[cells[:, None].expand_as(px)] = 3.0
    assert torch.equal(student(px, mask), pred)
    px = x.clone()  # ... while other pixels around them (the context) change the predictions
    px[~cells[:, None].expand_as(px)] = 3.0
    assert not torch.allclose(student(px, mask), pred)


def test_teacher_stays_frozen_through_a_run(data: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[Any] = []

    def keep(backbone: Any) -> Any:
        made.append(make_teacher(backbone))
        return made[-1]

    monkeypatch.setattr(A, "make_teacher", keep)
    summary = A.run_adapt(load_config(None, adapt_args(data, tmp_path / "run", "train.epochs=1")))
    start = ModelBundle.load(data["bundle"]).create_model().state_dict()
    (teacher,) = made
    assert all(torch.equal(v, start[k]) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters())
    adapted = ModelBundle.load(summary["bundle"]).create_model().state_dict()
    changed = [k for k in start if not torch.equal(adapted[k], start[k])]
    assert "blocks.0.attn.qkv.weight" in changed and "patch_embed.proj.weight" in changed
    assert torch.equal(adapted["head.weight"], start["head.weight"])  # not on the features' path: untouched
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["teacher_sha256"] == weights_digest(teacher)


# ----------------------------------------------------------------------------------------------
# Frames from recordings


def test_frames_come_from_the_recordings_through_the_sources(data: dict[str, Path]) -> None:
    recs = find_recordings([str(data["video"]), str(data["root"] / "hospital_?")], PRE, "auto")
    assert [r.path for r in recs] == [data["video"], data["folder"]]  # a glob pattern names the folder
    assert [r.frames for r in recs] == [240, 160]
    stream = FrameStream(recs, PRE, source="auto", clip=8, visits=20, seed=0, epoch=0, buffer=64)
    seen: dict[int, list[int]] = {0: [], 1: []}
    for pixels, rec, frame in stream.batches(16, 10):
        assert pixels.shape == (16, 3, 64, 64) and pixels.dtype == torch.float32
        for p, r, f in zip(pixels, rec, frame, strict=True):
            assert _stamp(p) == f  # the pixels are that frame of that recording
            seen[int(r)].append(int(f))
    assert stream.counts.decoded == 8 * stream.counts.visits and stream.counts.left_out == 0
    assert sum(len(v) for v in seen.values()) == 160 == sum(stream.counts.per_recording.values())
    for r, rec in enumerate(recs):  # frames from every fifth of each recording, not only its start
        fifths = {f * 5 // rec.frames for f in seen[r]}
        assert fifths == {0, 1, 2, 3, 4}, (rec.path, sorted(seen[r]))


def test_visits_are_spread_over_each_whole_recording_and_split_across_ranks() -> None:
    recs = [Recording(Path("a"), 60_000), Recording(Path("b"), 20_000), Recording(Path("c"), 500)]
    plan = plan_visits(recs, 400, 16, np.random.default_rng(5))
    per = [sorted(v.start for v in plan if v.recording == r) for r in range(3)]
    quota = [400 * r.frames / 80_500 for r in recs]
    assert len(plan) == 400 and all(len(p) in (int(q), int(q) + 1) for p, q in zip(per, quota, strict=True))
    for p, rec in zip(per, recs, strict=True):  # one visit in each of len(p) equal strata of the recording
        edges = np.linspace(0, rec.frames, len(p) + 1)
        assert all(np.floor(lo) <= s < hi for s, lo, hi in zip(p, edges[:-1], edges[1:], strict=True))
        assert all(0 <= s <= rec.frames - 16 for s in p)
    assert plan_visits(recs, 400, 16, np.random.default_rng(5)) == plan
    assert [v.recording for v in plan] != sorted(v.recording for v in plan)  # shuffled
    # under DDP each rank takes its own stride of the same plan
    whole = list(islice(rank_visits(recs, 100, 16, 0, 3, 0, 1), 100))
    for r in (0, 1):
        assert list(islice(rank_visits(recs, 100, 16, 0, 3, r, 2), 50)) == whole[r::2]


def test_filter_leaves_out_frames_the_bundle_calls_uninformative(data: dict[str, Path], tmp_path: Path) -> None:
    recs = find_recordings([str(data["video"])], PRE, "decord")
    for pre in (PRE, Preprocess(input_size=56, resize=56)):  # the training frames' preprocessing, and another
        fb = _tiny_bundle(tmp_path / f"filter{pre.input_size}", 7, pre)
        model = ModelBundle.load(fb).create_model()
        with open_source(data["video"], pre, batch_size=240) as src, torch.no_grad():
            p = torch.softmax(model(next(iter(src)).pixels), 1)[:, [0, 4]].sum(1).numpy()  # Angioectasia + FB
        # a threshold in the widest gap between the middle values: batch-size rounding cannot move a frame across
        mid = np.sort(p)[len(p) // 4 : 3 * len(p) // 4]
        k = int(np.argmax(np.diff(mid)))
        threshold = float(mid[k] + mid[k + 1]) / 2
        flt = FrameFilter(fb, ["Angioectasia", "Foreign Body"], threshold, "cpu")
        stream = FrameStream(recs, PRE, source="decord", clip=8, visits=20, seed=1, epoch=0, buffer=16,
                             frame_filter=flt)
        frames = [int(f) for _, _, fr in stream.batches(8, 12) for f in fr]
        assert len(frames) == 96
        assert all(p[f] < threshold for f in frames)  # every frame used is one the bundle calls informative
        c = stream.counts
        assert c.left_out > 0 and c.decoded == 8 * c.visits
        assert c.decoded - c.left_out >= 96
    with pytest.raises(Exception, match=r"adapt.filter.classes: \['Bubbles'\] are not classes of"):
        FrameFilter(fb, ["Bubbles"], 0.5, "cpu")


# ----------------------------------------------------------------------------------------------
# The stage


def test_resumed_run_equals_uninterrupted_run(data: dict[str, Path], tmp_path: Path) -> None:
    whole = A.run_adapt(load_config(None, adapt_args(data, tmp_path / "whole", "train.epochs=2")))

    def stop(epoch: int, record: dict[str, Any]) -> None:
        if epoch == 0:
            raise KeyboardInterrupt

    args = adapt_args(data, tmp_path / "cut", "train.epochs=2")
    with pytest.raises(KeyboardInterrupt):
        A.run_adapt(load_config(None, args), on_epoch_end=stop)
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["epoch"] == 0
    with pytest.raises(Exception, match="holds a run already"):
        A.run_adapt(load_config(None, args))
    resumed = A.run_adapt(load_config(None, [*args, "run.resume=true"]))
    assert resumed["epochs"] == whole["epochs"] == [0, 1] and resumed["frames_trained"] == 128
    a = ModelBundle.load(whole["bundle"]).create_model().state_dict()
    b = ModelBundle.load(resumed["bundle"]).create_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("whole", "cut"))
    assert all(torch.equal(sa["student"][k], sb["student"][k]) for k in sa["student"])  # mask token, predictor too
    ha, hb = ((tmp_path / d / "history.jsonl").read_text().splitlines() for d in ("whole", "cut"))
    assert [json.loads(h)["loss"] for h in ha] == [json.loads(h)["loss"] for h in hb]
    # resuming with other starting weights or other recordings is refused
    other = _tiny_bundle(tmp_path / "other", 5)
    with pytest.raises(Exception, match="started from other weights"):
        A.run_adapt(load_config(None, [*args, "run.resume=true", f"model.init={other}"]))
    with pytest.raises(Exception, match="saved for other recordings"):
        A.run_adapt(load_config(None, [*args, "run.resume=true", f"adapt.recordings=['{data['video']}']"]))


def test_cli_adapt_then_finetune_from_its_run(data: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "adapted"
    rc = main(["adapt", "--config", str(REPO / "train/configs/adapt.yaml"), *adapt_args(data, run, "train.epochs=1")])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["objective"] == "mim-frozen-teacher" and summary["frames_trained"] == 64
    for name in ("config.yaml", "history.jsonl", "last.pt", "summary.json", "train.log", "bundle/model.json"):
        assert (run / name).is_file(), name
    cfg_text = (run / "config.yaml").read_text()
    assert "stage: adapt" in cfg_text and "mask_ratio: 0.4" in cfg_text and "arch: eva02_tiny_patch14_224" in cfg_text
    history = json.loads((run / "history.jsonl").read_text())
    assert history["frames"] == 64 and history["steps"] == 4 and history["world_size"] == 1
    bundle = ModelBundle.load(run / "bundle")
    assert bundle.provenance["training_stage"] == "adapt" and bundle.preprocess == PRE and not bundle.thresholds

    # finetune takes the adapt run as model.init: every adapted tensor, head included
    labels = data["folder"].with_name("hospital_b.labels.csv")
    spec = f"{{kind: recording, frames: '{data['folder']}', frame_pattern: 'frame_{{frame}}.jpg', labels: '{labels}'}}"
    ft_args = [f"model.arch={ARCH}", "model.model_args={depth: 2, img_size: 64, patch_size: 8}", "data.input_size=64",
               "data.resize=64", f"model.init={run}", f"data.train=[{spec}]", f"data.val=[{spec}]",
               "data.leakage_check=false", "train.epochs=1", "train.samples_per_epoch=16", "train.batch_size=16",
               "run.workers=0", f"run.dir={tmp_path / 'ft'}"]
    model, info = build_model(load_config(None, ft_args), list(CE24_CLASSES))
    assert info["init"] == str(run / "bundle") and info["head_reused"]
    adapted = bundle.create_model().state_dict()
    assert all(torch.equal(v, adapted[k]) for k, v in model.state_dict().items())
    assert main(["finetune", *ft_args]) == 0
    assert ModelBundle.load(tmp_path / "ft" / "bundle").provenance["init"] == str(run / "bundle")


@pytest.mark.parametrize("extra, message", [
    (["adapt.recordings=[]"], "adapt.recordings: give the unlabelled recordings"),
    (["adapt.recordings=[/no/such/recording.mp4]"], "/no/such/recording.mp4: no such file or folder"),
    (["adapt.recordings=['/no/such/*.mp4']"], "matches no file or folder"),
    (["model.init=null"], "adapt: give the starting weights"),
    (["adapt.mask_ratio=1.5"], "adapt.mask_ratio: must be in (0, 1)"),
    (["adapt.crop_scale=half"], "adapt.crop_scale: must be [min, max] area fractions"),
    (["adapt.frames_per_epoch=8"], "adapt.frames_per_epoch: must be an integer >= train.batch_size"),
    (["adapt.filter.bundle=START", "adapt.filter.classes=[]"], "adapt.filter.classes: name the classes"),
    (["adapt.maskratio=0.5"], "unknown config key 'adapt.maskratio'"),
])
def test_cli_bad_input_is_one_line(data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                   extra: list[str], message: str) -> None:
    extra = [e.replace("START", str(data["bundle"])) for e in extra]
    rc = main(["adapt", *adapt_args(data, tmp_path / "run", "train.epochs=1"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("error: ") and message in err[-1], err[-3:]


def test_torchrun_two_processes_on_cpu(data: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train", "adapt",
           *adapt_args(data, run, "train.epochs=2", "train.batch_size=8", "run.device=cpu")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]
    for h in history:  # 4 steps of 8 frames on each of 2 ranks: the epoch's 64 frames
        assert h["world_size"] == 2 and h["steps"] == 4 and h["frames"] == 64
    ModelBundle.load(run / "bundle").create_model()
