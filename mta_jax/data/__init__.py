"""Multi-task data: sources, tokenisation, mixtures and the resumable input pipeline.

Sources (config.data.source): the embedded synthetic mixture, the authors' JSON
lines, or registered tensorflow-datasets tasks (`TASKS`). A batch is a dict of
int32 numpy arrays with static shapes (B rows, S = max_source_length,
T = max_target_length):
  input_ids, attention_mask          [B, S]  (mask 1 = token)
  decoder_input_ids                  [B, T]  labels shifted right behind the pad id (in
                                             training: data.train_decoder_start's id)
  labels, decoder_attention_mask     [B, T]  EOS-terminated; mask 1 = a real label
  task_ids                           [B]     index into the run's task types
  example_mask (eval batches only)   [B]     0 for rows that only fill the last batch
"""

from mta_jax.data.config import get_data_config, validate_data_config
from mta_jax.errors import DataError
from mta_jax.task_types import METRIC_BY_TYPE, TASK_TYPES
from mta_jax.data.eval_set import EvalSet, build_eval_set
from mta_jax.data.jsonl import read_jsonl
from mta_jax.data.mixture import epoch_counts, mixture_rates
from mta_jax.data.pipeline import BatchIterator, TrainPipeline, build_train_pipeline
from mta_jax.data.registry import TASKS, Task, TfdsSource, get_task
from mta_jax.data.report import DataReport
from mta_jax.data.synthetic import synthetic_examples
from mta_jax.data.tokenize import get_tokenizer, resolve_start_token_id, train_decoder_start_id

__all__ = [
    "BatchIterator",
    "DataError",
    "DataReport",
    "EvalSet",
    "METRIC_BY_TYPE",
    "TASKS",
    "TASK_TYPES",
    "Task",
    "TfdsSource",
    "TrainPipeline",
    "build_eval_set",
    "build_train_pipeline",
    "epoch_counts",
    "get_data_config",
    "get_task",
    "get_tokenizer",
    "mixture_rates",
    "read_jsonl",
    "resolve_start_token_id",
    "synthetic_examples",
    "train_decoder_start_id",
    "validate_data_config",
]
