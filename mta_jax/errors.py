"""The errors a user can cause, and the one training raises when it cannot go on.

A `UserError` is a mistake the user can fix: a config value, a path, a line of data, a
checkpoint. Its message names the field, file or line and what would be right. The entry
points print it as one line `error: ...` and exit 1 (`cli.py`); everything else is a bug and
keeps its traceback.
"""


class UserError(ValueError):
    """A mistake the user can fix; the message names the field, file or line."""


class ConfigError(UserError):
    """A config value that cannot work; the message names `config.<field>`."""


class DataError(UserError):
    """Bad data or data config: the message names the file, line, field or task."""


class CheckpointError(UserError):
    """No readable checkpoint where one was asked for, or one that does not fit the run."""


class CheckpointFormatError(UserError):
    """A Hugging Face folder, config or tensor that cannot be this model."""


class StorageError(UserError):
    """A place that cannot be written: e.g. a gs:// bucket that does not exist."""


class ShardingError(UserError):
    """A mesh, batch size or model shape that cannot be laid out; names the numbers."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the step."""
