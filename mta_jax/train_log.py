"""What a training run writes while it runs: metrics.jsonl, TensorBoard event files, a progress bar.

Only the first process writes (the others hold `enabled=False` writers); nothing here needs
TensorFlow (TensorBoard files come from tensorboardX).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging


class MetricWriter:
    """metrics.jsonl + TensorBoard event files (tensorboardX: no TensorFlow)."""

    def __init__(self, directory: str, enabled: bool = True):
        self.directory = directory
        self.path = os.path.join(directory, "metrics.jsonl")
        self.enabled = enabled
        self._tb = None  # opened at the first row: a launch that writes none leaves no file

    def _tensorboard(self):
        if self._tb is None:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(self.directory, flush_secs=30)
            except ImportError:  # TensorBoard is optional; metrics.jsonl is not.
                logging.warning("tensorboardX is not installed: no TensorBoard event files")
                self._tb = False
        return self._tb

    def write(self, step: int, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {"step": int(step)}
        for k, v in row.items():
            v = np.asarray(v)
            clean[k] = v.item() if v.ndim == 0 else [round(float(x), 6) for x in v.ravel()]
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
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

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows a crashed run wrote after its last checkpoint."""
        if not (self.enabled and os.path.exists(self.path)):
            return
        with open(self.path) as f:
            rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(rows)

    def close(self) -> None:
        if self._tb:
            self._tb.close()


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
