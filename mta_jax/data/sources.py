"""Examples of one split from the configured source: synthetic, JSON lines or tfds."""

from __future__ import annotations

import collections
from typing import Sequence

import ml_collections

from mta_jax.data import jsonl
from mta_jax.data import registry
from mta_jax.data import synthetic
from mta_jax.data import tfds_sources
from mta_jax.errors import DataError
from mta_jax.data.report import DataReport

SPLITS = ("train", "eval")


def _first_per_task(examples: list[dict], n: int, report: DataReport) -> list[dict]:
    if not n:
        return examples
    seen: collections.Counter = collections.Counter()
    out = []
    for e in examples:
        seen[e["task"]] += 1
        if seen[e["task"]] <= n:
            out.append(e)
        else:
            report.filtered["over_max_examples"] += 1
            report.kept[e["task"]] -= 1
    return out


def _synthetic(
    cfg: ml_collections.ConfigDict, split: str, task_types: Sequence[str]
) -> tuple[list[dict], DataReport]:
    size = cfg.synthetic_train_size if split == "train" else cfg.synthetic_eval_size
    examples = synthetic.synthetic_examples(split, size, cfg.synthetic_seed)
    for task, (task_type, _) in synthetic.TASKS.items():
        registry.task_type_index(task_type, tuple(task_types), f"synthetic task {task}")
    report = DataReport(split=split, source="synthetic")
    for e in examples:
        report.read[e["task"]] += 1
        report.kept[e["task"]] += 1
    return examples, report


def _tfds(
    cfg: ml_collections.ConfigDict, split: str, task_types: Sequence[str], max_per_task: int
) -> tuple[list[dict], DataReport]:
    tasks = [registry.get_task(name) for name in cfg.tfds_tasks]  # every name checked first
    for task in tasks:
        if not isinstance(task.source, registry.TfdsSource):
            raise DataError(
                f"config.data.tfds_tasks names {task.name!r}, a {task.source} task, not a tfds one"
            )
        registry.task_type_index(task.task_type, tuple(task_types), f"tfds task {task.name}")
    report = DataReport(split=split, source="tfds")
    examples: list[dict] = []
    for task in tasks:
        rows, _ = tfds_sources.read_tfds_task(
            task,
            split,
            task_types=task_types,
            on_bad_row=cfg.on_bad_row,
            data_dir=cfg.tfds_data_dir,
            download=cfg.tfds_download,
            max_examples=max_per_task,
            report=report,
        )
        examples.extend(rows)
    return examples, report


def load_examples(
    cfg: ml_collections.ConfigDict, split: str, task_types: Sequence[str]
) -> tuple[list[dict], DataReport]:
    """Every example of `split` ("train" or "eval"), and the report of reading them."""
    assert split in SPLITS, split
    max_per_task = cfg.max_examples_per_task if split == "train" else cfg.eval_max_examples
    if cfg.source == "synthetic":
        examples, report = _synthetic(cfg, split, task_types)
    elif cfg.source == "jsonl":
        field = "train_path" if split == "train" else "eval_path"
        if not cfg[field]:
            raise DataError(f"config.data.{field} is empty but config.data.source is 'jsonl'")
        examples, report = jsonl.read_jsonl(
            cfg[field], on_bad_row=cfg.on_bad_row, task_types=task_types, split=split
        )
    else:
        examples, report = _tfds(cfg, split, task_types, max_per_task)
    return _first_per_task(examples, max_per_task, report), report
