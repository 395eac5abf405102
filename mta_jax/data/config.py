"""The `config.data` block: every field with its meaning and unit, and its checks."""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

from mta_jax.errors import DataError
from mta_jax.data.examples import ON_BAD_ROW
from mta_jax.data.mixture import MIXTURES

SOURCES = ("synthetic", "jsonl", "tfds")


def get_data_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.source = "synthetic"  # where examples come from: "synthetic" | "jsonl" | "tfds"
    c.train_path = ""  # jsonl: training file in the authors' JSON-lines format
    c.eval_path = ""  # jsonl: evaluation file in the same format
    c.tfds_tasks = ("sst2", "trec", "snli", "squad_qg")  # tfds: registry task names to mix
    c.tfds_data_dir = ""  # tfds: data_dir holding prepared array_record data ("" = tfds default)
    c.tfds_download = False  # tfds: let tfds download and prepare missing data (needs network)
    c.tokenizer = "byt5"  # "byt5" (bytes, no files), T5 tokenizer dir / HF name; "" = caller's own
    c.max_source_length = 40  # input tokens per example, padded/truncated, incl. [START] and EOS
    c.max_target_length = 16  # target tokens per example, padded/truncated, incl. EOS
    c.eval_max_source_length = 0  # input tokens in evaluation and prediction; 0 = max_source_length
    c.train_decoder_start = ""  # training decoder's first input: "" = pad | a token ("<e>") | an id
    c.mixture = "proportional"  # task sampling rates: "proportional" | "equal" | "temperature"
    c.mixture_temperature = 2.0  # temperature T of the "temperature" mixture (rate ~ n^(1/T))
    c.mixture_cap = 0  # examples per task counted when computing rates and epoch size (0 = no cap)
    c.max_examples_per_task = 0  # train examples read per task, first ones (0 = all)
    c.on_bad_row = "error"  # a malformed row: "error" raises naming file/line, "skip" counts it
    c.synthetic_train_size = 20000  # synthetic: training examples generated (more: less memorising)
    c.synthetic_eval_size = 400  # synthetic: evaluation examples generated (inputs disjoint)
    c.synthetic_seed = 0  # synthetic: generator seed (the data, not the training order)
    c.eval_max_examples = 0  # evaluation examples kept per task, first ones (0 = all)
    c.num_workers = 0  # grain worker processes building batches (0 = in the training process)
    c.start_token = False  # prepend a [START] token id to every input (start_token selector)
    c.start_token_id = -1  # the [START] id; -1 = the tokenizer's highest <extra_id_N> sentinel
    return c


def validate_data_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises DataError naming the first config.data field that is missing or invalid."""
    missing = sorted(set(get_data_config().keys()) - set(cfg.keys()))
    if missing:
        raise DataError(f"config.data lacks fields {missing}; start from data.get_data_config()")

    def check(field: str, ok: Callable[[Any], bool], expected: str) -> None:
        try:
            valid = ok(cfg[field])
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise DataError(f"config.data.{field} is {cfg[field]!r}; expected {expected}")

    check("source", lambda v: v in SOURCES, f"one of {SOURCES}")
    check("mixture", lambda v: v in MIXTURES, f"one of {MIXTURES}")
    check("on_bad_row", lambda v: v in ON_BAD_ROW, f"one of {ON_BAD_ROW}")
    check("mixture_temperature", lambda v: v > 0, "> 0")
    for field in ("mixture_cap", "max_examples_per_task", "eval_max_examples", "num_workers",
                  "eval_max_source_length"):
        check(field, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    for field in (
        "max_source_length",
        "max_target_length",
        "synthetic_train_size",
        "synthetic_eval_size",
    ):
        check(field, lambda v: isinstance(v, int) and v > 0, "an integer > 0")
    if cfg.source == "tfds":
        check(
            "tfds_tasks",
            lambda v: not isinstance(v, str) and len(v) > 0,
            "a non-empty tuple of registry task names",
        )
    check("tokenizer", lambda v: isinstance(v, str), "'byt5', a tokenizer path / name, or ''")
    check("train_decoder_start", lambda v: isinstance(v, str) and v == v.strip(),
          "'' (the pad id), a token such as '<e>', or an id in digits")
