"""Inference: `python -m mta_jax.predict --workdir W [--stage stage2] --input in.jsonl --output out.jsonl`.

Loads the run's config (`W/config.json`), the best checkpoint by eval/score of the stage (else
the latest), decodes every line of the authors' JSON-lines input exactly as evaluation during
training does, and writes `input`, `target`, `prediction`, `type` per line. The workdir, input
and output may each be local or gs://.
"""
from __future__ import annotations

import json
import sys
from typing import Optional

import jax
import ml_collections
from absl import app, flags, logging

from mta_jax import build, evaluation, scoring, storage
from mta_jax import checkpoint as ckpt_lib
from mta_jax import data as data_lib
from mta_jax import cli
from mta_jax.data import tokenize
from mta_jax.errors import CheckpointError, ConfigError

flags.DEFINE_string("workdir", None, "A training workdir (holds config.json and <stage>/checkpoints).")
flags.DEFINE_string("stage", None, "stage1 | stage2 (default: the last stage of the run).")
flags.DEFINE_string("input", None, "JSON-lines file: input, type (and target, to score).")
flags.DEFINE_string("output", None, "Where to write the predictions (JSON lines).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: best by eval/score, else latest).")
flags.DEFINE_integer("batch_size", None, "Decoding batch (default: config.eval.batch_size).")


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = storage.path(workdir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{path} does not exist: --workdir must be a training workdir")
    return ml_collections.ConfigDict(storage.read_json(path))


def load_model(workdir: str, stage: Optional[str] = None, step: Optional[int] = None):
    """-> (setup, stage, params, step) of a trained run (build.Setup, build.Stage)."""
    config = load_config(workdir)
    stage = stage or tuple(config.stages)[-1]
    if stage not in build.STAGES:
        raise ConfigError(f"--stage must be one of {build.STAGES}; got {stage!r}")
    ckpt_dir = storage.path(workdir) / stage / "checkpoints"
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: no checkpoint of {stage} in this workdir")
    setup = build.make_setup(config, training=False)
    built = setup.stage(stage)
    with ckpt_lib.Checkpointer(ckpt_dir, max_to_keep=None, async_save=False,
                               keep_best_metric="eval/score") as ck:
        if not ck.all_steps():
            raise CheckpointError(f"{ckpt_dir}: holds no checkpoint")
        step = step if step is not None else (ck.best_step() or None)
        step, params = ck.restore_params(step, params_target=built.abstract_params)
    logging.info("predicting with %s step %d", stage, step)
    return setup, built, params, step


def predict_file(workdir: str, input_path: str, output_path: str, *, stage: Optional[str] = None,
                 step: Optional[int] = None, batch_size: Optional[int] = None) -> dict[str, float]:
    """Writes predictions for every line of `input_path`; returns scores when targets exist."""
    storage.makedirs(storage.path(output_path).parent)  # a missing bucket fails before decoding
    setup, built, params, step = load_model(workdir, stage, step)
    config, task_types = setup.config, setup.task_types
    # In start_token mode routing reads the [START] token, so a line may omit its type.
    default_type = None if build.reads_task_type(config) else task_types[0]
    examples, report = data_lib.read_jsonl(input_path, task_types=task_types,
                                           on_bad_row=config.data.on_bad_row,
                                           default_type=default_type, split="predict")
    tokenized = tokenize.tokenize_with_config(examples, setup.tokenizer, config.data, task_types,
                                              report)
    eval_set = data_lib.EvalSet(examples, tokenized, report)
    decode_fn = evaluation.make_decoder(built.model, config.eval)
    preds, _, _ = evaluation.generate(decode_fn, params, eval_set,
                                      batch_size or config.eval.batch_size, setup.tokenizer,
                                      len(task_types))
    if jax.process_index() == 0:  # several hosts decode the same inputs; one writes
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
    app.run(lambda argv: sys.exit(main(argv)))
