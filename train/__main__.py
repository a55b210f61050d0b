"""`python -m train {data,pretrain,finetune,adapt,evaluate,calibrate,predict} --config FILE [key=value ...]`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from capsule_batch.errors import CapsuleError


def _data(cfg: dict[str, Any]) -> Any:
    """What training would use, checked as training checks it (readers, mapping, images, split, leakage),
    without building a model: a minutes-long check before an hours-long run."""
    from train.trainer import describe_data, prepare_data

    return describe_data(prepare_data(cfg))


def _pretrain(cfg: dict[str, Any]) -> Any:
    from train.trainer import run_training

    return run_training(cfg, "pretrain")


def _finetune(cfg: dict[str, Any]) -> Any:
    from train.trainer import run_training

    return run_training(cfg, "finetune")


def _adapt(cfg: dict[str, Any]) -> Any:
    from train.adapt import run_adapt

    return run_adapt(cfg)


def _evaluate(cfg: dict[str, Any]) -> Any:
    from train.commands import evaluate

    m = evaluate(cfg)
    return {k: v for k, v in m.items() if k not in ("per_class", "confusion")}


def _calibrate(cfg: dict[str, Any]) -> Any:
    from train.commands import calibrate

    return calibrate(cfg)


def _predict(cfg: dict[str, Any]) -> Any:
    from train.commands import predict

    return {"submission": str(predict(cfg))}


COMMANDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "data": _data,
    "pretrain": _pretrain,
    "finetune": _finetune,
    "adapt": _adapt,
    "evaluate": _evaluate,
    "calibrate": _calibrate,
    "predict": _predict,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("command", choices=list(COMMANDS))
    parser.add_argument("--config", help="experiment YAML (differences from train/configs/defaults.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=3")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from train.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        result = COMMANDS[args.command](cfg)
    except CapsuleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    from train.trainer import exit_process

    exit_process(main())
