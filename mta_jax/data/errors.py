"""The one exception a user's data or data config can cause."""


class DataError(ValueError):
    """Bad data or data config: the message names the file, line, field or task."""
