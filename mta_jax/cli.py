"""What the command-line entry points share: which errors are the user's, and quiet logs.

Entry points print user errors as one line `error: ...` and exit 1, without a traceback.
"""
import logging as std_logging


def user_errors() -> tuple:
    """Exception types that mean 'the user asked for something impossible', not a bug."""
    from mta_jax import checkpoint, data, hf, sharding, train
    from mta_jax.models import mta

    return (train.ConfigError, data.DataError, hf.CheckpointFormatError, mta.MTAConfigError,
            checkpoint.CheckpointError, sharding.ShardingError)


class _QuietLibraries(std_logging.Filter):
    """Orbax logs every file it writes at INFO; keep its warnings, drop the rest."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname:
            return True
        # Saves without metrics are expected: only evaluated steps compete for "best".
        return record.levelno >= std_logging.WARNING and "did not provide metrics" not in str(record.msg)


def quiet_libraries() -> None:
    std_logging.getLogger("absl").addFilter(_QuietLibraries())
