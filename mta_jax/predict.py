"""Inference: `python -m mta_jax.predict --workdir W [--stage stage2] --input in.jsonl --output out.jsonl`.

Loads the run's config (`W/config.json`), the best checkpoint by eval/score of the stage (else
the latest), decodes every line of the authors' JSON-lines input exactly as evaluation during
training does, and writes `input`, `target`, `prediction`, `type` per line.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

import ml_collections
from absl import app, flags, logging

from mta_jax import checkpoint as ckpt_lib
from mta_jax.cli import quiet_libraries, user_errors
from mta_jax import data as data_lib
from mta_jax import decoding, evaluation, metrics, sharding, train
from mta_jax.data import tokenize
from mta_jax.models import t5 as t5_lib

flags.DEFINE_string("workdir", None, "A training workdir (holds config.json and <stage>/checkpoints).")
flags.DEFINE_string("stage", None, "stage1 | stage2 (default: the last stage of the run).")
flags.DEFINE_string("input", None, "JSON-lines file: input, type (and target, to score).")
flags.DEFINE_string("output", None, "Where to write the predictions (JSON lines).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: best by eval/score, else latest).")
flags.DEFINE_integer("batch_size", None, "Decoding batch (default: config.eval.batch_size).")


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise train.ConfigError(f"{path} does not exist: --workdir must be a training workdir")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_model(workdir: str, stage: Optional[str] = None, step: Optional[int] = None):
    """-> (config, model, params, step, tokenizer) of a trained run."""
    config = load_config(workdir)
    stage = stage or tuple(config.stages)[-1]
    if stage not in train.STAGES:
        raise train.ConfigError(f"--stage must be one of {train.STAGES}; got {stage!r}")
    ckpt_dir = os.path.join(workdir, stage, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise ckpt_lib.CheckpointError(f"{ckpt_dir}: no checkpoint of {stage} in this workdir")
    init_dir = train.resolve_init_from(config.init_from)
    tokenizer = data_lib.get_tokenizer(config.data.tokenizer or init_dir)
    model = t5_lib.T5(train.model_config(config, stage, len(tokenizer), init_dir))
    mesh = sharding.make_mesh(config.mesh)
    abstract, _ = train._abstract_with_shardings(model, mesh, sharding.logical_rules(config.mesh))
    with ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=None, async_save=False,
                               keep_best_metric="eval/score") as ck:
        if not ck.all_steps():
            raise ckpt_lib.CheckpointError(f"{ckpt_dir}: holds no checkpoint")
        step = step if step is not None else (ck.best_step() or None)
        step, params = ck.restore_params(step, params_target=abstract)
    logging.info("predicting with %s step %d", stage, step)
    return config, model, params, step, tokenizer


def predict_file(workdir: str, input_path: str, output_path: str, *, stage: Optional[str] = None,
                 step: Optional[int] = None, batch_size: Optional[int] = None) -> dict[str, float]:
    """Writes predictions for every line of `input_path`; returns scores when targets exist."""
    config, model, params, step, tokenizer = load_model(workdir, stage, step)
    task_types = tuple(config.mta.task_types)
    plug = model.config.ffn_plug
    # In start_token mode routing reads the [START] token, so a line may omit its type.
    default_type = task_types[0] if plug is not None and plug.selector == "start_token" else None
    examples, report = data_lib.read_jsonl(input_path, task_types=task_types,
                                           on_bad_row=config.data.on_bad_row,
                                           default_type=default_type, split="predict")
    if not examples:
        raise data_lib.DataError(f"{input_path}: no usable example ({report.summary()})")
    tokenized = tokenize.tokenize_with_config(examples, tokenizer, config.data, task_types, report)
    eval_set = data_lib.EvalSet(examples, tokenized, report)
    e = config.eval
    decode_fn = decoding.make_decoder(model, method=e.decode, max_length=e.max_decode_length,
                                      beam_size=e.beam_size, length_penalty=e.length_penalty)
    preds = evaluation.generate_texts(decode_fn, params, eval_set, batch_size or e.batch_size,
                                      tokenizer)
    evaluation.write_predictions(output_path, examples, preds)
    scored = [(p, ex) for p, ex in zip(preds, examples) if ex.get("target")]
    if not scored or default_type is not None:
        return {}
    return metrics.score([p for p, _ in scored], [ex["target"] for _, ex in scored],
                         [ex["type"] for _, ex in scored])


def main(argv):
    del argv
    F = flags.FLAGS
    for name in ("workdir", "input", "output"):
        if not F[name].value:
            print(f"error: --{name} is required", file=sys.stderr)
            return 1
    quiet_libraries()
    try:
        scores = predict_file(F.workdir, F.input, F.output, stage=F.stage, step=F.step,
                              batch_size=F.batch_size)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if scores:
        print(json.dumps(scores, indent=2))
    print(f"wrote {F.output}")
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
