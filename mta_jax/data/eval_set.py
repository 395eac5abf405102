"""The evaluation set: every example once, in source order, in fixed-shape batches."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import ml_collections
import numpy as np

from mta_jax.data import sources
from mta_jax.data import tokenize
from mta_jax.errors import DataError
from mta_jax.data.report import DataReport


@dataclasses.dataclass
class EvalSet:
    examples: list[dict]  # {"input", "target", "type", "task", "answer_choices"}
    tokenized: tokenize.TokenizedExamples
    report: DataReport

    def __len__(self) -> int:
        return len(self.examples)

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], list[dict]]]:
        """(batch, the examples of its real rows); every batch has `batch_size` rows.

        The last batch is filled up with copies of its last real row, so padded rows
        are numerically ordinary; their example_mask [B] is 0 and no example is
        returned for them.
        """
        if batch_size <= 0:
            raise DataError(f"eval batch size must be positive, got {batch_size}")
        for start in range(0, len(self.examples), batch_size):
            rows = list(range(start, min(start + batch_size, len(self.examples))))
            real = len(rows)
            rows += [rows[-1]] * (batch_size - real)
            features = [self.tokenized.features(r) for r in rows]
            batch = {k: np.stack([f[k] for f in features]) for k in features[0]}
            batch["example_mask"] = (np.arange(batch_size) < real).astype(np.int32)
            yield batch, self.examples[start : start + real]


def build_eval_set(
    data_cfg: ml_collections.ConfigDict, *, tokenizer: Any, task_types: Sequence[str]
) -> EvalSet:
    """Every eval example of the configured source (capped per task by eval_max_examples).

    `data_cfg` has passed `validate_data_config` (build.validate_config runs it once)."""
    examples, report = sources.load_examples(data_cfg, "eval", tuple(task_types))
    tokenized = tokenize.tokenize_with_config(examples, tokenizer, data_cfg, task_types, report,
                                              inference=True)
    report.log()
    return EvalSet(examples, tokenized, report)
