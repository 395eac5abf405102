"""The authors' JSON-lines format: one {"input", "target", "answer_choices", "type"} a line.

`target` may be a list of strings (keyword generation), joined as the reference
evaluation joins it. `answer_choices` may be a list of strings, a JSON-encoded
list (the released file stores "[]"), null or absent. An optional "task" string
names a sub-task for mixing (e.g. sst2 vs trec, both "classify"); without it
the task is the type.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from mta_jax import storage
from mta_jax.data import examples as ex
from mta_jax.errors import DataError
from mta_jax.task_types import TASK_TYPES
from mta_jax.data.report import DataReport

REQUIRED_FIELDS = ("input", "target", "type")


def _answer_choices(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ex.BadRow(
                ex.BAD_ANSWER_CHOICES,
                f"field 'answer_choices' is a string that is not a JSON list: {value!r:.60}",
            ) from None
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise ex.BadRow(
            ex.BAD_ANSWER_CHOICES,
            f"field 'answer_choices' must be a list of strings, got {value!r:.60}",
        )
    return tuple(value)


def parse_line(
    line: str,
    task_types: Sequence[str],
    *,
    default_type: str | None = None,
    require_target: bool = True,
) -> dict:
    """One JSON line -> an example dict; raises BadRow naming the field at fault."""
    try:
        # Without its newline: an error at the end of the line is reported on this line.
        row = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise ex.BadRow(ex.INVALID_JSON, f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise ex.BadRow(ex.NOT_AN_OBJECT, f"expected a JSON object, got {type(row).__name__}")
    if default_type is not None:
        row.setdefault("type", default_type)
    if not require_target:
        row.setdefault("target", "")
    missing = [f for f in REQUIRED_FIELDS if f not in row]
    if missing:
        raise ex.BadRow(
            ex.MISSING_FIELD,
            f"missing field(s) {missing}; a line needs "
            f"{list(REQUIRED_FIELDS)} and may have 'answer_choices', 'task'",
        )
    task = row.get("task")
    if task is not None and (not isinstance(task, str) or not task):
        raise ex.BadRow(
            ex.NON_STRING_FIELD, f"field 'task' must be a non-empty string, got {task!r}"
        )
    return ex.make_example(
        input=row["input"],
        target=row["target"],
        task_type=row["type"],
        task=task,
        answer_choices=_answer_choices(row.get("answer_choices")),
        task_types=task_types,
        require_target=require_target,
    )


def read_jsonl(
    path: str | os.PathLike,
    *,
    on_bad_row: str = "error",
    task_types: Sequence[str] = TASK_TYPES,
    split: str = "train",
    default_type: str | None = None,
    require_target: bool | None = None,
) -> tuple[list[dict], DataReport]:
    """Reads every line of `path` (local or gs://); bad lines raise DataError (file:line) or
    are counted.

    split: "train", "eval" or "predict"; it labels the report.
    default_type: the type of lines without one (None: "type" is required).
    require_target: None = required except for split "predict", whose lines may
      lack a target (the example's target is then "").
    """
    ex.check_on_bad_row(on_bad_row)
    if require_target is None:
        require_target = split != "predict"
    path = os.fspath(path)
    if not storage.path(path).is_file():
        raise DataError(f"JSON-lines file not found: {path!r}")
    report = DataReport(split=split, source=f"jsonl:{path}")
    examples: list[dict] = []
    with storage.path(path).open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a leading BOM
            except UnicodeDecodeError as e:
                err = ex.BadRow(ex.INVALID_JSON, f"not UTF-8 ({e.reason} at byte {e.start})")
                ex.handle_bad_row(err, where, on_bad_row, report)
                continue
            if not line.strip():
                report.blank_lines += 1
                continue
            try:
                example = parse_line(
                    line, task_types, default_type=default_type, require_target=require_target
                )
            except ex.BadRow as err:
                ex.handle_bad_row(err, where, on_bad_row, report)
                continue
            report.read[example["task"]] += 1
            report.kept[example["task"]] += 1
            examples.append(example)
    if not examples:
        raise DataError(
            f"{path}: no usable examples (bad rows skipped: {dict(report.bad_rows)}, "
            f"blank lines: {report.blank_lines})"
        )
    return examples, report
