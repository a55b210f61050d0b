"""`python -m train {data,pretrain,finetune,adapt,evaluate,calibrate,predict} --config FILE [key=value ...]`;
`python -m train score PREDICTIONS.xlsx --truth TRUTH` (see train/score.py)."""

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


def _score(cfg: dict[str, Any]) -> Any:
    from train.score import score

    return score(cfg)


COMMANDS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "data": _data,
    "pretrain": _pretrain,
    "finetune": _finetune,
    "adapt": _adapt,
    "evaluate": _evaluate,
    "calibrate": _calibrate,
    "predict": _predict,
    "score": _score,
}


def main(argv: list[str] | None = None) -> int:
    """The command's exit code, as capsule-batch's: 0 done, 1 bad input or a failed run (one line on stderr naming
    the file and the problem), 2 a usage error (argparse), 130 interrupted. The result is one JSON object on
    stdout; logs go to stderr."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["score"]:  # `score PREDICTIONS --truth T` -> score.* overrides
        from train.score import translate_argv

        argv = ["score", *translate_argv(argv[1:])]
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    parser.add_argument("command", choices=list(COMMANDS))
    parser.add_argument("--config", help="experiment YAML (differences from train/configs/defaults.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=3")
    parser.add_argument("--json", action="store_true",
                        help="accepted as in capsule-batch: the result is always one JSON object on stdout")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug log output on stderr")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    args = parser.parse_intermixed_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from train.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        result = COMMANDS[args.command](cfg)
    except CapsuleError as e:
        return _error(str(e))
    except OSError as e:  # a file the run cannot read or write (permissions, a full disk): what capsule-batch says
        return _error(f"{e.filename}: {e.strerror or e}" if getattr(e, "filename", None) else str(e.strerror or e))
    except KeyboardInterrupt:
        print("interrupted: a training run continues from its last finished epoch with run.resume=true",
              file=sys.stderr)
        return 130
    if result:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        sys.stdout.flush()
    return 0


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    from train.trainer import exit_process

    exit_process(main())
