"""The training input pipeline: mixed, shuffled, split across hosts, infinite, resumable.

    slots of one mixture epoch --shuffle(seed), reshuffled per epoch--> repeat forever
      -> (epoch, slot) -> example row (MixtureIndex) -> every process_count-th element
      -> padded features -> batches of batch_size // process_count

Every process computes the same global stream and keeps its own slice, so the
k-th batches of all processes together are the k-th global batch. The iterator's
state is the position in that stream (JSON), checked against the pipeline's
fingerprint when restored.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np

from mta_jax.data import mixture
from mta_jax.data import sources
from mta_jax.data import tokenize
from mta_jax.errors import DataError
from mta_jax.data.report import DataReport

STATE_FORMAT = "mta_jax.data.BatchIterator/1"
# Batches are cheap to build (slicing token arrays), so a small read-ahead
# overlaps them with the training step without holding many in memory.
_READ_OPTIONS = dict(num_threads=2, prefetch_buffer_size=4)


class _RowOfPosition:
    """map_with_index: stream position and slot -> example row (picklable for workers)."""

    def __init__(self, index: mixture.MixtureIndex):
        self.index = index

    def __call__(self, position: int, slot: Any) -> int:
        return self.index.row(position // self.index.epoch_size, int(slot))


class _Features:
    def __init__(self, tokenized: tokenize.TokenizedExamples):
        self.tokenized = tokenized

    def __call__(self, row: int) -> dict[str, np.ndarray]:
        return self.tokenized.features(row)


class BatchIterator:
    """next() -> batch dict; get_state() -> JSON-serialisable dict; set_state(state)."""

    def __init__(self, dataset: grain.MapDataset, fingerprint: dict, num_workers: int):
        self._fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from JSON
        iter_ds = dataset.to_iter_dataset(grain.ReadOptions(**_READ_OPTIONS))
        if num_workers:
            # Worker processes read absl flags: run inside an absl app (flags parsed).
            iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
        self._iterator = iter(iter_ds)

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "fingerprint": self._fingerprint,
            "grain": self._iterator.get_state(),
        }

    def set_state(self, state: dict) -> None:
        """Resumes at the batch after the one last returned when `state` was taken."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DataError(f"not a data iterator state of format {STATE_FORMAT!r}: {state!r:.200}")
        theirs = state["fingerprint"]
        differ = [f"{k} {theirs.get(k)!r:.80} -> {v!r:.80}"
                  for k, v in self._fingerprint.items() if theirs.get(k) != v]
        if differ:
            raise DataError(
                "the saved data iterator state comes from a different input pipeline (saved -> "
                f"now: {'; '.join(differ)}); it resumes only with the same data, mixture, "
                "lengths, seed, batch size and process count"
            )
        self._iterator.set_state(state["grain"])

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close:
            close()


@dataclasses.dataclass
class TrainPipeline:
    iterator: BatchIterator
    report: DataReport
    tasks: tuple[str, ...]  # task names in table order
    batch_size: int  # rows per batch on this process


def _task_contiguous(examples: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Examples regrouped by task (first-appearance order, stable within a task)."""
    by_task: dict[str, list[dict]] = {}
    for e in examples:
        by_task.setdefault(e["task"], []).append(e)
    return [e for rows in by_task.values() for e in rows], {t: len(r) for t, r in by_task.items()}


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top  (only when the caller did not say)

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is outside [0, {process_count})")
    return process_index, process_count


def build_train_pipeline(
    data_cfg: ml_collections.ConfigDict,
    *,
    tokenizer: Any,
    task_types: Sequence[str],
    batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainPipeline:
    """The training pipeline; `batch_size` is global, each process yields its share.

    `data_cfg` has passed `validate_data_config` (build.validate_config runs it once).

    Batch (B = batch_size // process_count, S/T = max source/target length), int32:
      input_ids, attention_mask [B, S]; decoder_input_ids, labels, decoder_attention_mask
      [B, T]; task_ids [B] (index into task_types).
    """
    process_index, process_count = _process_layout(process_index, process_count)
    if batch_size <= 0 or batch_size % process_count:
        raise DataError(
            f"global batch size {batch_size} must be a positive multiple of the "
            f"process count {process_count}"
        )
    task_types = tuple(task_types)
    examples, report = sources.load_examples(data_cfg, "train", task_types)
    examples, sizes = _task_contiguous(examples)
    tokenized = tokenize.tokenize_with_config(examples, tokenizer, data_cfg, task_types, report)

    rates = mixture.mixture_rates(
        sizes, data_cfg.mixture, temperature=data_cfg.mixture_temperature, cap=data_cfg.mixture_cap
    )
    epoch_size = sum(mixture.capped_sizes(sizes, data_cfg.mixture_cap).values())
    counts = mixture.epoch_counts(rates, epoch_size)
    report.mixture = {
        "kind": data_cfg.mixture,
        "rates": rates,
        "epoch_counts": counts,
        "realised_rates": {t: c / epoch_size for t, c in counts.items()},
        "epoch_size": epoch_size,
    }
    starts = np.concatenate([[0], np.cumsum(list(sizes.values()))[:-1]])
    data_seed = seed % 2**32  # grain and numpy seeds are unsigned 32-bit
    index = mixture.MixtureIndex(starts, list(sizes.values()), list(counts.values()), data_seed)

    per_process = batch_size // process_count
    ds = grain.MapDataset.range(epoch_size).shuffle(seed=data_seed).repeat()
    ds = ds.map_with_index(_RowOfPosition(index))
    ds = ds[process_index::process_count]
    ds = ds.map(_Features(tokenized)).batch(per_process, drop_remainder=True)
    fingerprint = {
        "seed": seed,
        "batch_size": batch_size,
        "process_index": process_index,
        "process_count": process_count,
        "task_sizes": sizes,
        "epoch_counts": counts,
        "max_source_length": data_cfg.max_source_length,
        "max_target_length": data_cfg.max_target_length,
        "start_token_id": tokenize.configured_start_token_id(tokenizer, data_cfg),
        "train_decoder_start_id": tokenized.decoder_start_id,
        "num_workers": data_cfg.num_workers,
    }
    report.log()
    return TrainPipeline(
        BatchIterator(ds, fingerprint, data_cfg.num_workers), report, tuple(sizes), per_process
    )
