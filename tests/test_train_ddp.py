"""A 2-process DDP fine-tune under torchrun on CPU (gloo): sample counts per epoch and a whole-set validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from capsule_batch.model.bundle import ModelBundle
from train.synthetic_ce24 import make_ce24_folder

REPO = Path(__file__).resolve().parent.parent


def test_torchrun_two_processes_on_cpu(tmp_path: Path) -> None:
    counts = make_ce24_folder(tmp_path / "ce24", per_class=4, recordings=2, size=48, xlsx=False)
    root, run_dir = tmp_path / "ce24", tmp_path / "run"
    # 41 validation images: an odd count, so an even split across 2 ranks would need padding or dropping
    extra = next((root / "validation" / "Polyp").rglob("*.jpg"))
    (extra.parent / "extra_copy_1.jpg").write_bytes(extra.read_bytes())
    args = [
        "model.arch=eva02_tiny_patch14_224", "model.model_args={depth: 1, img_size: 32, patch_size: 8}",
        "model.init=random",
        "data.input_size=32", "data.resize=32", "run.workers=0", "run.device=cpu",
        f"data.train=[{{kind: ce24, root: '{root}', split: training}}]",
        f"data.val=[{{kind: ce24, root: '{root}', split: validation}}]", "data.leakage_check=false",
        f"run.dir={run_dir}", "train.epochs=2", "train.batch_size=8", "train.eval_batch_size=8",
        "train.samples_per_epoch=30", "train.lr=1.0e-3",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "train", "finetune", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]
    for h in history:
        assert h["world_size"] == 2
        assert h["train_samples"] == 30  # 15 per rank, summed over ranks
        assert h["val_count"] == counts["validation"] + 1 == 41  # every validation image scored once
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["val_metrics"]["count"] == 41
    ModelBundle.load(summary["bundle"]).create_model()
