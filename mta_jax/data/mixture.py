"""Mixing tasks: sampling rates, per-epoch counts, and which example fills each slot.

A mixture epoch has `sum(min(n_t, cap))` slots; task t owns `count_t` of them
(its rate times the epoch, rounded by largest remainder). Slot j of task t in
mixture epoch e is the task's draw number e * count_t + j, and draws walk
through a fresh permutation of the task's examples each time they wrap. So a
down-sampled task still sees all its examples across epochs, an up-sampled one
repeats them evenly, and any position of the stream is a pure function of
(seed, epoch, slot): nothing to save but the position.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from mta_jax.errors import DataError

MIXTURES = ("proportional", "equal", "temperature")


def capped_sizes(sizes: Mapping[str, int], cap: int) -> dict[str, int]:
    return {t: min(n, cap) if cap else n for t, n in sizes.items()}


def mixture_rates(
    sizes: Mapping[str, int], kind: str, *, temperature: float = 1.0, cap: int = 0
) -> dict[str, float]:
    """Sampling rate per task, summing to 1.

    proportional: n_t' / sum n';  equal: 1 / num_tasks;
    temperature: n_t'^(1/T) / sum n'^(1/T) (T = 1 is proportional, T -> inf equal);
    where n_t' = min(n_t, cap), cap = 0 meaning no cap.
    """
    if kind not in MIXTURES:
        raise DataError(f"config.data.mixture is {kind!r}; expected one of {MIXTURES}")
    if kind == "temperature" and not temperature > 0:
        raise DataError(f"config.data.mixture_temperature must be > 0, got {temperature}")
    if cap < 0:
        raise DataError(f"config.data.mixture_cap must be >= 0 (0 = no cap), got {cap}")
    if not sizes or min(sizes.values()) <= 0:
        raise DataError(
            f"every task needs at least one example to be mixed, got sizes {dict(sizes)}"
        )
    capped = np.array(list(capped_sizes(sizes, cap).values()), np.float64)
    if kind == "proportional":
        weights = capped
    elif kind == "equal":
        weights = np.ones_like(capped)
    else:
        # In log space so large sizes and small temperatures cannot overflow.
        logits = np.log(capped) / temperature
        weights = np.exp(logits - logits.max())
    return dict(zip(sizes, (weights / weights.sum()).tolist()))


def epoch_counts(rates: Mapping[str, float], epoch_size: int) -> dict[str, int]:
    """Slots per task in one mixture epoch: largest remainder, at least one per task."""
    if epoch_size < len(rates):
        raise DataError(f"a mixture epoch of {epoch_size} examples cannot hold {len(rates)} tasks")
    exact = np.array(list(rates.values())) * epoch_size
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact, kind="stable")[: epoch_size - counts.sum()]] += 1
    for k in np.flatnonzero(counts == 0):  # a tiny rate still gets a slot
        counts[np.argmax(counts)] -= 1
        counts[k] = 1
    return dict(zip(rates, counts.tolist()))


class MixtureIndex:
    """Maps (mixture epoch, slot) to a row of the task-contiguous example table."""

    def __init__(
        self,
        task_starts: Sequence[int],
        task_sizes: Sequence[int],
        counts: Sequence[int],
        seed: int,
    ):
        assert len(task_starts) == len(task_sizes) == len(counts)
        self.starts = np.asarray(task_starts, np.int64)
        self.sizes = np.asarray(task_sizes, np.int64)
        self.counts = np.asarray(counts, np.int64)
        self.slot_bounds = np.concatenate([[0], np.cumsum(self.counts)])
        self.epoch_size = int(self.slot_bounds[-1])
        self.seed = seed
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def _permutation(self, task: int, task_epoch: int) -> np.ndarray:
        key = (task, task_epoch)
        perm = self._permutations.get(key)
        if perm is None:
            if len(self._permutations) > 4 * len(self.sizes):  # bound memory; recomputable
                self._permutations.clear()
            rng = np.random.default_rng([self.seed, task, task_epoch])
            perm = self._permutations[key] = rng.permutation(int(self.sizes[task]))
        return perm

    def row(self, epoch: int, slot: int) -> int:
        task = int(np.searchsorted(self.slot_bounds, slot, side="right")) - 1
        draw = epoch * int(self.counts[task]) + slot - int(self.slot_bounds[task])
        task_epoch, position = divmod(draw, int(self.sizes[task]))
        return int(self.starts[task] + self._permutation(task, task_epoch)[position])
