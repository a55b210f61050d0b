"""Run a module or `capsule-batch` on the fake CUDA device (tests/fake_cuda.py), for subprocess tests: torchrun-style
ranks (`python -m torch.distributed.run ... tests/run_with_fake_cuda.py -m train finetune ...`) and the GPU
coverage figure. `FAKE_CUDA_DEVICES` GPUs are visible (default: one per local rank, at least 1); `nccl` is on.

    python tests/run_with_fake_cuda.py -m train finetune key=value ...
    python tests/run_with_fake_cuda.py capsule-batch run ... --device cuda
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

if os.environ.get("COVERAGE_PROCESS_START"):  # the GPU coverage figure measures these processes too
    import coverage

    # started already by coverage's own .pth hook where installed, else here
    _cov = coverage.process_startup() or coverage.Coverage.current()
    if _cov is not None:  # a rank that joined a process group ends with os._exit (capsule_batch.exits): save first
        _exit = os._exit

        def _save_then_exit(code: int) -> None:
            _cov.stop()
            _cov.save()
            _exit(code)

        os._exit = _save_then_exit

from fake_cuda import FakeCuda  # noqa: E402


def main(argv: list[str]) -> int:
    devices = int(os.environ.get("FAKE_CUDA_DEVICES", os.environ.get("LOCAL_WORLD_SIZE", "1")))
    with FakeCuda(devices=max(1, devices), nccl=True):
        if argv[:1] == ["-m"]:
            sys.argv = [argv[1], *argv[2:]]
            try:
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            except SystemExit as e:
                return int(e.code or 0) if not isinstance(e.code, str) else 1
            return 0
        if argv[:1] == ["capsule-batch"]:
            from capsule_batch.cli import cli

            try:
                cli.main(args=argv[1:], prog_name="capsule-batch", standalone_mode=True)
            except SystemExit as e:
                return int(e.code or 0) if not isinstance(e.code, str) else 1
            return 0
    raise SystemExit(f"usage: {sys.argv[0]} -m MODULE ARGS... | capsule-batch ARGS...")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
