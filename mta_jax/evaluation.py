"""Decode an evaluation set, score it with the authors' per-type metrics, and picture routing."""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mta_jax import decoding, metrics, plots
from mta_jax.models import t5 as t5_lib


def generate_texts(decode_fn: Callable, params, eval_set, batch_size: int, tokenizer) -> list[str]:
    """One prediction per example of `eval_set`, in order."""
    out = []
    for batch, examples in eval_set.batches(batch_size):
        tokens = decode_fn(params, jnp.asarray(batch["input_ids"]),
                           jnp.asarray(batch["attention_mask"]), jnp.asarray(batch["task_ids"]))
        out.extend(decoding.decode_texts(np.asarray(tokens), tokenizer)[:len(examples)])
    return out


def routing_table(model: t5_lib.T5, router_fn: Callable, params, eval_set, batch_size: int,
                  num_types: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean adapter weights per task type, averaged over MTA blocks: ([types, E], counts)."""
    plug = model.config.ffn_plug
    total = np.zeros((num_types, plug.num_adapters))
    count = np.zeros(num_types)
    for batch, examples in eval_set.batches(batch_size):
        router = router_fn(params, {k: jnp.asarray(v) for k, v in batch.items()})
        flat = flax.traverse_util.flatten_dict(router["router"])
        weights = np.mean([np.asarray(v[0]) for k, v in flat.items()
                           if k[-1] == "adapter_weights"], axis=0)  # [b, E]
        real = len(examples)
        np.add.at(total, np.asarray(batch["task_ids"])[:real], weights[:real])
        np.add.at(count, np.asarray(batch["task_ids"])[:real], 1)
    return total, count


class Evaluator:
    """Scores, predictions_<step>.jsonl and routing_<step>.png for one stage."""

    def __init__(self, model: t5_lib.T5, eval_set, decode_fn: Callable, tokenizer, *,
                 batch_size: int, task_types: Sequence[str], out_dir: str, name: str):
        self.model, self.eval_set, self.decode_fn = model, eval_set, decode_fn
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.task_types, self.out_dir, self.name = tuple(task_types), out_dir, name
        self.router_fn = jax.jit(lambda p, b: model.apply(
            {"params": p}, b["input_ids"], b["decoder_input_ids"],
            attention_mask=b["attention_mask"], task_ids=b["task_ids"], mutable=["router"])[1])

    def run(self, params, step: int) -> dict[str, float]:
        examples = self.eval_set.examples
        preds = generate_texts(self.decode_fn, params, self.eval_set, self.batch_size, self.tokenizer)
        scores = metrics.score(preds, [e["target"] for e in examples], [e["type"] for e in examples])
        if jax.process_index() == 0:
            write_predictions(os.path.join(self.out_dir, f"predictions_{step}.jsonl"), examples, preds)
            if self.model.config.ffn_plug is not None:
                self._heatmap(params, step)
        return {f"eval/{k}": v for k, v in scores.items()}

    def _heatmap(self, params, step: int) -> None:
        total, count = routing_table(self.model, self.router_fn, params, self.eval_set,
                                     self.batch_size, len(self.task_types))
        seen = count > 0
        c, plug = self.model.config, self.model.config.ffn_plug
        blocks = len(plug.layer_indices("encoder", c.num_layers)) + len(
            plug.layer_indices("decoder", c.n_decoder_layers))
        plots.routing_heatmap(
            total[seen] / count[seen][:, None], [t for t, s in zip(self.task_types, seen) if s],
            os.path.join(self.out_dir, f"routing_{step}.png"),
            title=f"{self.name} step {step}: routing weights per task (mean of {blocks} routed blocks)")


def write_predictions(path: str, examples: Sequence[dict], preds: Sequence[str]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for ex, pred in zip(examples, preds):
            row = {"input": ex["input"], "target": ex["target"], "prediction": pred,
                   "type": ex["type"]}
            if ex.get("task"):
                row["task"] = ex["task"]
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
