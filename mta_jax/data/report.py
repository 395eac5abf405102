"""What a data source read, kept, skipped and truncated: nothing is dropped silently."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from absl import logging

_MAX_MESSAGES = 5  # skipped-row messages kept verbatim, to show what went wrong


def _counter():
    return dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass
class DataReport:
    """Counts for one split; `as_dict()` is JSON-serialisable."""

    split: str
    source: str
    # Rows that parsed into an example, by task; bad rows are counted by reason only.
    read: collections.Counter = _counter()
    kept: collections.Counter = _counter()  # by task
    bad_rows: collections.Counter = _counter()  # by reason
    bad_row_messages: list = dataclasses.field(default_factory=list)
    filtered: collections.Counter = _counter()  # by reason
    blank_lines: int = 0
    truncated_inputs: collections.Counter = _counter()  # by task
    truncated_targets: collections.Counter = _counter()  # by task
    # Train only: requested rates, and examples (realised rates) a mixture epoch
    # takes from each task.
    mixture: dict = dataclasses.field(default_factory=dict)

    def count_bad_row(self, reason: str, message: str) -> None:
        self.bad_rows[reason] += 1
        if len(self.bad_row_messages) < _MAX_MESSAGES:
            self.bad_row_messages.append(message)

    def as_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs.
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {
            k: dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v
            for k, v in out.items()
        }

    def summary(self) -> str:
        lines = [
            f"data[{self.split}] source={self.source}: kept {sum(self.kept.values())} "
            f"examples; {sum(self.bad_rows.values())} bad rows skipped, "
            f"{sum(self.filtered.values())} filtered"
        ]
        for task in sorted(self.read):
            line = (
                f"  {task}: kept {self.kept[task]}/{self.read[task]}, truncated inputs "
                f"{self.truncated_inputs[task]}, targets {self.truncated_targets[task]}"
            )
            if task in self.mixture.get("epoch_counts", {}):
                line += (
                    f", mixture rate {self.mixture['rates'][task]:.4f} requested, "
                    f"{self.mixture['realised_rates'][task]:.4f} realised "
                    f"({self.mixture['epoch_counts'][task]} of {self.mixture['epoch_size']} "
                    "per epoch)"
                )
            lines.append(line)
        if self.bad_rows:
            lines.append(f"  skipped bad rows: {dict(self.bad_rows)}")
            lines.extend(f"    e.g. {m}" for m in self.bad_row_messages)
        if self.filtered:
            lines.append(f"  filtered by templates: {dict(self.filtered)}")
        if self.blank_lines:
            lines.append(f"  blank lines ignored: {self.blank_lines}")
        return "\n".join(lines)

    def log(self) -> None:
        logging.info("%s", self.summary())
