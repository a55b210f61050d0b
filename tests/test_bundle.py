"""ModelBundle: importing the seed's checkpoint format and others, and refusing what must be refused."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from capsule_batch.cli import cli
from capsule_batch.errors import BundleError
from capsule_batch.model.bundle import ModelBundle, import_checkpoint, read_checkpoint
from capsule_batch.model.classes import CE24_CLASSES
from capsule_batch.model.preprocess import IMAGENET_MEAN, IMAGENET_STD

ARCH = "eva02_tiny_patch14_224"


class SeedClassifier(torch.nn.Module):
    def __init__(self, dim: int, n: int):
        super().__init__()
        self.linear = torch.nn.Linear(dim, n)


class SeedModule(torch.nn.Module):
    """The seed's LightningModule layout: a head-less timm backbone plus `classifier.linear`."""

    def __init__(self, arch: str = ARCH, n: int = 10):
        super().__init__()
        self.backbone = timm.create_model(arch, pretrained=False, num_classes=0)
        self.classifier = SeedClassifier(self.backbone.num_features, n)
        with torch.no_grad():  # logits that are not tiny, so a wrong mapping cannot hide
            self.classifier.linear.weight.normal_(0, 2.0)
            self.classifier.linear.bias.normal_(0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.linear(self.backbone(x))


@contextmanager
def fake_lightning_attribute_dict():
    """Make `lightning.fabric.utilities.data.AttributeDict` picklable without installing Lightning."""
    names = ["lightning", "lightning.fabric", "lightning.fabric.utilities", "lightning.fabric.utilities.data"]
    mods = {n: types.ModuleType(n) for n in names}

    class AttributeDict(dict):
        pass

    AttributeDict.__module__ = names[-1]
    AttributeDict.__qualname__ = "AttributeDict"
    mods[names[-1]].AttributeDict = AttributeDict
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(mods)
    try:
        yield AttributeDict
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


@pytest.fixture(scope="module")
def seed_ckpt(tmp_path_factory) -> tuple[Path, SeedModule]:
    torch.manual_seed(0)
    module = SeedModule().eval()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    module(torch.randn(1, 3, 224, 224)).sum().backward()
    opt.step()  # optimizer state with exp_avg tensors, as in a real checkpoint
    path = tmp_path_factory.mktemp("seed") / "eva02_tiny.ee24_ft_ce24.ckpt"
    with fake_lightning_attribute_dict() as AttributeDict:
        ckpt = {
            "epoch": 7,
            "global_step": 1234,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": module.state_dict(),
            "optimizer_states": [opt.state_dict()],
            "lr_schedulers": [{"base_lrs": [1e-6], "last_epoch": 7}],
            "hparams_name": "kwargs",
            "hyper_parameters": AttributeDict(lr=1e-6, model_arch=ARCH, num_classes=10),
        }
        torch.save(ckpt, path)
    assert "lightning" not in sys.modules
    return path, module


def test_seed_checkpoint_imports_with_identical_logits(seed_ckpt, tmp_path):
    path, module = seed_ckpt
    out = tmp_path / "bundle"
    res = CliRunner().invoke(cli, ["model", "import", str(path), "--arch", ARCH, "-o", str(out)])
    assert res.exit_code == 0, res.output
    bundle = ModelBundle.load(out)
    assert bundle.class_names == list(CE24_CLASSES)
    assert bundle.preprocess.mean == IMAGENET_MEAN and bundle.preprocess.std == IMAGENET_STD
    # the seed's infer.py transform: A.Resize(224, 224, cv2.INTER_CUBIC) on the whole frame, no antialiasing
    pre = bundle.preprocess
    assert (pre.input_size, pre.resize, pre.resize_mode, pre.interpolation, pre.antialias) == (
        224, 224, "whole", "bicubic", False)
    assert bundle.provenance["source_format"] == "lightning-seed" and bundle.provenance["transform"] == "seed"
    assert "whole frame to 224x224" in res.output and "no antialiasing" in res.output
    model = bundle.create_model()
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        ref, got = module(x), model(x)
    assert ref.abs().max() > 1.0  # logits are not tiny
    assert (ref - got).abs().max().item() <= 1e-5


def test_timm_state_dict_and_safetensors_import(tmp_path):
    torch.manual_seed(1)
    model = timm.create_model(ARCH, pretrained=False, num_classes=3, depth=2).eval()
    names = tmp_path / "classes.txt"
    names.write_text("# custom\nclean\n\nblood\nlesion\n")
    wrapped = tmp_path / "timm.pth.tar"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, wrapped)
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    x = torch.randn(2, 3, 224, 224)
    for src, fmt in ((wrapped, "timm"), (st, "safetensors")):
        out = tmp_path / f"b_{fmt}"
        args = ["model", "import", str(src), "--arch", ARCH, "-o", str(out), "--classes", str(names),
                "--normal-class", "clean", "--model-arg", "depth=2"]
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
        b = ModelBundle.load(out)
        assert b.class_names == ["clean", "blood", "lesion"] and b.normal_class == "clean"
        assert b.model_args == {"depth": 2} and b.provenance["source_format"] == fmt
        # not a seed checkpoint: normalisation follows the arch's timm config (CLIP mean for EVA-02)
        assert b.preprocess.mean == tuple(timm.get_pretrained_cfg(ARCH).mean)
        with torch.no_grad():
            assert torch.equal(b.create_model()(x), model(x))


def test_shape_mismatch_names_the_keys(seed_ckpt, tmp_path):
    path, _ = seed_ckpt
    with pytest.raises(BundleError) as e:
        import_checkpoint(path, tmp_path / "b", arch="eva02_small_patch14_224")
    msg = str(e.value)
    assert "do not fit eva02_small_patch14_224" in msg and "cls_token" in msg and str(path) in msg
    assert not (tmp_path / "b").exists()


def test_class_count_mismatch_is_refused(seed_ckpt, tmp_path):
    path, _ = seed_ckpt
    with pytest.raises(BundleError, match="10 outputs but 3 class names"):
        import_checkpoint(path, tmp_path / "b", arch=ARCH, class_names=["a", "b", "c"])


def test_unknown_arch_suggests_close_names(seed_ckpt, tmp_path):
    path, _ = seed_ckpt
    with pytest.raises(BundleError, match="unknown timm architecture 'eva02_tiny_patch14_244'.*eva02_tiny_patch14_224"):
        import_checkpoint(path, tmp_path / "b", arch="eva02_tiny_patch14_244")


@pytest.mark.parametrize("content", [b"hello, I am not a checkpoint\n", b"PK\x03\x04garbage-zip", b"\x80\x02garbage"])
def test_not_a_checkpoint(tmp_path, content):
    p = tmp_path / "model.ckpt"
    p.write_bytes(content)
    with pytest.raises(BundleError, match=r"model.ckpt: (not a PyTorch checkpoint|refused)"):
        read_checkpoint(p)


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_pickle_that_would_execute_code_is_refused(tmp_path, container):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.ckpt"
    if container == "torch-zip":
        torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": Evil(marker)}, p)
    else:  # a plain pickle (torch's legacy format starts with one)
        p.write_bytes(pickle.dumps({"epoch": 1, "hyper_parameters": Evil(marker)}, protocol=2))
    res = CliRunner().invoke(cli, ["model", "import", str(p), "--arch", ARCH, "-o", str(tmp_path / "b")])
    assert res.exit_code == 1
    assert "refused" in res.output and "system" in res.output and "Traceback" not in res.output
    assert not marker.exists(), "the pickled code ran"


@pytest.fixture(scope="module")
def imported_bundle(seed_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "bundle"
    import_checkpoint(seed_ckpt[0], out, arch=ARCH)
    return out


def _write_bundle(imported_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the imported bundle that a test may damage."""
    return Path(shutil.copytree(imported_bundle, tmp_path / "bundle"))


def _edit_meta(bundle: Path, **changes) -> None:
    meta = json.loads((bundle / "model.json").read_text())
    meta.update(changes)
    (bundle / "model.json").write_text(json.dumps(meta))


def test_bundle_that_lies_about_arch_or_classes_is_refused(imported_bundle, tmp_path):
    out = _write_bundle(imported_bundle, tmp_path)
    _edit_meta(out, arch="eva02_small_patch14_224")
    with pytest.raises(BundleError, match="do not fit eva02_small_patch14_224"):
        ModelBundle.load(out).create_model()
    _edit_meta(out, arch=ARCH, class_names=["a", "b", "c"], normal_class=None)
    with pytest.raises(BundleError, match="lists 3 classes but the weights have 10 outputs"):
        ModelBundle.load(out).create_model()


def test_changed_weights_are_refused(imported_bundle, tmp_path):
    out = _write_bundle(imported_bundle, tmp_path)
    with open(out / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x01" * 8)
    with pytest.raises(BundleError, match="does not match model.json"):
        ModelBundle.load(out).create_model()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "other/9"}, "unsupported format"),
        ({"class_names": ["A", "A"]}, "duplicate class names"),
        ({"class_names": []}, "non-empty list"),
        ({"normal_class": "Nope"}, "normal_class 'Nope' is not one of"),
        ({"thresholds": {"Bleeding": 1.5}}, r"must be a number in \[0, 1\]"),
        ({"thresholds": {"Unknown": 0.5}}, "unknown class"),
        ({"preprocess": {"mean": [0.5, 0.5]}}, "mean: must be 3 finite numbers"),
        ({"preprocess": {"std": [0, 1, 1]}}, "std: must be 3 finite numbers > 0"),
        ({"preprocess": {"input_size": "224"}}, "input_size: must be an integer"),
        ({"preprocess": {"resize": 100}}, "smaller than input_size"),
        ({"weights_sha256": "abc"}, "sha256 hex digest"),
    ],
)
def test_invalid_model_json_is_refused_with_reason(imported_bundle, tmp_path, change, message):
    out = _write_bundle(imported_bundle, tmp_path)
    _edit_meta(out, **change)
    with pytest.raises(BundleError, match=message):
        ModelBundle.load(out)


def test_model_info_cli(imported_bundle, tmp_path):
    out = _write_bundle(imported_bundle, tmp_path)
    runner = CliRunner()
    res = runner.invoke(cli, ["model", "info", str(out)])
    assert res.exit_code == 0, res.output
    assert ARCH in res.output and "Angioectasia, Bleeding" in res.output and "argmax != normal" in res.output
    res = runner.invoke(cli, ["model", "info", str(out), "--json", "--verify"])
    info = json.loads(res.output)
    assert info["verified"] and info["parameters"] > 5_000_000 and info["class_names"][6] == "Normal"
    res = runner.invoke(cli, ["model", "info", str(tmp_path / "missing")])
    assert res.exit_code == 1 and "missing: no such bundle folder" in res.output
