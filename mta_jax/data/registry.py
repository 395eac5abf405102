"""The task registry: every task's name, MTA type, source, template and metric.

A task is one (source, template) pair; its MTA type decides which adapters the
task selector favours and which metric scores it. JSON-lines data registers no
tasks: each line names its type, and its task is that type (or the line's own
optional "task" field), see `jsonl.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from mta_jax.data import synthetic
from mta_jax.data import templates
from mta_jax.errors import DataError
from mta_jax.task_types import METRIC_BY_TYPE



@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """Where a task's rows come from in tensorflow-datasets."""

    name: str  # builder name with config, as `tfds.data_source` takes it
    train_split: str
    eval_split: str
    # Legacy builders register only when their module is imported; None when
    # `import tensorflow_datasets` already registers the builder.
    module: str | None = None


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    task_type: str  # one of task_types.TASK_TYPES
    source: TfdsSource | str  # a TfdsSource, or "synthetic"
    # tfds record -> RawExample | Filtered; None where the source yields examples.
    template: Callable[[Mapping], templates.RawExample | templates.Filtered] | None
    metric: str = ""  # "" = the type's metric

    def __post_init__(self):
        assert self.task_type in METRIC_BY_TYPE, self.task_type
        if not self.metric:
            object.__setattr__(self, "metric", METRIC_BY_TYPE[self.task_type])


def _tfds(name: str, task_type: str, source: TfdsSource, template) -> Task:
    return Task(name=name, task_type=task_type, source=source, template=template)


_GLUE = "tensorflow_datasets.text.glue"
_SQUAD = TfdsSource("squad/v1.1", "train", "validation")

TASKS: Mapping[str, Task] = {
    t.name: t
    for t in (
        _tfds(
            "sst2",
            "classify",
            TfdsSource("glue/sst2", "train", "validation", _GLUE),
            templates.sst2,
        ),
        _tfds("trec", "classify", TfdsSource("trec", "train", "test"), templates.trec),
        # super_glue/boolq needs TensorFlow to build its features; bool_q does not.
        _tfds("boolq", "classify", TfdsSource("bool_q", "train", "validation"), templates.boolq),
        _tfds(
            "snli",
            "nli",
            TfdsSource("snli", "train", "validation", "tensorflow_datasets.text.snli"),
            templates.nli,
        ),
        _tfds(
            "mnli",
            "nli",
            TfdsSource("glue/mnli", "train", "validation_matched", _GLUE),
            templates.nli,
        ),
        _tfds("squad_qg", "generate", _SQUAD, templates.squad_question_generation),
        _tfds("squad_mrc", "mrc", _SQUAD, templates.squad_extractive_qa),
        _tfds(
            "dpr",
            "anaphora_resolution",
            TfdsSource(
                "definite_pronoun_resolution",
                "train",
                "test",
                "tensorflow_datasets.text.definite_pronoun_resolution",
            ),
            templates.definite_pronoun_resolution,
        ),
    )
} | {
    name: Task(name, task_type, "synthetic", None)
    for name, (task_type, _) in synthetic.TASKS.items()
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DataError(
            f"unknown task {name!r} (config.data.tfds_tasks); registered tasks: "
            f"{', '.join(sorted(TASKS))}"
        )
    return TASKS[name]


def task_type_index(task_type: str, task_types: tuple[str, ...], where: str) -> int:
    """The task id of a type; a clear error when the run's task types lack it."""
    if task_type not in task_types:
        raise DataError(
            f"{where}: task type {task_type!r} is not one of the run's task types "
            f"{list(task_types)}"
        )
    return task_types.index(task_type)
