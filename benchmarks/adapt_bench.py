"""Does `python -m train adapt` help under a domain shift? Source-only fine-tuning vs adapt + the same fine-tuning.

    python benchmarks/adapt_bench.py --seeds 0,1,2,3 --work runs/adapt-bench --out benchmarks/results/adapt_cpu.jsonl

The set-up a hospital is in, on synthetic recordings (`capsule_batch.sources.synthesize`, a tiny EVA-02, CPU):
- a labelled **source** domain (the default look): training recordings and a validation recording;
- a **target** domain, the same kind of scenes seen by another camera (`--target-style`: dimmer lighting, a
  colour cast, a magnified texture, stronger vignetting): unlabelled H.264 recordings for `adapt`, and
  labelled target recordings used only for the final test;
- a starting bundle trained on the source (the model the hospital has; one for all seeds), then per seed two
  arms that get the same supervised fine-tuning on the source (best epoch by source validation, as nobody has
  target labels):
  **source-only** fine-tunes the starting bundle; **adapt** first runs `train adapt` on the unlabelled target
  recordings (teacher: the starting bundle), then fine-tunes that;
- every model is scored on the labelled target test set (and the source validation set) with `train evaluate`.
One JSON line per seed and arm, then a summary line (mean, sample standard deviation and the paired
per-seed difference of target balanced accuracy). Everything runs through the real `python -m train` code
paths; logs go to stderr.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP waiters slow a shared CPU down many times

_logger = logging.getLogger("adapt_bench")
CLASSES = ["Normal", "Bleeding", "Lymphangiectasia", "Ulcer"]
TARGET_STYLE = {"lighting": 0.7, "color_cast": [0.85, 1.05, 1.2], "texture_scale": 2.0, "vignette": 1.8}
MODEL = ["model.arch=eva02_tiny_patch14_224", "model.model_args={depth: 3, img_size: 64, patch_size: 8}",
         "data.input_size=64", "data.resize=64", f"data.classes={json.dumps(CLASSES)}", "run.log_every=100000",
         "run.workers=0", "data.leakage_check=false"]
SUPERVISED = ["train.batch_size=32", "train.eval_batch_size=128", "augment.grid_distortion_p=0",
              "augment.crop_scale=[0.8, 1.0]", "train.balanced_sampling=false"]


def _spec(res: Any) -> str:
    return (f"{{kind: recording, frames: '{res.path}', frame_pattern: 'frame_{{frame}}.jpg', "
            f"labels: '{res.labels_csv}'}}")


def make_data(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Source train/val and target test frame folders with labels; unlabelled target H.264 recordings."""
    from capsule_batch.sources.synthesize import Style, synthesize

    target = Style(**{**TARGET_STYLE, **json.loads(args.target_style)})
    root.mkdir(parents=True, exist_ok=True)
    finding = tuple(c for c in CLASSES if c != "Normal")

    def synth(name: str, seed: int, style: Style, codec: str) -> Any:
        return synthesize(root / name, args.frames, codec=codec, size=args.size, seed=seed, style=style,
                          findings_per_1000=120.0, classes=finding, overwrite=True)

    src_train = [synth(f"source_train{k}", 1000 + k, Style(), "jpg") for k in range(args.recordings)]
    src_val = synth("source_val", 2000, Style(), "jpg")
    tgt_unlabelled = [synth(f"target_unlabelled{k}.mp4", 3000 + k, target, "h264") for k in range(args.recordings)]
    tgt_test = [synth(f"target_test{k}", 4000 + k, target, "jpg") for k in range(2)]
    return {"train": "[" + ", ".join(_spec(r) for r in src_train) + "]", "source_val": f"[{_spec(src_val)}]",
            "target_test": "[" + ", ".join(_spec(r) for r in tgt_test) + "]",
            "unlabelled": [str(r.path) for r in tgt_unlabelled], "target_style": target.to_dict()}


def supervised(run: Path, data: dict[str, Any], seed: int, epochs: int, lr: float, init: Path | None) -> dict[str, Any]:
    from train.config import load_config
    from train.trainer import run_training

    shutil.rmtree(run, ignore_errors=True)
    over = [*MODEL, *SUPERVISED, f"run.dir={run}", f"run.seed={seed}", f"train.epochs={epochs}", f"train.lr={lr}",
            f"data.train={data['train']}", f"data.val={data['source_val']}"]
    if init is not None:
        over.append(f"model.init={init}")
    return run_training(load_config(None, over), "finetune" if init else "pretrain")


def adapt(run: Path, data: dict[str, Any], seed: int, init: Path, args: argparse.Namespace) -> dict[str, Any]:
    from train.adapt import run_adapt
    from train.config import load_config

    shutil.rmtree(run, ignore_errors=True)
    cfg = load_config(Path(__file__).resolve().parent.parent / "train/configs/adapt.yaml", [
        *MODEL, f"model.init={init}", f"run.dir={run}", f"run.seed={seed}", f"train.epochs={args.adapt_epochs}",
        f"adapt.recordings={json.dumps(data['unlabelled'])}", f"adapt.frames_per_epoch={args.adapt_frames}",
        "train.batch_size=32", f"train.lr={args.adapt_lr}", "adapt.warmup_steps=20", "adapt.clip=8",
        "adapt.shuffle_frames=128"])
    return run_adapt(cfg)


def score(bundle: Path, sets: str, out: Path) -> dict[str, Any]:
    from train.commands import evaluate
    from train.config import load_config

    m = evaluate(load_config(None, [*MODEL, f"evaluate.bundle={bundle}", f"evaluate.out={out}", f"data.val={sets}"]))
    return {k: m[k] for k in ("balanced_accuracy", "mean_auc", "f1", "count")}


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3", help="comma list: both arms per seed")
    ap.add_argument("--work", type=Path, default=Path("runs/adapt-bench"), help="data and runs (overwritten)")
    ap.add_argument("--frames", type=int, default=400, help="frames per recording")
    ap.add_argument("--recordings", type=int, default=3, help="source training / unlabelled target recordings")
    ap.add_argument("--size", type=int, default=128, help="frame size of the synthetic recordings")
    ap.add_argument("--target-style", default="{}", help="JSON overriding the target style " + json.dumps(TARGET_STYLE))
    ap.add_argument("--start", type=Path, default=None,
                    help="use this bundle as the starting bundle (default: train one on the source, --start-seed)")
    ap.add_argument("--start-seed", type=int, default=0)
    ap.add_argument("--start-epochs", type=int, default=10, help="supervised source epochs of the starting bundle")
    ap.add_argument("--start-lr", type=float, default=2e-3)
    ap.add_argument("--finetune-epochs", type=int, default=3, help="the fine-tuning both arms get")
    ap.add_argument("--finetune-lr", type=float, default=5e-4)
    ap.add_argument("--adapt-epochs", type=int, default=3)
    ap.add_argument("--adapt-frames", type=int, default=1024, help="adapt.frames_per_epoch")
    ap.add_argument("--adapt-lr", type=float, default=3e-4)
    ap.add_argument("--note", default="", help="free text kept in the summary (e.g. how loaded the machine was)")
    ap.add_argument("--out", type=Path, default=None, help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    import timm
    import torch

    t_start = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(work / "data", args)
    lines: list[dict[str, Any]] = []

    def emit(line: dict[str, Any]) -> None:
        text = json.dumps(line)
        print(text, flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a", encoding="utf-8") as fh:
                fh.write(text + "\n")

    t0 = time.perf_counter()
    start = args.start or Path(supervised(work / "start", data, args.start_seed, args.start_epochs, args.start_lr,
                                          None)["bundle"])
    t_start_bundle = time.perf_counter() - t0
    start_line = {"bench": "adapt", "seed": args.start_seed, "arm": "start", "bundle": str(start),
                  "target_test": score(start, data["target_test"], work / "eval-start-target"),
                  "source_val": score(start, data["source_val"], work / "eval-start-source"),
                  "seconds": {"train": round(t_start_bundle, 1)}}
    lines.append(start_line)
    emit(start_line)
    for seed in (int(s) for s in args.seeds.split(",")):
        runs = work / f"seed{seed}"
        t0 = time.perf_counter()
        source_only = Path(supervised(runs / "source_only", data, seed, args.finetune_epochs, args.finetune_lr,
                                      start)["bundle"])
        t_ft = time.perf_counter() - t0
        t0 = time.perf_counter()
        ad = adapt(runs / "adapt", data, seed, start, args)
        t_adapt = time.perf_counter() - t0
        adapted = Path(supervised(runs / "adapt_ft", data, seed, args.finetune_epochs, args.finetune_lr,
                                  Path(ad["run_dir"]))["bundle"])
        for arm, bundle in (("source_only", source_only), ("adapt", adapted)):
            line = {"bench": "adapt", "seed": seed, "arm": arm, "bundle": str(bundle),
                    "target_test": score(bundle, data["target_test"], runs / f"eval-{arm}-target"),
                    "source_val": score(bundle, data["source_val"], runs / f"eval-{arm}-source"),
                    "seconds": {"finetune": round(t_ft, 1)}}
            if arm == "adapt":
                history = [json.loads(x) for x in (Path(ad["run_dir"]) / "history.jsonl").read_text().splitlines()]
                line["adapt"] = {"loss_per_epoch": [round(h["loss"], 4) for h in history],
                                 "frames_trained": ad["frames_trained"], "frames_per_s": [h["frames_per_s"]
                                                                                          for h in history]}
                line["seconds"]["adapt"] = round(t_adapt, 1)
            lines.append(line)
            emit(line)

    def arm_values(arm: str, key: str = "target_test") -> list[float]:
        return [x[key]["balanced_accuracy"] for x in lines if x["arm"] == arm]

    diffs = [a - b for a, b in zip(arm_values("adapt"), arm_values("source_only"), strict=True)]
    summary = {
        "bench": "adapt_summary", "seeds": args.seeds, "metric": "balanced_accuracy",
        "target_test": {arm: _stats(arm_values(arm)) for arm in ("start", "source_only", "adapt")},
        "source_val": {arm: _stats(arm_values(arm, "source_val")) for arm in ("start", "source_only", "adapt")},
        "start_bundle": str(start),
        "adapt_minus_source_only": {**_stats(diffs), "per_seed": [round(d, 4) for d in diffs],
                                    "seeds_better": sum(d > 0 for d in diffs)},
        "config": {"classes": CLASSES, "frames_per_recording": args.frames, "recordings": args.recordings,
                   "frame_size": args.size, "target_style": data["target_style"], "model": MODEL,
                   "supervised": SUPERVISED, "start_epochs": args.start_epochs, "start_lr": args.start_lr,
                   "start_seed": args.start_seed, "finetune_epochs": args.finetune_epochs,
                   "finetune_lr": args.finetune_lr, "adapt_epochs": args.adapt_epochs,
                   "adapt_frames_per_epoch": args.adapt_frames, "adapt_lr": args.adapt_lr,
                   "target_test_frames": lines[0]["target_test"]["count"] if lines else 0},
        "seconds": round(time.perf_counter() - t_start, 1),
        "cpu_seconds": round(time.process_time(), 1),  # all threads of this process: wall / cpu shows the sharing
        "versions": {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()},
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/adapt_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "note": args.note,
    }
    emit(summary)
    t = summary["target_test"]
    d = summary["adapt_minus_source_only"]
    print(f"target balanced accuracy over seeds {args.seeds}: start {t['start']['mean']:.3f}, "
          f"source-only fine-tune {t['source_only']['mean']:.3f} ± {t['source_only']['std']:.3f}, "
          f"adapt + fine-tune {t['adapt']['mean']:.3f} ± {t['adapt']['std']:.3f} "
          f"(paired difference {d['mean']:+.3f} ± {d['std']:.3f})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
