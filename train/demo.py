"""The demo: train a tiny model on synthetic recordings, triage a synthetic study, check it against the truth.

`python -m train.demo -o demo` (what `make demo` runs). Everything is generated here, nothing is downloaded:
1. training and validation recordings from `capsule_batch.sources.synthesize` (JPEG frame folders + per-frame labels):
   many short recordings, each with its own mucosa texture, so that the model learns the findings, not the textures;
2. a tiny EVA-02 fine-tuned on them by the training module (the same code path as the real recipe), in fp32 with
   deterministic algorithms and a fixed thread count, so that a CPU's other float kernels move little;
3. its thresholds calibrated (`python -m train calibrate`) on a separate recording made like the study (another
   seed, the same sparse findings) for a reading budget: at most `--budget` of the frames flagged (default 5 %),
   the highest per-class sensitivity that fits (`--budget 0`: no calibration, argmax triage);
4. a separate synthetic study (H.264, unseen seed; by default 20,000 frames, 83 minutes at 4 frames/s, with one
   finding per 1,000 frames, as sparse as findings are in a real recording) run as `capsule-batch run` runs it
   (`capsule_batch.run.runner`; torch fp32, the precision the thresholds were calibrated at) -> `<out>/study.h5`;
5. the HTML report, and the study's events compared with the injected findings (`capsule_batch.evaluation.groundtruth`):
   the summary in a reader's terms (minutes to read against the whole recording, findings caught, false alerts per
   hour) and the commands to try next.
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
    from capsule_batch.sources.synthesize import synthesize

    return synthesize(path, frames, codec=codec, size=size, seed=seed, findings_per_1000=per_1000, overwrite=True)


def _recording_spec(res: Any) -> str:
    return (f"{{kind: recording, frames: '{res.path}', frame_pattern: 'frame_{{frame}}.jpg', "
            f"labels: '{res.labels_csv}'}}")


#: the study: 83 minutes at 4 frames/s, one finding per 1,000 frames (a real recording's findings are sparser still)
STUDY_FRAMES = 20000
STUDY_FINDINGS_PER_1000 = 1.0

#: epochs of training (16 left the tiny model calling ~1 % of an unseen texture's normal frames a finding; 24: none)
EPOCHS = 24

#: frames of the validation recording the best epoch is chosen on
VAL_FRAMES = 400

#: threads the demo trains with on every machine (the count changes how float sums are split, and so the result)
THREADS = 2


def train_model(out: Path, train_frames: int, recordings: int, epochs: int, size: int, workers: int) -> Path:
    """Synthetic training data and a fine-tuned tiny bundle; returns the bundle folder."""
    import torch

    from train.config import load_config
    from train.trainer import run_training

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True, warn_only=True)
    data = out / "train-data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    # many short recordings, each with many short findings: every class is seen on several textures, and the normal
    # frames of a dozen textures teach the model that a texture is not a finding (3 recordings of 400 frames each
    # made it call 42 % of an unseen texture's normal frames Polyp; 12 of 100: under 1 %)
    train = [_synth(data / f"train{k}", train_frames, size, 1000 + k, 120.0, "jpg") for k in range(recordings)]
    val = _synth(data / "val", VAL_FRAMES, size, 2000, 120.0, "jpg")
    _logger.info("training data: %d recordings of %d frames, one validation recording", recordings, train_frames)
    run_dir = out / "model"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [*MODEL, f"run.dir={run_dir}", f"train.epochs={epochs}", f"run.workers={workers}", "run.precision=fp32",
                 "data.train=[" + ", ".join(_recording_spec(r) for r in train) + "]",
                 f"data.val=[{_recording_spec(val)}]"]
    cfg = load_config(None, overrides)
    summary = run_training(cfg, "finetune")  # logs every epoch
    return Path(summary["bundle"])


def calibrate_budget(bundle_dir: Path, out: Path, frames: int, size: int, seed: int, budget: float,
                     per_1000: float) -> dict[str, Any]:
    """Thresholds for a reading budget, from a recording like the study (its density of findings, another seed):
    at most `budget` of the frames flagged, the highest common per-class sensitivity that fits."""
    from train.commands import calibrate
    from train.config import load_config

    val = _synth(out / "train-data" / "calibration", frames, size, seed, per_1000, "jpg")
    cfg = load_config(None, [*MODEL, f"calibrate.bundle={bundle_dir}", f"data.val=[{_recording_spec(val)}]",
                             f"calibrate.budget_flag_rate={budget}", "calibrate.target_sensitivity=0.99",
                             "run.precision=fp32", f"run.dir={out / 'model'}"])
    report = calibrate(cfg)
    _logger.info("thresholds for a reading budget of %.0f%% of frames: common sensitivity %.2f, %.1f%% flagged on the "
                 "calibration recording", 100 * budget, report["common_target_sensitivity"],
                 100 * report["overall_flag_rate"])
    return report


def triage_study(bundle_dir: Path, out: Path, frames: int, size: int, seed: int, batch_size: int,
                 per_1000: float) -> dict[str, Any]:
    """Synthesize the study recording, run it (torch fp32: the precision the thresholds were calibrated at, on any
    device, so that every machine gets the same probabilities up to its float kernels), write the report and
    compare with the injected findings."""
    from capsule_batch.evaluation.groundtruth import compare
    from capsule_batch.review.report import write_report
    from capsule_batch.run.pipeline import RunOptions
    from capsule_batch.run.runner import EngineSpec, run_recordings
    from capsule_batch.study.store import StudyReader

    rec = _synth(out / "study.mp4", frames, size, seed, per_1000, "h264")
    _logger.info("study recording: %s (%d frames, %d injected findings)", rec.path, frames, len(rec.findings))
    opts = RunOptions(batch_size=batch_size, overwrite=True, resume=False, progress=True, argv=sys.argv[:])
    engine = EngineSpec(backend="torch", precision="fp32")
    result = run_recordings([rec.path], bundle_dir, out, engine=engine, options=opts).results[0]
    if result.status != "done":
        raise CapsuleError(f"{rec.path}: run {result.status}: {result.error}")
    with StudyReader(result.output) as rd:
        desc = rd.attrs["engine"]
    report = write_report(result.output, out / "study.html", findings=rec.findings_csv)
    cmp = compare(result.output, rec.findings_csv)
    hours = (cmp.duration_s or 0) / 3600
    return {"frames": result.frames, "fps": result.fps, "flagged_frames": cmp.flagged_frames,
            "flag_rate": cmp.flag_rate, "events": cmp.events, "false_events": cmp.false_events,
            "findings": cmp.findings, "caught": cmp.caught, "caught_class": cmp.caught_class,
            "events_per_finding": cmp.events / cmp.findings if cmp.findings else None,
            "false_alerts_per_hour": cmp.false_events / hours if hours else None,
            "reading_min": cmp.reading.reading_s / 60, "full_reading_min": cmp.reading.full_s / 60,
            "reading_model": cmp.reading.model.describe(), "recording_minutes": hours * 60,
            "study": result.output, "report": str(report), "recording": str(rec.path),
            "findings_csv": str(rec.findings_csv), "bundle": str(bundle_dir),
            "engine": f"{desc.get('backend')} on {desc.get('device')}"}


def run_demo(out: str | Path, frames: int = STUDY_FRAMES, train_frames: int = 100, recordings: int = 12,
             epochs: int = EPOCHS, size: int = 128, seed: int = 7, batch_size: int = 64, workers: int = 0,
             budget: float = 0.05, calibration_frames: int = 10000,
             findings_per_1000: float = STUDY_FINDINGS_PER_1000) -> dict[str, Any]:
    """The whole demo; returns the summary (also `<out>/summary.json`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bundle = train_model(out, train_frames, recordings, epochs, size, workers)
    cal = (calibrate_budget(bundle, out, calibration_frames, size, 3000 + seed, budget, findings_per_1000)
           if budget else None)
    t1 = time.perf_counter()
    summary = triage_study(bundle, out, frames, size, seed, batch_size, findings_per_1000)
    summary["budget"] = budget
    summary["calibration"] = {k: cal[k] for k in ("common_target_sensitivity", "overall_flag_rate")} if cal else None
    summary.update(train_seconds=t1 - t0, run_seconds=time.perf_counter() - t1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def format_summary(s: dict[str, Any]) -> str:
    from capsule_batch.evaluation.reading_time import clock

    ratio = s["full_reading_min"] / s["reading_min"] if s["reading_min"] else float("inf")
    per_hour = f"{s['false_alerts_per_hour']:.1f}" if s["false_alerts_per_hour"] is not None else "-"
    budget = f", thresholds for at most {100 * s['budget']:.0f}% of frames" if s.get("budget") else ", argmax"
    return "\n".join([
        f"study             {s['frames']} frames ({s['recording_minutes']:.0f} min of recording), "
        f"{s['findings']} injected findings",
        f"reading           {clock(s['reading_min'] * 60)} for the flagged events against "
        f"{clock(s['full_reading_min'] * 60)} for every frame ({ratio:.1f}x shorter; {s['reading_model']})",
        f"findings caught   {s['caught']} of {s['findings']} injected ({s['caught_class']} with the right class)",
        f"events            {s['events']} ({s['events_per_finding']:.2f} per finding), {s['false_events']} on no "
        f"finding ({per_hour} false alerts per hour of recording)",
        f"flagged frames    {s['flagged_frames']} of {s['frames']} ({100 * s['flag_rate']:.1f}%{budget})",
        f"engine            {s['fps']:.1f} frames/s ({s['engine']})",
        f"study file        {s['study']}",
        f"HTML report       {s['report']}",
        f"time              {s['train_seconds']:.0f} s training{' + calibration' if s.get('budget') else ''}, "
        f"{s['run_seconds']:.0f} s synth + run + report",
        "",
        "next:",
        f"  capsule-batch compare {s['study']} {s['findings_csv']}    # finding by finding",
        f"  capsule-batch review {s['study']} --video {s['recording']}    # the review app (Ctrl-C to stop)",
        f"  open {s['report']}                                             # the report, in any browser",
        f"  capsule-batch run YOUR_RECORDING.mp4 -m {s['bundle']} -o studies  # (this model knows only synthetic "
        "scenes)",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.split("\n")[0])
    p.add_argument("-o", "--out", default="demo", help="output folder (default: demo)")
    p.add_argument("--frames", type=int, default=STUDY_FRAMES, help="frames in the study recording")
    p.add_argument("--findings-per-1000", type=float, default=STUDY_FINDINGS_PER_1000,
                   help="injected findings per 1,000 frames in the study and the calibration recording")
    p.add_argument("--train-frames", type=int, default=100, help="frames per training recording")
    p.add_argument("--recordings", type=int, default=12, help="training recordings (one texture each)")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--size", type=int, default=128, help="frame size of the synthetic recordings")
    p.add_argument("--seed", type=int, default=7, help="seed of the study recording")
    p.add_argument("--budget", type=float, default=0.05,
                   help="calibrate the thresholds for at most this fraction of frames flagged, on a recording like the "
                        "study (default 0.05; 0: no calibration, argmax triage)")
    p.add_argument("--calibration-frames", type=int, default=10000, help="frames in the calibration recording")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        s = run_demo(args.out, args.frames, args.train_frames, args.recordings, args.epochs, args.size, args.seed,
                     budget=args.budget, calibration_frames=args.calibration_frames,
                     findings_per_1000=args.findings_per_1000)
    except CapsuleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
