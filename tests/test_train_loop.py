"""Training runs on CPU with a tiny EVA-02 and synthetic CE24-layout data: learning, the bundle, evaluate,
calibrate, predict, stage chaining with a class mapping, resume, and CLI error messages."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from capsule_batch.model.bundle import ModelBundle
from capsule_batch.model.classes import CE24_CLASSES
from capsule_batch.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, reference_preprocess
from train.__main__ import main
from train.config import load_config
from train.synthetic_ce24 import class_frames, make_ce24_folder
from train.trainer import build_model, run_training

CLASSES = list(CE24_CLASSES)
TINY = ["model.arch=eva02_tiny_patch14_224", "model.model_args={depth: 2, img_size: 64, patch_size: 8}",
        "model.init=random",
        "data.input_size=64", "data.resize=64", "run.workers=0", "run.log_every=1000", "train.lr=1.0e-3",
        "train.batch_size=16", "train.eval_batch_size=64", "augment.grid_distortion_p=0",
        "augment.crop_scale=[0.7, 1.0]"]


def ce24_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.train=[{{kind: ce24, root: '{root}', split: training}}]",
            f"data.val=[{{kind: ce24, root: '{root}', split: validation, xlsx: '{root / 'validation_data.xlsx'}'}}]",
            f"run.dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def ce24(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ce24")
    counts = make_ce24_folder(root, per_class=24, recordings=4, size=64)
    assert counts == {"training": 240, "validation": 240}
    return root


@pytest.fixture(scope="module")
def trained(ce24: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("runs") / "ft"
    cfg = load_config(None, ce24_args(ce24, run_dir, "train.epochs=10"))
    return run_training(cfg, "finetune")


def test_short_finetune_learns(trained: dict[str, Any]) -> None:
    # 10 classes: chance is 0.1
    assert trained["val_metrics"]["balanced_accuracy"] >= 0.4, trained
    assert trained["val_count"] == trained["val_metrics"]["count"] == 240  # the whole validation set
    assert trained["epochs"] == list(range(10))
    run = Path(trained["run_dir"])
    for name in ("config.yaml", "history.jsonl", "metrics.json", "confusion_matrix.png", "roc.png", "train.log"):
        assert (run / name).is_file(), name
    assert (run / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert all(h["val_count"] == 240 and h["train_samples"] == 240 for h in history)
    assert "git_revision" in (run / "config.yaml").read_text()


def test_bundle_reproduces_validation_predictions(trained: dict[str, Any]) -> None:
    bundle = ModelBundle.load(trained["bundle"])
    assert bundle.class_names == CLASSES and bundle.arch == "eva02_tiny_patch14_224"
    assert bundle.preprocess.input_size == 64
    assert bundle.preprocess.mean == IMAGENET_MEAN and bundle.preprocess.std == IMAGENET_STD
    assert bundle.provenance["training_stage"] == "finetune"
    saved = np.load(Path(trained["run_dir"]) / "val_predictions.npz")
    model = bundle.create_model()
    x = torch.stack([torch.from_numpy(reference_preprocess(Image.open(p), bundle.preprocess)) for p in saved["refs"]])
    with torch.no_grad():
        probs = torch.softmax(model(x), 1).numpy()
    assert probs.shape == (240, 10)
    np.testing.assert_allclose(probs, saved["probs"], atol=1e-5)


@pytest.mark.cpu_choice
def test_trained_bundle_runs_through_capsule_batch_run(trained: dict[str, Any], tmp_path: Path) -> None:
    """The bundle a training run ends in is what `capsule-batch run` consumes: run it over the validation
    images as a frame folder and get the trainer's own validation probabilities back from the study file."""
    from click.testing import CliRunner

    from capsule_batch.cli import cli
    from capsule_batch.study.store import StudyReader

    saved = np.load(Path(trained["run_dir"]) / "val_predictions.npz")
    frames = tmp_path / "val frames"
    frames.mkdir()
    picked = list(range(0, len(saved["refs"]), 4))
    for i, k in enumerate(picked):
        shutil.copy(saved["refs"][k], frames / f"frame_{i}.jpg")
    res = CliRunner().invoke(cli, ["run", str(frames), "-m", str(trained["bundle"]), "-o", str(tmp_path / "out"),
                                   "--engine", "torch", "--precision", "fp32", "--source", "images", "--probs-dtype",
                                   "float32", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    (rec,) = summary["recordings"]
    assert rec["status"] == "done" and rec["frames"] == len(picked)
    with StudyReader(rec["output"]) as study:
        assert study.attrs["bundle_sha256"] == ModelBundle.load(trained["bundle"]).sha256
        np.testing.assert_allclose(study.probs(), saved["probs"][picked], atol=1e-5)


def test_evaluate_calibrate_predict(trained: dict[str, Any], ce24: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    bundle_dir = trained["bundle"]
    common = ce24_args(ce24, tmp_path / "unused")
    assert main(["evaluate", *common, f"evaluate.bundle={bundle_dir}", f"evaluate.out={tmp_path / 'ev'}"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["count"] == 240
    assert m["balanced_accuracy"] == pytest.approx(trained["val_metrics"]["balanced_accuracy"], abs=1e-6)
    assert (tmp_path / "ev" / "roc.png").is_file() and (tmp_path / "ev" / "per_class.csv").is_file()

    assert main(["calibrate", *common, f"calibrate.bundle={bundle_dir}", "calibrate.target_sensitivity=0.9"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    bundle = ModelBundle.load(bundle_dir)
    assert set(bundle.thresholds) == set(CLASSES) - {"Normal"}
    assert all(0.0 <= t <= 1.0 for t in bundle.thresholds.values())
    for name, row in report["classes"].items():
        assert row["sensitivity"] >= 0.9 and 0 < row["flag_rate"] <= 1
        assert bundle.thresholds[name] == row["threshold"]
    assert 0 < report["overall_flag_rate"] <= 1
    bundle.create_model()  # weights unchanged and verified

    images = tmp_path / "testing" / "Images"
    images.mkdir(parents=True)
    for p in sorted((ce24 / "validation").rglob("*.jpg"))[::10]:
        shutil.copy(p, images / p.name)
    out = tmp_path / "submission.xlsx"
    assert main(["predict", *common, f"predict.bundle={bundle_dir}", f"predict.images={images}",
                 f"predict.out={out}"]) == 0
    import openpyxl

    rows = list(openpyxl.load_workbook(out).active.iter_rows(values_only=True))
    assert list(rows[0]) == ["image_path", *CLASSES, "predicted_class"]
    assert sorted(r[0] for r in rows[1:]) == sorted(p.name for p in images.iterdir())
    for r in rows[1:]:
        assert sum(r[1:11]) == pytest.approx(1.0, abs=1e-4)
        assert r[11] == CLASSES[int(np.argmax(r[1:11]))]


def _write_source(root: Path, labels: dict[str, str], n: int, seed: int) -> None:
    for k, (label, cls) in enumerate(labels.items()):
        for r in range(2):
            (root / label).mkdir(parents=True, exist_ok=True)
            for i, img in class_frames(cls, n, 64, seed + 10 * k + r):
                Image.fromarray(img).save(root / label / f"{root.name}{k}r{r}_{i}.jpg", quality=92)


def test_pretrain_then_finetune_with_class_mapping(ce24: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    _write_source(tmp_path / "srcA", {"blood": "Bleeding", "clean": "Normal", "tattoo": "Foreign Body"}, 4, 500)
    _write_source(tmp_path / "srcB", {"Hemorrhage": "Bleeding", "polyp": "Polyp", "ulcer": "Ulcer",
                                      "worm": "Worms"}, 4, 700)
    mapping = tmp_path / "mapping.csv"
    mapping.write_text("source,label,ce24\nA,blood,Bleeding\nA,clean,Normal\nB,Hemorrhage,Bleeding\n"
                       "B,polyp,Polyp\nB,ulcer,Ulcer\n")
    merged = (f"{{kind: merged, mapping: '{mapping}', granularity: ce24, sources: ["
              f"{{name: A, kind: folder, root: '{tmp_path / 'srcA'}'}}, "
              f"{{name: B, kind: folder, root: '{tmp_path / 'srcB'}'}}]}}")
    pre_dir = tmp_path / "pre"
    cfg = load_config(Path(__file__).parent.parent / "train/configs/ee24_pretrain.yaml",
                      [*TINY, f"data.train=[{merged}]", "data.val_fraction=0.5", f"run.dir={pre_dir}",
                       "train.epochs=1"])
    with caplog.at_level(logging.INFO):
        pre = run_training(cfg, "pretrain")
    assert "8 images of A label 'tattoo' are not in the mapping: excluded" in caplog.text
    assert "8 images of B label 'worm' are not in the mapping: excluded" in caplog.text
    assert "40 images mapped, 16 unmapped (excluded), 0 excluded by mapping" in caplog.text
    assert pre["train_count"] + pre["val_count"] == 40
    assert (pre_dir / "bundle" / "model.json").is_file()

    # fine-tuning starts from the stage-1 run: every tensor, head included (same 10 classes)
    ft_cfg = load_config(Path(__file__).parent.parent / "train/configs/ce24_finetune.yaml",
                         ce24_args(ce24, tmp_path / "ft", f"model.init={pre_dir}", "train.epochs=1",
                                   "train.samples_per_epoch=32"))
    model, info = build_model(ft_cfg, CLASSES)
    pre_model = ModelBundle.load(pre_dir / "bundle").create_model()
    assert info["head_reused"]
    for k, v in pre_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    # a different label set: the backbone is reused, the head starts afresh
    two = load_config(None, [*TINY, f"model.init={pre_dir}"])
    model2, info2 = build_model(two, ["lesion", "normal"])
    assert not info2["head_reused"] and model2.head.weight.shape[0] == 2
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(model2.state_dict()[key], pre_model.state_dict()[key])

    ft = run_training(ft_cfg, "finetune")
    assert ft["val_count"] == 240
    assert ModelBundle.load(ft["bundle"]).provenance["init"] == str(pre_dir / "bundle")


def test_resume_continues_from_saved_epoch(ce24: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "r"  # bf16 autocast on CPU: the mixed-precision path
    args = ce24_args(ce24, run_dir, "train.epochs=3", "train.samples_per_epoch=32", "run.precision=bf16")

    def interrupt(epoch: int, record: dict[str, Any]) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(load_config(None, args), "finetune", on_epoch_end=interrupt)
    saved = torch.load(run_dir / "last.pt", weights_only=True)
    assert saved["epoch"] == 1
    with pytest.raises(Exception, match="holds a run already"):
        run_training(load_config(None, args), "finetune")
    with caplog.at_level(logging.INFO):
        summary = run_training(load_config(None, [*args, "run.resume=true"]), "finetune")
    assert "resuming" in caplog.text and "after epoch 1" in caplog.text
    assert summary["epochs"] == [0, 1, 2]  # each epoch once
    lrs = [json.loads(line)["lr"] for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-3 * 0.95 ** (e / 2) for e in range(3)])


def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_ce24_folder(tmp_path / "c", per_class=2, recordings=1, size=48, classes=tuple(CLASSES[:-1]), xlsx=False)
    rc = main(["finetune", *ce24_args(tmp_path / "c", tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("error: ") and "missing class folders ['Worms']" in err[-1]
    rc = main(["finetune", "train.epochz=1"])
    assert rc == 1 and "unknown config key 'train.epochz'" in capsys.readouterr().err


def test_image_breaking_during_training_is_skipped_and_counted(ce24: Path, tmp_path: Path) -> None:
    root = tmp_path / "c"
    shutil.copytree(ce24, root)
    next((root / "training" / "Erosion").rglob("*.jpg")).write_bytes(b"broken after the up-front check")
    args = ce24_args(root, tmp_path / "run", "train.epochs=1", "data.check_images=false",
                     "train.balanced_sampling=false")  # a permutation: every training image drawn once
    summary = run_training(load_config(None, args), "finetune")
    history = json.loads((tmp_path / "run" / "history.jsonl").read_text())
    assert history["train_skipped"] == 1 and history["train_samples"] == 239
    assert summary["val_count"] == 240
