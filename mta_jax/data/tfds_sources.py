"""Registered tasks read from tensorflow-datasets through `tfds.data_source`.

`tfds.data_source` reads array_record files with random access and needs no
TensorFlow (`tfds.load` does). Datasets must already be prepared in array_record
format under `data_dir`; nothing is downloaded unless `download` is set.
"""

from __future__ import annotations

import importlib
from typing import Sequence

from mta_jax.data import examples as ex
from mta_jax.data import templates
from mta_jax.errors import DataError
from mta_jax.data.registry import Task, TfdsSource
from mta_jax.data.report import DataReport


def open_source(
    source: TfdsSource, split: str, *, data_dir: str = "", download: bool = False
) -> Sequence:
    """The random-access data source of one split; DataError naming what is missing."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import)

    if source.module:
        try:
            importlib.import_module(source.module)
        except ImportError as e:
            raise DataError(
                f"tfds dataset {source.name!r}: cannot import {source.module} that "
                f"registers its builder: {e}"
            ) from e
    try:
        return tfds.data_source(
            source.name, split=split, data_dir=data_dir or None, download=download
        )
    except tfds.core.DatasetNotFoundError as e:
        first_line = str(e).splitlines()[0]
        raise DataError(f"tfds has no dataset named {source.name!r} ({first_line})") from e
    except (ValueError, KeyError, NotImplementedError, OSError, ImportError) as e:
        raise DataError(
            f"cannot open tfds dataset {source.name!r} split {split!r} under data_dir "
            f"{data_dir or '(tfds default)'}: {type(e).__name__}: {e}. Prepare it in array_record "
            f"format (`tfds build {source.name} --file_format=array_record`) or set "
            "config.data.tfds_data_dir"
        ) from e


def read_tfds_task(
    task: Task,
    split_kind: str,
    *,
    task_types: Sequence[str],
    on_bad_row: str = "error",
    data_dir: str = "",
    download: bool = False,
    max_examples: int = 0,
    report: DataReport | None = None,
) -> tuple[list[dict], DataReport]:
    """Examples of one registered tfds task; split_kind is "train" or "eval".

    max_examples: read only the first n records of the split (0 = all).
    """
    ex.check_on_bad_row(on_bad_row)
    assert isinstance(task.source, TfdsSource) and task.template is not None, task
    split = task.source.train_split if split_kind == "train" else task.source.eval_split
    report = report or DataReport(split=split_kind, source="tfds")
    data = open_source(task.source, split, data_dir=data_dir, download=download)
    n = min(len(data), max_examples) if max_examples else len(data)
    out: list[dict] = []
    for index in range(n):
        raw = task.template(data[index])
        if isinstance(raw, templates.Filtered):
            report.filtered[f"{task.name}:{raw.reason}"] += 1
            continue
        try:
            example = ex.make_example(
                input=raw.input,
                target=raw.target,
                task_type=task.task_type,
                task=task.name,
                answer_choices=raw.answer_choices,
                task_types=task_types,
            )
        except ex.BadRow as err:
            ex.handle_bad_row(
                err,
                f"tfds {task.source.name}[{split}] record {index} (task {task.name})",
                on_bad_row,
                report,
            )
            continue
        report.read[task.name] += 1
        report.kept[task.name] += 1
        out.append(example)
    if not out:
        raise DataError(
            f"task {task.name!r}: no usable examples in tfds {task.source.name!r} "
            f"split {split!r} ({n} records; filtered {dict(report.filtered)}, "
            f"bad {dict(report.bad_rows)})"
        )
    return out, report
