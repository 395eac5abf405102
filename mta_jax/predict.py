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
from absl import flags, logging

from mta_jax import build, evaluation, scoring
from mta_jax import checkpoint as ckpt_lib
from mta_jax import data as data_lib
from mta_jax import cli
from mta_jax.data import tokenize
from mta_jax.errors import CheckpointError, ConfigError, UserError

flags.DEFINE_string("workdir", None, "A training workdir (holds config.json and <stage>/checkpoints).")
flags.DEFINE_string("stage", None, "stage1 | stage2 (default: the last stage of the run).")
flags.DEFINE_string("input", None, "JSON-lines file: input, type (and target, to score).")
flags.DEFINE_string("output", None, "Where to write the predictions (JSON lines).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: best by eval/score, else latest).")
flags.DEFINE_integer("batch_size", None, "Decoding batch (default: config.eval.batch_size).")


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"{path} does not exist: --workdir must be a training workdir")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def _stage_of(config: ml_collections.ConfigDict, stage: Optional[str]) -> str:
    """--stage, checked against the run's stages (default: its last stage)."""
    stages = tuple(config.stages)
    stage = stage or stages[-1]
    if stage not in stages:
        raise ConfigError(f"--stage must be one of this run's stages {stages}; got {stage!r}")
    return stage


def load_model(workdir: str, stage: Optional[str] = None, step: Optional[int] = None):
    """-> (setup, stage, params, step) of a trained run (build.Setup, build.Stage)."""
    config = load_config(workdir)
    stage = _stage_of(config, stage)
    ckpt_dir = os.path.join(workdir, stage, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir}: no checkpoint of {stage} in this workdir")
    setup = build.make_setup(config, training=False)
    built = setup.stage(stage)
    with ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=None, async_save=False,
                               keep_best_metric="eval/score") as ck:
        if not ck.all_steps():
            raise CheckpointError(f"{ckpt_dir}: holds no checkpoint")
        if step is not None and step not in ck.all_steps():
            raise CheckpointError(f"--step {step}: no checkpoint of that step in {ckpt_dir}; "
                                  f"steps there: {ck.all_steps()}")
        step = step if step is not None else (ck.best_step() or None)
        step, params = ck.restore_params(step, params_target=built.abstract_params)
    logging.info("predicting with %s step %d", stage, step)
    return setup, built, params, step


def _check_output(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--output {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise UserError(f"--output {path} is a folder; give a file name")


def predict_file(workdir: str, input_path: str, output_path: str, *, stage: Optional[str] = None,
                 step: Optional[int] = None, batch_size: Optional[int] = None) -> dict[str, float]:
    """Writes predictions for every line of `input_path`; returns scores when targets exist.

    The input file and the output path are checked before any weight is read."""
    config = load_config(workdir)
    _stage_of(config, stage)
    _check_output(output_path)
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch_size must be >= 1; got {batch_size}")
    task_types = tuple(config.mta.task_types)
    # In start_token mode routing reads the [START] token, so a line may omit its type.
    default_type = None if build.reads_task_type(config) else task_types[0]
    examples, report = data_lib.read_jsonl(input_path, task_types=task_types,
                                           on_bad_row=config.data.on_bad_row,
                                           default_type=default_type, split="predict")
    setup, built, params, step = load_model(workdir, stage, step)
    tokenized = tokenize.tokenize_with_config(examples, setup.tokenizer, config.data, task_types,
                                              report)
    eval_set = data_lib.EvalSet(examples, tokenized, report)
    decode_fn = evaluation.make_decoder(built.model, config.eval)
    preds, _, _ = evaluation.generate(decode_fn, params, eval_set,
                                      batch_size or config.eval.batch_size, setup.tokenizer,
                                      len(task_types))
    evaluation.write_predictions(output_path, examples, preds)
    scored = [(p, ex) for p, ex in zip(preds, examples) if ex.get("target")]
    if not scored or default_type is not None:
        return {}
    return scoring.score([p for p, _ in scored], [ex["target"] for _, ex in scored],
                         [ex["type"] for _, ex in scored])


def main(argv):
    del argv
    F = flags.FLAGS
    for name in ("workdir", "input", "output"):
        if not F[name].value:
            print(f"error: --{name} is required", file=sys.stderr)
            return 1
    cli.quiet_libraries()
    with cli.one_line_errors():
        scores = predict_file(F.workdir, F.input, F.output, stage=F.stage, step=F.step,
                              batch_size=F.batch_size)
    if scores:
        print(json.dumps(scores, indent=2))
    print(f"wrote {F.output}")
    return 0


if __name__ == "__main__":
    cli.run(main)
