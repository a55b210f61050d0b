"""`python -m train` follows capsule-batch's conventions: one line on stderr and exit 1 for bad input or a file it
cannot write, exit 2 for a usage error, 130 when interrupted, the result as one JSON object on stdout (`--json`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import train.__main__ as cli


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], outcome: Any,
        *args: str) -> tuple[int, str, str]:
    def command(cfg: dict[str, Any]) -> Any:
        assert cfg["train"]["epochs"] == 3  # the override reached the command
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setitem(cli.COMMANDS, "data", command)
    rc = cli.main(["data", "train.epochs=3", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_the_result_is_one_json_object_on_stdout(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    for extra in ((), ("--json",)):
        rc, out, _ = run(monkeypatch, capsys, {"images": 3, "bundle": Path("runs/x")}, *extra)
        assert rc == 0 and out.count("\n") == 1 and json.loads(out) == {"images": 3, "bundle": "runs/x"}


def test_a_file_that_cannot_be_written_is_one_line_and_exit_1(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(monkeypatch, capsys, PermissionError(13, "Permission denied", "/data/runs/ft/config.yaml"))
    assert rc == 1 and out == ""
    assert err.strip().splitlines()[-1] == "error: /data/runs/ft/config.yaml: Permission denied"
    assert "Traceback" not in err


def test_interrupted_exits_130_and_says_how_to_go_on(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(monkeypatch, capsys, KeyboardInterrupt())
    assert rc == 130 and out == "" and "run.resume=true" in err.strip().splitlines()[-1]


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["trian"])
    assert e.value.code == 2 and "invalid choice: 'trian'" in capsys.readouterr().err
