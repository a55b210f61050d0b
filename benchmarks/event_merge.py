"""Events per finding with and without merging across classes, on studies with known findings.

For each study (a `.h5` with its `.findings.csv`), the events are computed twice from the stored probabilities with
the study's own triage settings: one event per class (`merge_classes=False`, how studies were made before) and one
event per stop (the default). Prints one JSON line per study and setting — events, events per finding, findings
caught, caught with their class, false alerts — and a total line per setting:

    python benchmarks/event_merge.py demo/study.h5 [more.h5 ...]
    python benchmarks/event_merge.py --bundle demo/model/bundle --synth 3 --frames 3000   # + new synthetic studies
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any


def measure(study: Path, findings: Path) -> list[dict[str, Any]]:
    import numpy as np

    from capsule_batch.evaluation.groundtruth import read_findings
    from capsule_batch.study.store import StudyReader
    from capsule_batch.study.triage import compute_event_table, event_classes

    with StudyReader(study) as rd:
        cfg, names = rd.triage, rd.class_names
        blocks = [(rd.index(lo, hi), rd.probs(lo, hi)) for lo, hi in rd.blocks()]
    truth = read_findings(findings)
    out = []
    for merge in (False, True):
        table, _ = compute_event_table(iter(blocks), dataclasses.replace(cfg, merge_classes=merge))
        masks = event_classes(table)
        caught = with_class = 0
        hit_any = np.zeros(len(table), bool)
        for f in truth:
            over = np.flatnonzero((table["start"] <= f.end) & (table["end"] >= f.start))
            hit_any[over] = True
            caught += bool(len(over))
            with_class += any(masks[k] >> names.index(f.cls) & 1 for k in over) if f.cls in names else 0
        out.append({"study": str(study), "merge_classes": merge, "findings": len(truth), "events": len(table),
                    "events_per_finding": round(len(table) / len(truth), 3) if truth else None,
                    "caught": caught, "caught_with_class": int(with_class), "false_alerts": int((~hit_any).sum())})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("studies", nargs="*", type=Path)
    ap.add_argument("--bundle", type=Path, help="with --synth: the model to run the new synthetic studies with")
    ap.add_argument("--synth", type=int, default=0, help="synthetic studies to make and run (seeds 101, 102, ...)")
    ap.add_argument("--frames", type=int, default=3000)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args(argv)
    pairs = [(s, s.with_name(s.stem + ".findings.csv")) for s in args.studies]
    if args.synth:
        from capsule_batch.run.pipeline import RunOptions
        from capsule_batch.run.runner import EngineSpec, run_recordings
        from capsule_batch.sources.synthesize import synthesize

        work = Path(tempfile.mkdtemp(prefix="event-merge-"))
        recs = [synthesize(work / f"s{101 + k}.mp4", args.frames, size=args.size, seed=101 + k,
                           findings_per_1000=15.0) for k in range(args.synth)]
        res = run_recordings([r.path for r in recs], args.bundle, work / "out",
                             engine=EngineSpec("torch", "cpu", "fp32"), options=RunOptions(progress=False))
        pairs += [(Path(r.output), rec.findings_csv) for r, rec in zip(res.results, recs, strict=True)]
    totals: dict[bool, dict[str, int]] = {}
    for study, findings in pairs:
        for row in measure(study, findings):
            print(json.dumps(row), flush=True)
            t = totals.setdefault(row["merge_classes"], {"findings": 0, "events": 0, "caught": 0,
                                                         "caught_with_class": 0, "false_alerts": 0})
            for k in t:
                t[k] += row[k]
    for merge, t in totals.items():
        print(json.dumps({"total": True, "merge_classes": merge, **t,
                          "events_per_finding": round(t["events"] / t["findings"], 3) if t["findings"] else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
