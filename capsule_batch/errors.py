"""Exceptions that carry a message meant for the user.

The CLI turns a `CapsuleError` into one line on stderr and exit code 1; anything else is a bug and
keeps its traceback.
"""


class CapsuleError(Exception):
    """An error caused by input or environment, with a message that names the file and the problem."""


class BundleError(CapsuleError):
    """A model bundle or checkpoint that cannot be imported or loaded."""


class SourceError(CapsuleError):
    """A recording or frame folder that cannot be read, or a source that cannot work here."""


class EngineError(CapsuleError):
    """An inference backend that cannot be built or loaded."""


class StudyError(CapsuleError):
    """A study file that cannot be written, resumed or read."""


class MissingPackageError(CapsuleError):
    """An optional package is needed; the message names the extra that installs it."""

    def __init__(self, package: str, extra: str, what: str):
        super().__init__(
            f"{what} needs the '{package}' package, which is not installed: "
            f"pip install 'capsule-batch[{extra}]'"
        )
        self.package = package
        self.extra = extra
