"""Where things live, checked on the source: one runner for every caller, one module that touches study files'
HDF5, one decode thread (sources start none of their own)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO

CODE = [p for base in ("capsule_batch", "train", "benchmarks") for p in sorted((REPO / base).rglob("*.py"))]


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_store_opens_study_files_with_h5py() -> None:
    assert [str(p.relative_to(REPO)) for p in CODE if "h5py" in imports(p)] == ["capsule_batch/store.py"]
    assert [str(p.relative_to(REPO)) for p in CODE if re.search(r"\._f\b", p.read_text(encoding="utf-8"))] \
        == ["capsule_batch/store.py"]


def test_every_caller_runs_recordings_through_the_runner() -> None:
    callers = ["capsule_batch/cli/run.py", "train/demo.py", "capsule_batch/bench.py", "benchmarks/gpu_suite.py",
               "benchmarks/scale_1m.py"]
    for c in callers:
        assert "run_recordings(" in (REPO / c).read_text(encoding="utf-8"), c
    assert "open_pipeline(" in (REPO / "capsule_batch/cli/watch.py").read_text(encoding="utf-8")  # recordings to come
    built = [str(p.relative_to(REPO)) for p in CODE if re.search(r"\bPipeline\(", p.read_text(encoding="utf-8"))]
    assert built == ["capsule_batch/runner.py"]


def test_sources_start_no_thread_of_their_own() -> None:
    """In a run the decode stage's thread is the only one a recording is decoded in (DALI keeps its own workers)."""
    sources = sorted((REPO / "capsule_batch" / "sources").glob("*.py"))
    starting = [p.name for p in sources if p.name != "prefetch.py"
                and re.search(r"\bPrefetcher\(|threading\.Thread\(", p.read_text(encoding="utf-8"))]
    assert starting == []
