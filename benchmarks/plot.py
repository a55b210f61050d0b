"""Plot benchmark JSON lines (from suite.py or `capsule-batch bench --out`) as a bar chart of frames/s.

    python benchmarks/plot.py benchmarks/results/suite_cpu.jsonl -o benchmarks/results/suite_cpu.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def label(line: dict) -> str:
    if line.get("stage") == "seed-baseline":
        return f"{line['model'].split('_patch')[0]} seed-style baseline"
    c = line.get("config", {})
    return (f"{c.get('model', '?').split('_patch')[0]} {line['stage']} {c.get('source', '')} "
            f"{c.get('backend', '')} {c.get('precision', '')} b{c.get('batch_size', '')}")


def plot(lines: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(label(ln), float(ln["frames_per_s"]), ln.get("stage")) for ln in lines if "frames_per_s" in ln]
    colours = {"decode": "#7aa6c2", "engine": "#e0a458", "e2e": "#4c956c", "seed-baseline": "#b0413e"}
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.2))
    y = range(len(rows))
    ax.barh(list(y), [r[1] for r in rows], color=[colours.get(r[2], "#888") for r in rows])
    ax.set_yticks(list(y), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("frames/s (log scale)")
    ax.set_title(title, fontsize=10)
    for i, r in enumerate(rows):
        ax.text(r[1], i, f" {r[1]:,.1f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jsonl", type=Path, nargs="+")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    lines = [json.loads(t) for p in args.jsonl for t in p.read_text().splitlines() if t.strip()]
    if not lines:
        raise SystemExit("no benchmark lines")
    c = next((ln["config"] for ln in lines if "config" in ln), {})
    title = args.title or f"{c.get('device_name', '?')}, {c.get('cpu_count', '?')} CPUs, torch threads " \
                          f"{c.get('torch_threads', '?')}"
    plot(lines, args.out, title)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
