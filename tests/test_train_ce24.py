"""The official CE24 split and the seed's own files, as they are: the shipped fine-tune config starts, the overlap
is reported and each policy does what it says, groups mean something per source, the seed's CSVs and
class_mapping.json are read unchanged, and `predict` takes the seed's test.csv."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import openpyxl
import pytest
from ce24_real import SEED_NAMES, copy_tree, make_ce24_tree

from capsule_batch.model.classes import CE24_CLASSES, resolve_classes
from train import data as D
from train.__main__ import main
from train.config import load_config
from train.trainer import prepare_data, run_training

CLASSES = list(CE24_CLASSES)
FINETUNE = Path(__file__).parent.parent / "train" / "configs" / "ce24_finetune.yaml"


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory):
    return make_ce24_tree(tmp_path_factory.mktemp("ce24real"))


def _finetune_cfg(root: Path, *extra: str) -> dict:
    return load_config(FINETUNE, [f"data.train.0.root={root}", f"data.val.0.root={root}", "model.init=null",
                                  "run.workers=1", *extra])


def test_shipped_finetune_config_starts_on_the_official_split(tree, capsys: pytest.CaptureFixture[str],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    argv = ["data", "--config", str(FINETUNE), f"data.train.0.root={tree.root}", f"data.val.0.root={tree.root}",
            "model.init=null", "run.workers=1"]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    for split, key in (("training", "train"), ("validation", "val")):
        files = list((tree.root / split).rglob("*.jpg"))
        assert out[key]["images"] == len(files) == len(tree.files[split])  # 100%: every copy of every image
        assert out[key]["per_class"] == {c: tree.count(split)[c] for c in CLASSES}
        assert out[key]["per_source"] == dict(sorted(Counter(s for _, s, _ in tree.files[split]).items()))
    shared = out["overlap"]["val_images_also_in_train"]
    assert shared["images"] == len(tree.in_both) == 3
    assert shared["per_source"] == {"SEE-AI": 3} and sum(shared["per_class"].values()) == 3
    assert out["overlap"]["matched_by"] == {"name+pixels": 3}
    # Kvasir-Capsule videos, KID patients and the shared SEE-AI images are on both sides
    per_source = out["overlap"]["groups_on_both_sides_per_source"]
    assert per_source["KVASIR"] == 3 and per_source["KID"] == 3 and per_source["SEE-AI"] == 3
    assert out["train_duplicates"]["images_under_several_classes"] == 2
    assert out["val_duplicates"]["images_under_several_classes"] == 2
    assert "train/val overlap (data.overlap=keep): 3 validation images are also in training" in caplog.text
    assert "'SEE-AI': 3" in caplog.text and "patients/recordings on both sides" in caplog.text


def test_default_policy_refuses_and_names_the_choices(tree, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["data", "--config", str(FINETUNE), f"data.train.0.root={tree.root}", f"data.val.0.root={tree.root}",
            "data.overlap=refuse", "run.workers=1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "train/val leakage: 3 file names in both train and val" in err
    assert "data.overlap=keep" in err and "drop_from_val or resplit" in err


def test_drop_from_val_leaves_out_exactly_the_shared_images(tree) -> None:
    p = prepare_data(_finetune_cfg(tree.root, "data.overlap=drop_from_val"))
    assert len(p.train) == len(tree.files["training"])
    assert len(p.val) == len(tree.files["validation"]) - len(tree.in_both)
    assert not {(s.source, s.name) for s in p.train} & {(s.source, s.name) for s in p.val}
    assert p.notes["dropped_from_val"] == 3


def test_resplit_keeps_groups_and_identical_images_on_one_side(tree) -> None:
    p = prepare_data(_finetune_cfg(tree.root, "data.overlap=resplit", "data.val_fraction=0.3"))
    assert not {s.group for s in p.train} & {s.group for s in p.val}
    assert not {(s.source, s.name) for s in p.train} & {(s.source, s.name) for s in p.val}
    hashes = dict(zip([s.ref for s in p.train + p.val], D.check_images(p.train + p.val, 1)[1], strict=True))
    assert not {hashes[s.ref] for s in p.train} & {hashes[s.ref] for s in p.val}
    # the copies in both splits count once; copies under several classes keep their labels
    total = len(tree.files["training"]) + len(tree.files["validation"]) - len(tree.in_both)
    assert len(p.train) + len(p.val) == total == p.notes["resplit"]["pooled_unique"]
    see = Counter("val" if s in p.val else "train" for s in p.train + p.val if s.source == "SEE-AI")
    assert see["train"] > see["val"] > 0  # SEE-AI images are their own groups: not all of them in validation


@pytest.mark.parametrize(("rule", "left_out"), [("keep", 0), ("first", 2), ("drop", 4)])
def test_images_under_several_class_folders_follow_the_rule(tree, rule: str, left_out: int) -> None:
    p = prepare_data(_finetune_cfg(tree.root, f"data.duplicates={rule}"))
    assert len(p.train) == len(tree.files["training"]) - left_out
    names = Counter(s.name for s in p.train)
    for name in tree.multi_within["training"]:
        assert names[name] == {"keep": 2, "first": 1, "drop": 0}[rule]
    if rule == "first":  # the copy of the first class in CE24 order stays
        kept = {s.name: s.label for s in p.train if s.name in tree.multi_within["training"]}
        for name, label in kept.items():
            labels = [c for c, _, n in tree.files["training"] if n == name]
            assert label == min(labels, key=CLASSES.index)


def test_groups_per_source() -> None:
    assert D.ce24_group("KVASIR", "04a78ef00c5245e0_1037") == "KVASIR/video-04a78ef00c5245e0"
    assert D.ce24_group("KID", "angioectasia-P0-1") == D.ce24_group("KID", "polyp-P0-12") == "KID/patient-0"
    assert D.ce24_group("SEE-AI", "image00279") == "SEE-AI/image-image00279"  # no patient id: the image itself
    assert D.ce24_group("SEE-AI", "image00279") != D.ce24_group("SEE-AI", "image00280")
    assert D.ce24_group("AIIMS", "aiims3") == "AIIMS/image-aiims3"


def test_ground_truth_xlsx_with_backslash_paths_equals_the_folders(tree) -> None:
    for split in ("training", "validation"):
        xlsx = tree.root / f"{split}_data.xlsx"
        ws = openpyxl.load_workbook(xlsx, read_only=True).worksheets[0]
        assert "\\" in next(ws.iter_rows(min_row=2, values_only=True))[0]
        folder = D.read_spec({"kind": "ce24", "root": str(tree.root), "split": split}, "d")
        listed = D.read_spec({"kind": "ce24", "root": str(tree.root), "split": split, "xlsx": str(xlsx)}, "d")
        assert sorted((s.ref, s.label, s.group) for s in folder) == sorted((s.ref, s.label, s.group) for s in listed)
        assert "Foreign Body" in {s.label for s in folder}


def test_training_on_the_official_split_writes_the_overlap_into_the_run_folder(tree, tmp_path: Path) -> None:
    run_dir = tmp_path / "ft"
    cfg = _finetune_cfg(tree.root, "model.init=random", "model.arch=eva02_tiny_patch14_224",
                        "model.model_args={depth: 1, img_size: 32, patch_size: 8}", "data.input_size=32",
                        "data.resize=32", "run.workers=0", "run.device=cpu", f"run.dir={run_dir}", "train.epochs=1",
                        "train.batch_size=8", "train.eval_batch_size=64", "train.samples_per_epoch=8")
    summary = run_training(cfg, "finetune")
    assert summary["val_count"] == len(tree.files["validation"])
    counts = json.loads((run_dir / "overlap.json").read_text())
    assert counts["val_images_also_in_train"]["images"] == 3
    rows = (run_dir / "overlap.csv").read_text().splitlines()
    assert rows[0] == "split,source,class,name,path,match"
    assert sum(r.startswith("val,SEE-AI") for r in rows) == 3 and sum(r.startswith("train,SEE-AI") for r in rows) == 3
    assert all(name in "\n".join(rows) for name in tree.in_both)


# ---------------------------------------------------------------------------------------------- the seed's files


def _seed_spec(tree, split: str, **extra) -> dict:
    return {"kind": "seed_csv", "path": str(tree.base / "train_val.csv"), "root": str(tree.base), "split": split,
            "class_mapping": str(tree.base / "class_mapping.json"), **extra}


def test_seed_csv_and_class_mapping_are_read_unchanged(tree) -> None:
    text = (tree.base / "train_val.csv").read_text()
    assert "capsulevision\\training\\" in text and ",normal-mucosa," in text and "\nkvasircapsule,," in text
    for split in ("training", "validation"):
        got = D.build_samples([_seed_spec(tree, split)], CLASSES, "data.train")
        assert Counter(s.label for s in got) == tree.count(split)  # the right count per CE24 class
        assert all(Path(s.ref).is_file() for s in got)
        kv = {s.group for s in got if s.source == "kvasircapsule"}
        assert kv and all(g.startswith("kvasircapsule/video-") for g in kv)  # empty patient_id: the video id
        assert {s.group for s in got if s.source == "kid"} <= {f"kid/patient-{k}" for k in range(3)}
        see = [s for s in got if s.source == "seeai"]
        assert len({s.group for s in see}) == len({s.name for s in see})  # one group per SEE-AI image, not one in all
    # fold numbers directly: fold 0 is the validation split
    assert len(D.read_spec({**_seed_spec(tree, "validation"), "split": None, "folds": [0]}, "d", CLASSES)) == len(
        tree.files["validation"])


def test_seed_labels_without_the_mapping_are_refused_with_the_hint(tree) -> None:
    spec = _seed_spec(tree, "training")
    spec.pop("class_mapping")
    with pytest.raises(D.DataError, match="labels not in the class set: .*'normal-mucosa'.*class_mapping.json"):
        D.build_samples([spec], CLASSES, "data.train")


def test_class_mapping_json_as_the_class_set(tree) -> None:
    assert resolve_classes(str(tree.base / "class_mapping.json")) == SEED_NAMES
    cfg = load_config(None, [f"data.classes={tree.base / 'class_mapping.json'}", "run.workers=1",
                             f"data.train=[{{kind: seed_csv, path: '{tree.base / 'train_val.csv'}', split: training}}]",
                             f"data.val=[{{kind: seed_csv, path: '{tree.base / 'train_val.csv'}', split: validation}}]",
                             "data.overlap=keep"])
    p = prepare_data(cfg)
    assert p.classes == SEED_NAMES and Counter(s.label for s in p.val)["normal-mucosa"] == tree.count(
        "validation")["Normal"]


def test_a_missing_file_is_missing_not_corrupt(tree, tmp_path: Path) -> None:
    t = copy_tree(tree, tmp_path / "c")
    cls, source, name = t.files["validation"][0]
    (t.root / "validation" / cls / source / name).unlink()
    with pytest.raises(D.DataError, match=r"train_val.csv: 1 listed images are missing under .*" + re.escape(name)):
        D.build_samples([_seed_spec(t, "validation")], CLASSES, "data.val")


def test_predict_takes_the_seed_test_csv(tree, tiny_bundle, tmp_path: Path) -> None:
    out = tmp_path / "sub.xlsx"
    assert main(["predict", f"predict.bundle={tiny_bundle.path}", f"predict.images={tree.base / 'test.csv'}",
                 f"predict.out={out}", "run.workers=1"]) == 0
    rows = list(openpyxl.load_workbook(out, read_only=True).worksheets[0].iter_rows(values_only=True))
    assert rows[0] == ("image_path", *CLASSES, "predicted_class")
    assert [r[0] for r in rows[1:]] == [n for _, _, n in tree.files["testing"]]
    assert all(abs(sum(r[1:11]) - 1) < 1e-4 and r[11] in CLASSES for r in rows[1:])
