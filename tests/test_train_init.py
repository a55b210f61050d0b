"""Stage 1's initial weights: a Hugging Face hub snapshot folder of timm weights (config.json + model.safetensors or
pytorch_model.bin, written here by timm's own `save_for_hf` from random weights) or a timm checkpoint file is
loaded through timm's EVA checkpoint filter, then strictly; random weights only when asked for."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import timm
import torch
from timm.models._hub import save_for_hf

from train.config import load_config
from train.trainer import TrainError, build_model, run_training

ARCH = "eva02_tiny_patch14_224"
#: the model trained here: smaller input and patches than the snapshot (224 px, patch 14), same depth
SMALL = ["model.arch=eva02_tiny_patch14_224", "model.model_args={depth: 2, img_size: 64, patch_size: 8}"]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """The layout of `timm/eva02_*_patch14_224.mim_in22k`: the timm model with num_classes=0 (its pretrained_cfg
    says 0 classes and timm loads the file strictly after its filter), as timm's push_to_hub writes it."""
    torch.manual_seed(5)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, depth=2)
    d = tmp_path_factory.mktemp("hub") / "eva02_tiny_patch14_224.mim_in22k"
    save_for_hf(model, str(d), safe_serialization="both")
    return d, model.state_dict()


def test_hub_snapshot_initialises_through_timms_filter(snapshot) -> None:
    folder, sd = snapshot
    assert json.loads((folder / "config.json").read_text())["architecture"] == ARCH
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "pytorch_model.bin"}
    model, info = build_model(load_config(None, [*SMALL, f"model.init={folder}"]), ["a", "b", "c"])
    assert info == {"init": str(folder), "head_reused": False}
    got = model.state_dict()
    assert torch.equal(got["blocks.1.mlp.fc2.weight"], sd["blocks.1.mlp.fc2.weight"])
    assert torch.equal(got["fc_norm.weight"], sd["fc_norm.weight"])
    # resampled by the filter to the model's patch size and grid (14 -> 8 px, 16x16 -> 8x8 patches)
    assert sd["patch_embed.proj.weight"].shape[-1] == 14 and got["patch_embed.proj.weight"].shape[-1] == 8
    assert got["pos_embed"].shape[1] == 1 + 8 * 8 and sd["pos_embed"].shape[1] == 1 + 16 * 16
    # the head is new, a default nn.Linear as the seed's (kaiming-uniform: |w| <= 1/sqrt(fan_in))
    assert got["head.weight"].shape == (3, 192) and got["head.weight"].abs().max() <= 192 ** -0.5
    assert got["head.weight"].std() > 0.02


def test_mim_keys_go_through_the_filter_and_a_timm_file_too(snapshot, tmp_path: Path) -> None:
    """The original EVA MIM layout (mask_token, lm_head, norm instead of fc_norm) as a pytorch_model.bin snapshot,
    and the same tensors as a plain timm checkpoint file: the filter drops the MIM-only keys, moves norm to
    fc_norm, and the load is strict."""
    _, sd = snapshot
    mim = {k: v for k, v in sd.items() if not k.startswith("fc_norm.")}
    mim |= {"norm.weight": sd["fc_norm.weight"] * 2, "norm.bias": sd["fc_norm.bias"],
            "mask_token": torch.zeros(1, 1, 192), "lm_head.weight": torch.zeros(8, 192), "lm_head.bias": torch.zeros(8)}
    folder = tmp_path / "snap"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": ARCH, "num_classes": 0}))
    torch.save(mim, folder / "pytorch_model.bin")
    file = tmp_path / "eva02_tiny.pth"
    torch.save({"model": mim}, file)
    for init in (folder, file):
        model, _ = build_model(load_config(None, [*SMALL, f"model.init={init}"]), ["a", "b"])
        assert torch.equal(model.state_dict()["fc_norm.weight"], sd["fc_norm.weight"] * 2)


def test_the_load_is_strict_and_checks_the_architecture(snapshot, tmp_path: Path) -> None:
    _, sd = snapshot
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"architecture": ARCH}))
    torch.save({k: v for k, v in sd.items() if not k.startswith("blocks.1.attn.")}, broken / "pytorch_model.bin")
    with pytest.raises(Exception, match=r"weights do not fit eva02_tiny_patch14_224: .*missing \(blocks\.1\.attn"):
        build_model(load_config(None, [*SMALL, f"model.init={broken}"]), ["a", "b"])
    (broken / "config.json").write_text(json.dumps({"architecture": "eva02_small_patch14_224"}))
    with pytest.raises(TrainError, match="holds weights for eva02_small_patch14_224, but model.arch is eva02_tiny"):
        build_model(load_config(None, [*SMALL, f"model.init={broken}"]), ["a", "b"])


def test_random_weights_only_on_request(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(TrainError, match=r"model.init is not set: .*snapshot folder of timm/eva02_tiny_patch14_224"
                                         r"\.mim_in22k.*model.init=random"):
        build_model(load_config(None, SMALL), ["a", "b"])
    run_dir = tmp_path / "run"
    with pytest.raises(TrainError, match="model.init is not set"):  # refused before anything is written
        run_training(load_config(None, [*SMALL, f"run.dir={run_dir}"]), "pretrain")
    assert not run_dir.exists()
    with pytest.raises(TrainError, match="no such file or folder"):
        build_model(load_config(None, [*SMALL, f"model.init={tmp_path / 'nope'}"]), ["a", "b"])
    with caplog.at_level(logging.WARNING):
        _, info = build_model(load_config(None, [*SMALL, "model.init=random"]), ["a", "b"])
    assert info == {"init": "random"} and "training starts from random weights" in caplog.text


def test_the_shipped_stage1_config_names_the_mim_weights() -> None:
    cfg = load_config(Path(__file__).parent.parent / "train" / "configs" / "ee24_pretrain.yaml")
    assert cfg["model"]["init"].endswith("eva02_base_patch14_224.mim_in22k") and not cfg["model"]["pretrained"]
