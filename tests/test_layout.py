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
    assert [str(p.relative_to(REPO)) for p in CODE if "h5py" in imports(p)] == ["capsule_batch/study/store.py"]
    assert [str(p.relative_to(REPO)) for p in CODE if re.search(r"\._f\b", p.read_text(encoding="utf-8"))] \
        == ["capsule_batch/study/store.py"]


def test_every_caller_runs_recordings_through_the_runner() -> None:
    callers = ["capsule_batch/cli/run.py", "train/demo.py", "capsule_batch/run/measure.py", "benchmarks/gpu_suite.py",
               "benchmarks/scale_1m.py"]
    for c in callers:
        assert "run_recordings(" in (REPO / c).read_text(encoding="utf-8"), c
    assert "open_pipeline(" in (REPO / "capsule_batch/cli/watch.py").read_text(encoding="utf-8")  # recordings to come
    built = [str(p.relative_to(REPO)) for p in CODE if re.search(r"\bPipeline\(", p.read_text(encoding="utf-8"))]
    assert built == ["capsule_batch/run/runner.py"]


def test_sources_start_no_thread_of_their_own() -> None:
    """In a run the decode stage's thread is the only one a recording is decoded in (DALI keeps its own workers)."""
    sources = sorted((REPO / "capsule_batch" / "sources").glob("*.py"))
    starting = [p.name for p in sources if p.name != "prefetch.py"
                and re.search(r"\bPrefetcher\(|threading\.Thread\(", p.read_text(encoding="utf-8"))]
    assert starting == []


#: the packages in pipeline order; a package may import only from those before it (and the plumbing modules)
ROOMS = ("model", "sources", "backends", "study", "evaluation", "review", "run", "cli")
PLUMBING = {"errors", "exits", "files", "registry", "devices", "logs"}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_packages_import_only_from_earlier_stages_of_the_pipeline() -> None:
    """No upward imports: the folder order is the pipeline (docs/design.md), and plumbing imports no package."""
    upward = []
    for path in sorted((REPO / "capsule_batch").rglob("*.py")):
        rel = path.relative_to(REPO / "capsule_batch")
        here = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("capsule_batch.")):
                continue
            there = _room(node.module)
            if there == here or there in PLUMBING:
                continue
            if here in PLUMBING or here in ("__init__", "__main__"):
                ok = here == "__main__" and there == "cli" or here == "__init__"
            else:
                ok = ROOMS.index(there) < ROOMS.index(here)
            if not ok:
                upward.append(f"{rel}: {node.module}")
    assert upward == []


def test_no_two_modules_share_a_name_for_different_things() -> None:
    """cli/<command>.py is the command for the module of the same job, and base.py a package's interface (sources/,
    backends/); otherwise every module name is unique."""
    names: dict[str, list[str]] = {}
    for path in sorted((REPO / "capsule_batch").rglob("*.py")):
        if path.name not in ("__init__.py", "base.py") and path.parent.name != "cli":
            names.setdefault(path.stem, []).append(str(path.relative_to(REPO)))
    assert {k: v for k, v in names.items() if len(v) > 1} == {}


def test_the_public_face_is_lazy_and_complete() -> None:
    import subprocess
    import sys

    code = ("import sys, capsule_batch as cb; assert 'torch' not in sys.modules; "
            "assert cb.run_recordings.__module__ == 'capsule_batch.run.runner'; "
            "assert cb.StudyReader.__name__ == 'StudyReader' and callable(cb.load_bundle) and callable(cb.open_study)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
