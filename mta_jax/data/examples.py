"""The example dict every source produces, and the checks every source shares.

An example is a plain dict {"input", "target", "type", "task", "answer_choices"}:
text with whitespace collapsed (as the reference code does before tokenising),
a known MTA type, and the answer choices as a tuple (empty when free-form).
"""

from __future__ import annotations

from typing import Any, Sequence

from mta_jax.errors import DataError
from mta_jax.data.report import DataReport

ON_BAD_ROW = ("error", "skip")

# The authors' evaluation joins a list target (keyword generation) with a
# full-width comma; train and eval must see the same string.
LIST_TARGET_SEPARATOR = "，"

# Reasons a row is bad; the report counts skipped rows under these names.
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
NON_STRING_FIELD = "non_string_field"
UNKNOWN_TYPE = "unknown_type"
EMPTY_INPUT = "empty_input"
EMPTY_TARGET = "empty_target"
BAD_ANSWER_CHOICES = "bad_answer_choices"


class BadRow(Exception):
    """One row that cannot become an example; `reason` is one of the names above."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in ON_BAD_ROW:
        raise DataError(f"config.data.on_bad_row is {on_bad_row!r}; expected one of {ON_BAD_ROW}")


def handle_bad_row(err: BadRow, where: str, on_bad_row: str, report: DataReport) -> None:
    """Raises DataError naming `where`, or counts the row when skipping."""
    if on_bad_row == "error":
        raise DataError(
            f"{where}: {err} (set config.data.on_bad_row='skip' to skip and count such rows)"
        ) from None
    report.count_bad_row(err.reason, f"{where}: {err}")


def clean_text(value: str) -> str:
    return " ".join(value.split())


def _require_str(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise BadRow(
            NON_STRING_FIELD,
            f"field {field!r} must be a string, got {type(value).__name__} {value!r:.60}",
        )
    return value


def join_target(target: Any) -> str:
    """A target as one string: a list of strings is joined as the reference code does."""
    if isinstance(target, list):
        for item in target:
            _require_str(item, "target[]")
        return LIST_TARGET_SEPARATOR.join(target)
    return _require_str(target, "target")


def make_example(
    *,
    input: Any,
    target: Any,
    task_type: Any,  # pylint: disable=redefined-builtin
    task: str | None,
    answer_choices: Sequence[str],
    task_types: Sequence[str],
    require_target: bool = True,
) -> dict:
    """A checked, cleaned example; raises BadRow naming the field at fault.

    task: the task name; None names the task after its type.
    require_target: False accepts an empty target (inputs to predict).
    """
    task_type = _require_str(task_type, "type")
    if task_type not in task_types:
        raise BadRow(
            UNKNOWN_TYPE, f"unknown task type {task_type!r}; known types: {', '.join(task_types)}"
        )
    source = clean_text(_require_str(input, "input"))
    if not source:
        raise BadRow(EMPTY_INPUT, "field 'input' is empty")
    target = clean_text(join_target(target))
    if not target and require_target:
        raise BadRow(EMPTY_TARGET, "field 'target' is empty")
    return {
        "input": source,
        "target": target,
        "type": task_type,
        "task": task_type if task is None else task,
        "answer_choices": tuple(clean_text(c) for c in answer_choices),
    }
