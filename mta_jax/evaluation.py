"""Decode an evaluation set, score it with the authors' per-type metrics, and picture routing.

One pass through the model per evaluation: the decoder returns each example's routing
weights beside its tokens (`decoding.make_decoder(..., routing=True)`), and the heatmap of
mean weights per task type is drawn from those.
"""
from __future__ import annotations

import json
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mta_jax import data as data_lib
from mta_jax import decoding, plots, scoring, storage
from mta_jax.models import t5 as t5_lib


def make_decoder(model: t5_lib.T5, eval_config) -> Callable:
    """The jitted decoder of `config.eval` (beam or greedy, max length, length penalty):
    (params, input_ids, attention_mask, task_ids) -> (tokens, routing weights | None)."""
    e = eval_config
    return decoding.make_decoder(model, method=e.decode, max_length=e.max_decode_length,
                                 beam_size=e.beam_size, length_penalty=e.length_penalty,
                                 routing=True)


def generate(decode_fn: Callable, params, eval_set, batch_size: int, tokenizer,
             num_types: int) -> tuple[list[str], Optional[np.ndarray], np.ndarray]:
    """(one prediction per example of `eval_set` in order, the summed routing weights per task
    type [num_types, E] (None when no block routes), the examples per type [num_types]).

    `decode_fn` is a decoder of `make_decoder`.
    """
    texts, total, count = [], None, np.zeros(num_types)
    for batch, examples in eval_set.batches(batch_size):
        tokens, weights = decode_fn(params, jnp.asarray(batch["input_ids"]),
                                    jnp.asarray(batch["attention_mask"]),
                                    jnp.asarray(batch["task_ids"]))
        real = len(examples)
        texts.extend(decoding.decode_texts(_on_host(tokens), tokenizer)[:real])
        if weights is not None:
            task_ids = np.asarray(batch["task_ids"])[:real]
            if total is None:
                total = np.zeros((num_types, weights.shape[-1]))
            np.add.at(total, task_ids, _on_host(weights)[:real])
            np.add.at(count, task_ids, 1)
    return texts, total, count


def _on_host(x: jax.Array) -> np.ndarray:
    """A decoder output as numpy. With several processes it lies on devices of every host (the
    parameters do): gather it, so that each process holds the whole batch."""
    if not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def write_predictions(path: str, examples: Sequence[dict], preds: Sequence[str]) -> None:
    """One JSON line per example: input, target, prediction, type (and task); local or gs://."""
    with storage.open_atomic(path) as f:
        for ex, pred in zip(examples, preds):
            row = {"input": ex["input"], "target": ex["target"], "prediction": pred,
                   "type": ex["type"]}
            if ex.get("task"):
                row["task"] = ex["task"]
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


class Evaluator:
    """Scores, predictions_<step>.jsonl and routing_<step>.png for one stage."""

    def __init__(self, eval_set, decode_fn: Callable, tokenizer, *, batch_size: int,
                 task_types: Sequence[str], out_dir: str, name: str,
                 pool_anaphora: bool = False):
        self.eval_set, self.decode_fn, self.tokenizer = eval_set, decode_fn, tokenizer
        self.batch_size, self.task_types = batch_size, tuple(task_types)
        self.out_dir, self.name = storage.path(out_dir), name
        self.pool_anaphora = pool_anaphora  # scoring.score: anaphora_resolution as classify

    @classmethod
    def for_config(cls, config, model: t5_lib.T5, tokenizer, *, out_dir: str,
                   name: str) -> "Evaluator":
        """The eval set of `config.data`, decoded as `config.eval` says."""
        task_types = tuple(config.mta.task_types)
        eval_set = data_lib.build_eval_set(config.data, tokenizer=tokenizer, task_types=task_types)
        return cls(eval_set, make_decoder(model, config.eval), tokenizer,
                   batch_size=config.eval.batch_size, task_types=task_types, out_dir=out_dir,
                   name=name, pool_anaphora=config.eval.get("pool_anaphora", False))

    def run(self, params, step: int) -> dict[str, float]:
        examples = self.eval_set.examples
        preds, total, count = generate(self.decode_fn, params, self.eval_set, self.batch_size,
                                       self.tokenizer, num_types=len(self.task_types))
        scores = scoring.score(preds, [e["target"] for e in examples],
                               [e["type"] for e in examples], pool_anaphora=self.pool_anaphora)
        if jax.process_index() == 0:
            write_predictions(self.out_dir / f"predictions_{step}.jsonl", examples, preds)
            if total is not None:
                seen = count > 0
                plots.routing_heatmap(
                    total[seen] / count[seen][:, None],
                    [t for t, s in zip(self.task_types, seen) if s],
                    self.out_dir / f"routing_{step}.png",
                    title=f"{self.name} step {step}: routing weights per task "
                          "(mean over the routed blocks)")
        logging.info("%s step %d: %s", self.name, step,
                     ", ".join(f"{k}={v:.4f}" for k, v in scores.items() if k.endswith("score")))
        return {f"eval/{k}": v for k, v in scores.items()}
