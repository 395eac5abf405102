"""What a training run writes while it runs: metrics.jsonl, TensorBoard event files, a progress bar.

Only the first process writes (the others hold `enabled=False` writers); nothing here needs
TensorFlow (TensorBoard files come from tensorboardX, which writes gs:// itself).
"""
from __future__ import annotations

import json
import math
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
from absl import logging

from mta_jax import storage


class MetricWriter:
    """metrics.jsonl + TensorBoard event files (tensorboardX: no TensorFlow).

    A local metrics.jsonl grows by one appended line per row. An object store cannot append:
    there the writer keeps the rows and rewrites the whole object at most every `flush_secs`
    and on `flush()`, which the training loop calls before each checkpoint save, so the only
    rows a crash can lose come after the last checkpoint: the rows a resume drops anyway
    (`truncate_after`). TensorBoard's event file is opened at the first row, so a launch that
    writes none leaves no file.
    """

    def __init__(self, directory: str, enabled: bool = True, flush_secs: float = 30.0):
        self.directory = str(directory)
        self.path = storage.path(directory) / "metrics.jsonl"
        self.enabled, self.flush_secs = enabled, flush_secs
        self._remote = storage.is_remote(self.path)
        self._lines: Optional[list[str]] = None  # remote: the object's rows, written on flush
        self._unflushed, self._flushed_at = False, time.monotonic()
        self._tb = None  # None: not opened yet; False: tensorboardX is missing

    def _tensorboard(self):
        if self._tb is None:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(self.directory, flush_secs=30)
            except ImportError as e:  # TensorBoard is optional; metrics.jsonl is not.
                logging.warning("no TensorBoard event files: %s", e)
                self._tb = False
        return self._tb

    def write(self, step: int, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {"step": int(step)}
        for k, v in row.items():
            v = np.asarray(v)
            clean[k] = v.item() if v.ndim == 0 else [round(float(x), 6) for x in v.ravel()]
        line = json.dumps(clean) + "\n"
        if self._remote:
            self._rows().append(line)
            self._unflushed = True
            if time.monotonic() - self._flushed_at >= self.flush_secs:
                self.flush()
        else:
            with self.path.open("a") as f:
                f.write(line)
        tb = self._tensorboard()
        if tb:
            for k, v in clean.items():
                if k == "step":
                    continue
                if isinstance(v, list):
                    for i, x in enumerate(v):
                        tb.add_scalar(f"{k}/{i}", x, step)
                elif isinstance(v, (int, float)):
                    tb.add_scalar(k, v, step)

    def flush(self) -> None:
        """Makes every row written so far durable (a no-op for a local file)."""
        if self._remote and self._unflushed:
            storage.write_text(self.path, "".join(self._rows()))
            self._unflushed, self._flushed_at = False, time.monotonic()

    def truncate_after(self, step: int) -> None:
        """When a stage (re)starts at `step`, drop the rows an earlier attempt wrote after it."""
        if not self.enabled:
            return
        lines = self._read_lines()
        kept = [line for line in lines if _step(line) <= step]
        if self._remote:
            self._lines = kept
        if len(kept) < len(lines):
            storage.write_text(self.path, "".join(kept))

    def close(self) -> None:
        if self.enabled:
            self.flush()
        if self._tb:
            self._tb.close()

    def _rows(self) -> list[str]:
        if self._lines is None:
            self._lines = self._read_lines()
        return self._lines

    def _read_lines(self) -> list[str]:
        if not self.path.exists():
            return []
        lines = storage.read_text(self.path).splitlines(keepends=True)
        return [line for line in lines if line.strip()]


def _step(line: str) -> float:
    """The row's step; a line cut short by a killed process counts as after every step."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


class Progress:
    """A tqdm bar with examples/s and ETA; silent when disabled or not the first host."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.bar = None
        if enabled and jax.process_index() == 0:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                            dynamic_ncols=True, mininterval=1.0)

    def update(self, n: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
