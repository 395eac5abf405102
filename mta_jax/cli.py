"""What the command-line entry points share: user errors as one line, quiet library logs.

An entry point runs its work inside `one_line_errors()`: a `UserError` (errors.py) is printed
as one line `error: ...` on stderr and becomes exit status 1, without a traceback.
"""
import contextlib
import logging as std_logging
import sys

from mta_jax.errors import UserError


class UserExit(SystemExit):
    """Raised by `one_line_errors` after printing a user error (exit status 1)."""


@contextlib.contextmanager
def one_line_errors():
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise UserExit(1) from None


class _QuietLibraries(std_logging.Filter):
    """Orbax logs every file it writes at INFO; keep its warnings, drop the rest."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname:
            return True
        # Saves without metrics are expected: only evaluated steps compete for "best".
        return record.levelno >= std_logging.WARNING and "did not provide metrics" not in str(record.msg)


def quiet_libraries() -> None:
    std_logging.getLogger("absl").addFilter(_QuietLibraries())
    for name in ("gcsfs", "fsspec"):  # they log every gs:// read cache they open at INFO
        std_logging.getLogger(name).setLevel(std_logging.WARNING)
