"""The GPU-only coverage figure: which lines of the product only run on a GPU, and how many of them the fake CUDA
device's tests (tests/test_fake_cuda.py) execute. docs/gpu.md reports the figure.

GPU-only lines (found from the source, not listed by hand): every statement inside a branch that is taken only on
CUDA — the body of an `if` whose condition names CUDA (`device.type == "cuda"`, `is_cuda`, `on_gpu`, `_gpu`,
`torch.cuda.is_available()`), the `else` of one that asks for "not CUDA" — and every statement that calls
`torch.cuda.*`. Modules that need more than torch on a GPU (TensorRT, DALI, onnxruntime's CUDA provider,
PyNvVideoCodec) are counted separately: the fake device cannot run them (docs/gpu.md says why).

    .venv/bin/python tests/gpu_coverage.py            # runs the tests under coverage, prints the figure
    .venv/bin/python tests/gpu_coverage.py --json     # the same as one JSON object
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("capsule_batch", "train")
EXTRA_FILES = ("benchmarks/gpu_suite.py",)
#: modules whose GPU code needs a GPU-side library the fake device does not have
OUT_OF_REACH = {"capsule_batch/backends/trt_engine.py": "TensorRT", "capsule_batch/sources/dali.py": "DALI",
                "capsule_batch/backends/ort_engine.py": "onnxruntime's CUDA provider"}
CUDA_WORDS = ("cuda", "on_gpu", "_gpu", "is_cuda")


def _names_cuda(node: ast.AST, source: str) -> bool:
    text = (ast.get_source_segment(source, node) or "").lower()
    return any(w in text for w in CUDA_WORDS)


def _negated(node: ast.AST, source: str) -> bool:
    text = ast.get_source_segment(source, node) or ""
    return text.lstrip().startswith("not ") or "!=" in text


def _docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _statements(body: list[ast.stmt]) -> set[int]:
    lines: set[int] = set()
    for stmt in body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.stmt) and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                    ast.ClassDef)):
                lines.add(node.lineno)
    return lines


def gpu_only_lines(path: Path) -> set[int]:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _names_cuda(node.test, source):
            lines |= _statements(node.orelse if _negated(node.test, source) else node.body)
        elif isinstance(node, ast.stmt) and not isinstance(node, (ast.If, ast.FunctionDef, ast.AsyncFunctionDef,
                                                                   ast.ClassDef, ast.With, ast.For, ast.While,
                                                                   ast.Try)) and not _docstring(node):
            if "torch.cuda." in (ast.get_source_segment(source, node) or ""):
                lines.add(node.lineno)
    return lines


def product_files() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    return files + [REPO / f for f in EXTRA_FILES]


def measure(tests: str) -> dict[str, set[int]]:
    """Run `tests` under coverage (the DDP ranks' processes too) and return file -> executed lines."""
    import coverage

    with tempfile.TemporaryDirectory() as tmp:
        rc = Path(tmp) / ".coveragerc"
        rc.write_text(f"[run]\nparallel = True\ndata_file = {tmp}/.coverage\nsource = {REPO}\n"
                      "concurrency = thread,multiprocessing\n", encoding="utf-8")
        env = {**os.environ, "COVERAGE_PROCESS_START": str(rc), "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-m", "coverage", "run", f"--rcfile={rc}", "-m", "pytest", "-q",
                        "-p", "no:cacheprovider", tests], cwd=REPO, env=env, check=False)
        cov = coverage.Coverage(data_file=f"{tmp}/.coverage", config_file=str(rc))
        cov.combine(data_paths=[tmp])
        data = cov.get_data()
        return {str(Path(f).resolve().relative_to(REPO)): set(data.lines(f) or ()) for f in data.measured_files()
                if Path(f).resolve().is_relative_to(REPO)}


def figure(executed: dict[str, set[int]]) -> dict[str, object]:
    rows, reach_total, reach_run, out_total = [], 0, 0, {}
    for path in product_files():
        rel = str(path.relative_to(REPO))
        lines = gpu_only_lines(path)
        if not lines:
            continue
        if rel in OUT_OF_REACH:
            out_total[rel] = {"lines": len(lines), "needs": OUT_OF_REACH[rel]}
            continue
        run = lines & executed.get(rel, set())
        reach_total += len(lines)
        reach_run += len(run)
        rows.append({"file": rel, "gpu_only_lines": len(lines), "executed": len(run),
                     "not_executed": sorted(lines - run)})
    return {"gpu_only_lines": reach_total, "executed": reach_run,
            "share": round(reach_run / reach_total, 3) if reach_total else None, "files": rows,
            "out_of_reach": out_total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tests", default="tests/test_fake_cuda.py")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = figure(measure(args.tests))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"GPU-only lines executed under the fake CUDA device: {result['executed']} of {result['gpu_only_lines']} "
          f"({100 * (result['share'] or 0):.0f} %)")
    for r in result["files"]:
        print(f"  {r['file']:48s} {r['executed']:4d} / {r['gpu_only_lines']:4d}   not run: {r['not_executed']}")
    for f, o in result["out_of_reach"].items():
        print(f"  {f:48s} {o['lines']:4d} GPU-only lines need {o['needs']} (a real GPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
