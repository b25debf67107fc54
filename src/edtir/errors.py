"""Errors that reach the user as one line and an exit code, never a traceback."""

import sys
from collections.abc import Callable


class EdtirError(Exception):
    """A problem with the user's input (file, flag, config); the CLI prints it as one line and exits 1."""

    exit_code = 1


class UsageError(EdtirError):
    """Wrong flag, unknown task or model name: exit 2."""

    exit_code = 2


class CheckpointError(EdtirError):
    """A weights file that is missing, truncated, not a checkpoint, or does not fit the model."""


class ImageError(EdtirError):
    """An image that cannot be read or written."""


class ConfigError(UsageError):
    """A bad key or value in a YAML config or a key=value override."""


class OutOfMemory(EdtirError):
    """Out of memory even after the inference engine fell back to its smallest tile."""


class TrainingStopped(EdtirError):
    """Training stopped before its last step (a non-finite loss); the last good checkpoint is kept."""


class Interrupted(EdtirError):
    """SIGINT or SIGTERM: the work was stopped cleanly (training saved a checkpoint). Exit 128 + signal number,
    as a shell reports a process killed by that signal: 130 for SIGINT, 143 for SIGTERM."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)


def run_script(main: Callable[[], int], prog: str) -> None:
    """Exit with ``main()``'s status; an :class:`EdtirError` (a missing checkpoint, an unknown model) becomes one
    line and exit 2, for scripts outside the ``edtir`` command (``benchmarks/``)."""
    try:
        raise SystemExit(main())
    except EdtirError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
