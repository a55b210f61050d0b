"""Training data: config layering, dataset readers, class mapping, grouped splits, leakage, bad input."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capsule_batch.model.classes import CE24_CLASSES
from capsule_batch.sources.synthesize import read_stamp, synthesize
from train import data as D
from train.config import ConfigError, load_config, save_resolved
from train.synthetic_ce24 import class_frames, make_ce24_folder
from train.trainer import prepare_data

CLASSES = list(CE24_CLASSES)


@pytest.fixture(scope="module")
def ce24(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ce24")
    make_ce24_folder(root, per_class=4, recordings=2, size=48)
    return root


def _cfg(root: Path, *extra: str) -> dict:
    return load_config(None, [f"data.train=[{{kind: ce24, root: '{root}', split: training}}]",
                              f"data.val=[{{kind: ce24, root: '{root}', split: validation}}]", "run.workers=1", *extra])


# ---------------------------------------------------------------------------------------------- config


def test_config_layers_and_overrides(tmp_path: Path) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text("train:\n  lr: 1.0e-4\n  batch_size: 64\n")
    cfg = load_config(exp, ["train.epochs=3", "model.model_args={depth: 2}", "model.model_args.img_size=64"])
    assert cfg["train"]["lr"] == 1e-4 and cfg["train"]["batch_size"] == 64 and cfg["train"]["epochs"] == 3
    assert cfg["train"]["eps"] == 1e-16  # untouched defaults survive
    assert cfg["model"]["model_args"] == {"depth": 2, "img_size": 64}
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        load_config(None, ["train.lrr=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        load_config(bad)
    save_resolved(cfg, tmp_path, "finetune")
    import yaml

    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 3 and saved["meta"]["stage"] == "finetune"
    assert saved["meta"]["git_revision"]


def test_shipped_experiment_files_only_hold_known_keys() -> None:
    configs = Path(__file__).parent.parent / "train" / "configs"
    ft = load_config(configs / "ce24_finetune.yaml")
    pt = load_config(configs / "ee24_pretrain.yaml")
    assert ft["train"]["lr"] == 1e-6 and ft["train"]["batch_size"] == 128
    assert pt["train"]["lr"] == 1e-4 and pt["train"]["batch_size"] == 64
    assert ft["train"]["grad_clip"] == 0.5 and ft["train"]["optimizer"] == "adabelief"


# ---------------------------------------------------------------------------------------------- readers


def test_ce24_folder_and_xlsx_agree(ce24: Path) -> None:
    folder = D.read_spec({"kind": "ce24", "root": str(ce24), "split": "validation"}, "v")
    xlsx = D.read_spec({"kind": "ce24", "root": str(ce24), "split": "validation",
                        "xlsx": str(ce24 / "validation_data.xlsx")}, "v")
    assert sorted((s.ref, s.label) for s in folder) == sorted((s.ref, s.label) for s in xlsx)
    assert {s.label for s in folder} == set(CLASSES)
    assert {s.source for s in folder} == {"KID", "KVASIR"}


def test_missing_class_folder_is_named(ce24: Path, tmp_path: Path) -> None:
    root = tmp_path / "c"
    shutil.copytree(ce24 / "training", root / "training")
    shutil.rmtree(root / "training" / "Worms")
    with pytest.raises(D.DataError, match=r"missing class folders \['Worms'\]"):
        D.read_spec({"kind": "ce24", "root": str(root)}, "data.train.0")
    got = D.read_spec({"kind": "ce24", "root": str(root), "allow_missing_classes": True}, "data.train.0")
    assert "Worms" not in {s.label for s in got}


def test_seed_csv_reader_selects_folds(tmp_path: Path) -> None:
    rows = []
    for k, (cls, patient) in enumerate([("Polyp", "p1"), ("Normal", "p1"), ("Ulcer", "p2"), ("Normal", "p3")]):
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), k * 40, np.uint8)).save(tmp_path / "img" / f"{k}.png")
        rows.append(["kvasir", patient, f"img/{k}.png", f"kv_{k}.png", cls, k % 2, cls.lower()])
    path = tmp_path / "seed.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dataset", "patient_id", "frame_path", "proposed_name", "class", "fold", "original_class"])
        w.writerows(rows)
    got = D.read_spec({"kind": "seed_csv", "path": str(path), "folds": [0]}, "d")
    assert [(s.label, s.group) for s in got] == [("Polyp", "kvasir/patient-p1"), ("Ulcer", "kvasir/patient-p2")]
    assert Path(got[0].ref).is_file()
    orig = D.read_spec({"kind": "seed_csv", "path": str(path), "label_column": "original_class"}, "d")
    assert orig[0].label == "polyp"


def test_recording_frames_decode_exactly(tmp_path: Path) -> None:
    res = synthesize(tmp_path / "rec.mp4", 40, size=64, stamp=True, findings_per_1000=60, seed=2)
    samples = D.read_spec({"kind": "recording", "video": str(res.path), "labels": str(res.labels_csv),
                           "every": 3}, "r")
    assert [s.frame for s in samples] == list(range(0, 40, 3))
    truth = {int(r["frame"]): r["label"] for r in csv.DictReader(open(res.labels_csv))}
    for s in samples[::-1]:  # backwards: every read is a real seek
        assert read_stamp(np.asarray(D.load_rgb(s))) == s.frame
        assert s.label == truth[s.frame]
    assert len({s.group for s in samples}) == 1  # one recording = one group


def test_recording_as_frame_folder(tmp_path: Path) -> None:
    res = synthesize(tmp_path / "rec", 12, codec="png", size=48, findings_per_1000=80, seed=4)
    samples = D.read_spec({"kind": "recording", "frames": str(res.path), "labels": str(res.labels_csv)}, "r")
    assert [Path(s.ref).name for s in samples] == [f"frame_{i}.png" for i in range(12)]
    assert len({s.name for s in samples}) == 12 and len({s.group for s in samples}) == 1
    # a metadata file covering several videos (Kvasir-Capsule style, ';'-separated): rows selected by video
    meta = tmp_path / "metadata.csv"
    meta.write_text("video_id;frame_number;finding_class\nrec;0;Normal\nother;1;Polyp\nrec;5;Ulcer\n")
    got = D.read_spec({"kind": "recording", "frames": str(res.path), "labels": str(meta), "select": {"video_id": "rec"},
                       "frame_column": "frame_number", "label_column": "finding_class"}, "r")
    assert [(Path(s.ref).name, s.label) for s in got] == [("frame_0.png", "Normal"), ("frame_5.png", "Ulcer")]



GALAR_CSV = """frame;small intestine;angiectasia;blood - fresh;ulcer;polyp
0;1;0;0;0;0
1;1;1;0;0;0
2;1;0;1.0;1;0
3;1;0;0;0;1
4;1;0;0;0;
5;1;0;1;0;0
"""


def test_recording_with_multi_hot_label_columns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Galar's per-frame CSVs: one 0/1 column per finding; the listed columns give the label."""
    res = synthesize(tmp_path / "galar_7", 6, codec="png", size=48, seed=5)
    labels = tmp_path / "7.csv"
    labels.write_text(GALAR_CSV)
    findings = ["angiectasia", "blood - fresh", "ulcer", "polyp"]
    spec = {"kind": "recording", "frames": str(res.path), "labels": str(labels), "label_columns": findings}
    with caplog.at_level(logging.WARNING, logger="train.data"):
        got = D.read_spec({**spec, "none_label": "normal"}, "g")
    assert [(s.frame if s.frame is not None else Path(s.ref).name, s.label) for s in got] == [
        ("frame_0.png", "normal"), ("frame_1.png", "angiectasia"), ("frame_3.png", "polyp"),
        ("frame_4.png", "normal"), ("frame_5.png", "blood - fresh")]  # frame 2 has two findings: left out
    assert "1 frames left out: several label columns set (on_multiple: first keeps them" in caplog.text
    caplog.clear()
    # the listed order is the priority; without none_label frames with no finding are left out (and counted)
    with caplog.at_level(logging.WARNING, logger="train.data"):
        got = D.read_spec({**spec, "label_columns": ["ulcer", *findings[:2], "polyp"], "on_multiple": "first"}, "g")
    assert [(Path(s.ref).name, s.label) for s in got] == [
        ("frame_1.png", "angiectasia"), ("frame_2.png", "ulcer"), ("frame_3.png", "polyp"),
        ("frame_5.png", "blood - fresh")]
    assert "2 frames left out: no label column set (none_label: <label> keeps them)" in caplog.text
    # relabelled onto CE24 through a merged mapping, like any other source
    mapping = tmp_path / "map.csv"
    mapping.write_text("source,label,ce24\ngalar,normal,Normal\ngalar,angiectasia,Angioectasia\n"
                       "galar,blood - fresh,Bleeding\ngalar,polyp,Polyp\ngalar,ulcer,Ulcer\n")
    merged = D.read_spec({"kind": "merged", "mapping": str(mapping), "granularity": "ce24",
                          "sources": [{**spec, "name": "galar", "none_label": "normal", "on_multiple": "first"}]}, "m")
    assert [s.label for s in merged] == ["Normal", "Angioectasia", "Bleeding", "Polyp", "Normal", "Bleeding"]
    assert {s.group for s in merged} == {"galar/galar/galar_7"}


def test_one_hot_cells_are_numbers_or_words() -> None:
    """xlsx cells arrive as numbers, CSV cells as text: any spelling of 0 or 1 counts, anything else is refused."""
    assert [D.is_set(v) for v in (1, 1.0, "1.00", " 1 ", True, "yes", "TRUE")] == [True] * 7
    assert [D.is_set(v) for v in (0, 0.0, "0.000", None, "", False, "no")] == [False] * 7
    for bad in (2, 0.5, "2", "x", "nan"):
        with pytest.raises(ValueError, match="is not 0 or 1"):
            D.is_set(bad)


@pytest.mark.parametrize(("change", "message"), [
    ({"label_columns": ["ulcer", "tattoo"]}, "label_columns ['tattoo'] are not columns of the file"),
    ({"label_columns": "ulcer"}, "label_columns is a list of column names"),
    ({"label_columns": ["ulcer", "ulcer"]}, "label_columns lists a column twice"),
    ({"label_column": "ulcer"}, "give label_column or label_columns, not both"),
    ({"on_multiple": "vote"}, "on_multiple is 'exclude' or 'first', not 'vote'"),
    ({"none_lable": "normal"}, "unknown key(s) ['none_lable'] for a recording dataset (it reads every, "),
    ({"csv": GALAR_CSV.replace("3;1;0;0;0;1", "3;1;0;0;0;2")}, "7.csv: line 5, column 'polyp': '2' is not 0 or 1"),
    ({"csv": GALAR_CSV.replace("\n4;", "\nfour;")}, "7.csv: line 6: frame 'four' is not a frame number"),
])
def test_bad_multi_hot_specs_are_named(tmp_path: Path, change: dict, message: str) -> None:
    res = synthesize(tmp_path / "galar_7", 6, codec="png", size=48, seed=5)
    labels = tmp_path / "7.csv"
    labels.write_text(change.pop("csv", GALAR_CSV))
    spec = {"kind": "recording", "frames": str(res.path), "labels": str(labels),
            "label_columns": ["angiectasia", "polyp"], **change}
    with pytest.raises(D.DataError, match=re.escape(message)):
        D.read_spec(spec, "g")

def _source_images(root: Path, labels: dict[str, str], n: int) -> None:
    """A labelled folder whose labels are the source's own names; pixels from the CE24 class given."""
    for k, (label, cls) in enumerate(labels.items()):
        (root / label).mkdir(parents=True)
        for i, img in class_frames(cls, n, 48, 1000 + k):
            Image.fromarray(img).save(root / label / f"{root.name}{k}_{i}.png")


def test_merged_sources_through_mapping_count_unmapped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _source_images(tmp_path / "a", {"blood": "Bleeding", "clean": "Normal", "tattoo": "Foreign Body"}, 3)
    _source_images(tmp_path / "b", {"Hemorrhage": "Bleeding", "polyp": "Polyp", "bubbles": "Normal"}, 3)
    mapping = tmp_path / "map.csv"
    mapping.write_text("source,label,ce24,coarse\nA,blood,Bleeding,lesion\nA,clean,Normal,normal\n"
                       "B,Hemorrhage,Bleeding,lesion\nB,polyp,Polyp,lesion\nB,bubbles,-,-\n")
    spec = {"kind": "merged", "mapping": str(mapping), "granularity": "ce24",
            "sources": [{"name": "A", "kind": "folder", "root": str(tmp_path / "a")},
                        {"name": "B", "kind": "folder", "root": str(tmp_path / "b")}]}
    with caplog.at_level(logging.INFO, logger="train.data"):
        got = D.build_samples([spec], CLASSES, "data.train")
    assert {(s.source, s.label) for s in got} == {("A", "Bleeding"), ("A", "Normal"), ("B", "Bleeding"),
                                                  ("B", "Polyp")}
    assert len(got) == 12
    assert "3 images of A label 'tattoo' are not in the mapping: excluded" in caplog.text
    assert "12 images mapped, 3 unmapped (excluded), 3 excluded by mapping" in caplog.text
    coarse = D.build_samples([{**spec, "granularity": "coarse"}], ["lesion", "normal"], "data.train")
    assert sorted({s.label for s in coarse}) == ["lesion", "normal"]


def test_labels_outside_the_class_set_are_refused(tmp_path: Path) -> None:
    _source_images(tmp_path / "a", {"blood": "Bleeding"}, 2)
    with pytest.raises(D.DataError, match=r"labels not in the class set: 'blood' \(2\)"):
        D.build_samples([{"kind": "folder", "root": str(tmp_path / "a")}], CLASSES, "data.train")
    mapping = tmp_path / "map.csv"
    mapping.write_text("source,label,ce24\nA,blood,Haemorrhage\n")
    spec = {"kind": "merged", "mapping": str(mapping), "granularity": "ce24",
            "sources": [{"name": "A", "kind": "folder", "root": str(tmp_path / "a")}]}
    with pytest.raises(D.DataError, match="'Haemorrhage'"):
        D.build_samples([spec], CLASSES, "data.train")


# ---------------------------------------------------------------------------------------------- checks


def test_corrupt_images_are_counted_and_skipped(ce24: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "c"
    shutil.copytree(ce24, root)
    victims = sorted((root / "training" / "Polyp").rglob("*.jpg"))[:2]
    victims[0].write_bytes(b"not a jpeg")
    victims[1].write_bytes(victims[1].read_bytes()[:100])  # truncated
    total = len(list((root / "training").rglob("*.jpg")))
    with caplog.at_level(logging.WARNING):
        prep = prepare_data(_cfg(root))
    assert len(prep.train) == total - 2
    assert f"2 of {total} images are corrupt or unreadable: skipped" in caplog.text
    assert all(str(v) in caplog.text for v in victims)


def test_empty_split_is_a_clear_error(ce24: Path) -> None:
    cfg = _cfg(ce24)
    cfg["data"]["val"] = []
    with pytest.raises(D.DataError, match="validation set is empty: give data.val datasets or data.val_fraction"):
        prepare_data(cfg)
    cfg["data"]["train"] = []
    with pytest.raises(D.DataError, match="training set is empty"):
        prepare_data(cfg)


def test_leakage_by_name_and_by_pixels(ce24: Path, tmp_path: Path) -> None:
    root = tmp_path / "c"
    shutil.copytree(ce24, root)
    src = sorted((root / "training" / "Ulcer").rglob("*.jpg"))[0]
    dst = root / "validation" / "Ulcer" / "KID"
    shutil.copy(src, dst / src.name)
    with pytest.raises(D.DataError, match="1 file names in both train and val"):
        prepare_data(_cfg(root))
    (dst / src.name).unlink()
    Image.open(src).save(dst / "renamed_copy.png")  # same pixels, other name and format
    with pytest.raises(D.DataError, match="1 images with the same pixels in both train and val"):
        prepare_data(_cfg(root))



def test_data_command_checks_and_counts_without_training(ce24: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m train data`: the checks training makes, and the counts, before an hours-long run."""
    from train.__main__ import main

    exp = tmp_path / "exp.yaml"
    exp.write_text(f"data:\n  train: [{{kind: ce24, root: '{ce24}', split: training}}]\n"
                   f"  val: [{{kind: ce24, root: '{ce24}', split: validation}}]\nrun:\n  workers: 1\n")
    assert main(["data", "--config", str(exp)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["classes"] == CLASSES and out["classes_without_images"] == {"train": [], "val": []}
    for split in ("train", "val"):
        files = list((ce24 / ("training" if split == "train" else "validation")).rglob("*.jpg"))
        assert out[split]["images"] == len(files) == sum(out[split]["per_class"].values())
        assert out[split]["groups"] >= 2 and sum(out[split]["per_source"].values()) == len(files)
    # leakage is an error with the reason, as in training
    root = tmp_path / "c"
    shutil.copytree(ce24, root)
    src = sorted((root / "training" / "Ulcer").rglob("*.jpg"))[0]
    shutil.copy(src, root / "validation" / "Ulcer" / "KID" / src.name)
    assert main(["data", "--config", str(exp), f"data.val=[{{kind: ce24, root: '{root}', split: validation}}]"]) == 1
    assert "train/val leakage: 1 file names in both train and val" in capsys.readouterr().err

def test_grouped_split_is_stratified_and_keeps_groups_apart() -> None:
    rng = np.random.default_rng(0)
    samples = [D.Sample(f"/x/{g}_{i}.jpg", CLASSES[g % 4], f"p{g}", "s", f"{g}_{i}.jpg")
               for g in range(40) for i in range(int(rng.integers(2, 9)))]
    train, val = D.grouped_split(samples, 0.25, seed=1)
    assert len(train) + len(val) == len(samples)
    assert not {s.group for s in train} & {s.group for s in val}
    for c in CLASSES[:4]:
        assert any(s.label == c for s in val) and any(s.label == c for s in train)
    with pytest.raises(D.DataError, match="cannot split 1 patients"):
        D.grouped_split(samples[:3], 0.25, seed=1)
