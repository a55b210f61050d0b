"""The `capsule-batch` command group. Each subcommand lives in its own module and is imported only
when used, so `capsule-batch --help` does not import torch.

Errors: a `CapsuleError` (bad input, missing package, unwritable output) becomes one line on stderr
and exit code 1; usage errors exit 2 (click's default).
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from capsule_batch import __version__
from capsule_batch.errors import CapsuleError
from capsule_batch.logs import NOISY_LOGGERS, STDERR_FORMAT

#: command name -> module under capsule_batch.cli that defines `command`
COMMANDS: dict[str, str] = {
    "bench": "bench",
    "compare": "compare",
    "engine": "engine",
    "env": "env",
    "export": "export",
    "model": "model",
    "report": "report",
    "review": "review",
    "run": "run",
    "synth": "synth",
    "watch": "watch",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"capsule_batch.cli.{COMMANDS[name]}").command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CapsuleError as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="capsule-batch")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def cli(verbose: int, quiet: bool) -> None:
    """Triage whole capsule endoscopy recordings: decode, classify every frame, flag events, review."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format=STDERR_FORMAT, stream=sys.stderr, force=True)
    if verbose < 2:
        for noisy in NOISY_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="capsule-batch")
