"""The demo: train a tiny model on synthetic recordings, triage a synthetic study, check it against the truth.

`python -m train.demo -o demo` (what `make demo` runs). Everything is generated here, nothing is downloaded:
1. training and validation recordings from `capsule_batch.synth` (JPEG frame folders + per-frame labels);
2. a tiny EVA-02 fine-tuned on them by the training module (the same code path as the real recipe);
3. a separate synthetic study (H.264, unseen seed) run as `capsule-batch run` runs it (`capsule_batch.runner`)
   -> `<out>/study.h5`;
4. the HTML report, and the study's events compared with the injected findings (`capsule_batch.groundtruth`).
It lives in train/ because capsule_batch never imports the training module.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from capsule_batch.errors import CapsuleError

# OpenMP threads that spin while they wait make torch on a shared 2-core machine up to 10x slower (measured
# here: 3.6 s vs 0.36 s per training step); sleeping waiters cost nothing measurable on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_logger = logging.getLogger("demo")

#: a tiny EVA-02 that learns the synthetic findings in about a minute on 2 CPU cores
MODEL = ["model.arch=eva02_tiny_patch14_224", "model.model_args={depth: 3, img_size: 64, patch_size: 8}",
         "data.input_size=64", "data.resize=64", "train.lr=1.0e-3", "train.batch_size=32", "train.eval_batch_size=128",
         "augment.grid_distortion_p=0", "augment.crop_scale=[0.8, 1.0]", "run.log_every=100000",
         "train.balanced_sampling=false", "model.init=random",
         # the preprocessing the demo's figures were measured with (not the seed's whole-frame bicubic)
         "data.resize_mode=shorter", "data.interpolation=bilinear", "data.antialias=true"]


def _synth(path: Path, frames: int, size: int, seed: int, per_1000: float, codec: str) -> Any:
    from capsule_batch.synth import synthesize

    return synthesize(path, frames, codec=codec, size=size, seed=seed, findings_per_1000=per_1000, overwrite=True)


def _recording_spec(res: Any) -> str:
    return (f"{{kind: recording, frames: '{res.path}', frame_pattern: 'frame_{{frame}}.jpg', "
            f"labels: '{res.labels_csv}'}}")


def train_model(out: Path, train_frames: int, recordings: int, epochs: int, size: int, workers: int) -> Path:
    """Synthetic training data and a fine-tuned tiny bundle; returns the bundle folder."""
    from train.config import load_config
    from train.trainer import run_training

    data = out / "train-data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    # many short findings per recording: every class is seen in several recordings
    train = [_synth(data / f"train{k}", train_frames, size, 1000 + k, 120.0, "jpg") for k in range(recordings)]
    val = _synth(data / "val", train_frames, size, 2000, 120.0, "jpg")
    _logger.info("training data: %d recordings of %d frames, one validation recording", recordings, train_frames)
    run_dir = out / "model"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [*MODEL, f"run.dir={run_dir}", f"train.epochs={epochs}", f"run.workers={workers}",
                 "data.train=[" + ", ".join(_recording_spec(r) for r in train) + "]",
                 f"data.val=[{_recording_spec(val)}]"]
    cfg = load_config(None, overrides)
    summary = run_training(cfg, "finetune")  # logs every epoch
    return Path(summary["bundle"])


def triage_study(bundle_dir: Path, out: Path, frames: int, size: int, seed: int, batch_size: int) -> dict[str, Any]:
    """Synthesize the study recording, run it, write the report and compare with the injected findings."""
    from capsule_batch.groundtruth import compare
    from capsule_batch.pipeline import RunOptions
    from capsule_batch.review.report import write_report
    from capsule_batch.runner import run_recordings
    from capsule_batch.store import StudyReader

    rec = _synth(out / "study.mp4", frames, size, seed, 15.0, "h264")
    _logger.info("study recording: %s (%d frames, %d injected findings)", rec.path, frames, len(rec.findings))
    opts = RunOptions(batch_size=batch_size, overwrite=True, resume=False, progress=True, argv=sys.argv[:])
    result = run_recordings([rec.path], bundle_dir, out, options=opts).results[0]
    if result.status != "done":
        raise CapsuleError(f"{rec.path}: run {result.status}: {result.error}")
    with StudyReader(result.output) as rd:
        desc = rd.attrs["engine"]
    report = write_report(result.output, out / "study.html")
    cmp = compare(result.output, rec.findings_csv)
    return {"frames": result.frames, "fps": result.fps, "flagged_frames": cmp.flagged_frames,
            "flag_rate": cmp.flag_rate, "events": cmp.events, "false_events": cmp.false_events,
            "findings": cmp.findings, "caught": cmp.caught, "caught_class": cmp.caught_class,
            "study": result.output, "report": str(report), "recording": str(rec.path),
            "findings_csv": str(rec.findings_csv), "bundle": str(bundle_dir),
            "engine": f"{desc.get('backend')} on {desc.get('device')}"}


def run_demo(out: str | Path, frames: int = 3000, train_frames: int = 400, recordings: int = 3, epochs: int = 16,
             size: int = 128, seed: int = 7, batch_size: int = 64, workers: int = 0) -> dict[str, Any]:
    """The whole demo; returns the summary (also `<out>/summary.json`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bundle = train_model(out, train_frames, recordings, epochs, size, workers)
    t1 = time.perf_counter()
    summary = triage_study(bundle, out, frames, size, seed, batch_size)
    summary.update(train_seconds=t1 - t0, run_seconds=time.perf_counter() - t1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def format_summary(s: dict[str, Any]) -> str:
    return "\n".join([
        f"frames            {s['frames']} at {s['fps']:.1f} frames/s ({s['engine']})",
        f"flagged frames    {s['flagged_frames']} ({100 * s['flag_rate']:.1f}%)",
        f"events            {s['events']} ({s['false_events']} on no injected finding)",
        f"findings caught   {s['caught']} of {s['findings']} ({s['caught_class']} with the right class)",
        f"study file        {s['study']}",
        f"HTML report       {s['report']}",
        f"ground truth      {s['findings_csv']}",
        f"model bundle      {s['bundle']}",
        f"time              {s['train_seconds']:.0f} s training, {s['run_seconds']:.0f} s synth + run + report",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.split("\n")[0])
    p.add_argument("-o", "--out", default="demo", help="output folder (default: demo)")
    p.add_argument("--frames", type=int, default=3000, help="frames in the study recording")
    p.add_argument("--train-frames", type=int, default=400, help="frames per training recording")
    p.add_argument("--recordings", type=int, default=3, help="training recordings")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--size", type=int, default=128, help="frame size of the synthetic recordings")
    p.add_argument("--seed", type=int, default=7, help="seed of the study recording")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        s = run_demo(args.out, args.frames, args.train_frames, args.recordings, args.epochs, args.size, args.seed)
    except CapsuleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
