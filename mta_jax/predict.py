"""Inference: `python -m mta_jax.predict --workdir W [--stage stage2] --input in.jsonl --output out.jsonl`.

Loads the run's config (`W/config.json`), the best checkpoint by eval/score of the stage (else
the latest), decodes every line of the authors' JSON-lines input exactly as evaluation during
training does, and writes `input`, `target`, `prediction`, `type` per line. The workdir, input
and output may each be local or gs://.

From an adapter artifact (`python -m mta_jax.export`) instead of a workdir:
`--adapters DIR [--backbone FOLDER]` (the backbone defaults to DIR/backbone; `--workdir DIR`
finds the artifact too). Tokenisation and decoding are the run's, stored in the artifact; the
tokenizer is the backbone folder's unless the run used the byte tokenizer.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, NamedTuple, Optional

import jax
import ml_collections
from absl import flags, logging

from mta_jax import artifact, build, evaluation, scoring, storage
from mta_jax import artifact_format as fmt
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
flags.DEFINE_string("adapters", None, "An adapter artifact folder (python -m mta_jax.export).")
flags.DEFINE_string("backbone", None,
                    "The artifact's Hugging Face backbone (default: <adapters>/backbone).")
flags.DEFINE_bool("accept_other_backbone", False,
                  "Use a backbone unlike the artifact's on purpose.")
flags.DEFINE_enum("decode", None, ["beam", "greedy"], "Decoding (default: the run's config.eval).")
flags.DEFINE_integer("beam_size", None, "Beams (default: the run's config.eval.beam_size).")
flags.DEFINE_integer("max_decode_length", None, "Generated tokens (default: the run's).")


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = storage.path(workdir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{path} does not exist: --workdir must be a training workdir")
    config = ml_collections.ConfigDict(storage.read_json(path))
    # A run saved before a data field existed reads it at its default.
    for key, value in data_lib.get_data_config().items():
        if key not in config.data:
            config.data[key] = value
    return config


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
    ckpt_dir = storage.path(workdir) / stage / "checkpoints"
    if not ckpt_dir.is_dir():
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


class Predictor(NamedTuple):
    """A trained model and how its run tokenised and decoded, from a workdir or an artifact."""

    model: Any  # models.t5.T5
    params: Any
    tokenizer: Any
    data: ml_collections.ConfigDict  # config.data: lengths, [START] token, on_bad_row
    eval: ml_collections.ConfigDict  # config.eval: decode, beam_size, max_decode_length, ...
    task_types: tuple[str, ...]
    reads_task_type: bool  # False: the start_token selector routes, a line may omit its type


def load_artifact(adapter_dir: str, backbone: Optional[str] = None, *,
                  accept_other_backbone: bool = False) -> Predictor:
    """The Predictor of an adapter artifact on `backbone` (default: <adapter_dir>/backbone)."""
    backbone = backbone or str(storage.path(adapter_dir) / fmt.BACKBONE_DIR)
    model, params = artifact.load_adapters(backbone, adapter_dir,
                                           accept_other_backbone=accept_other_backbone)
    meta = fmt.read_meta(adapter_dir)
    data, task_types, reads_task_type = _artifact_spec(meta)
    tokenizer = data_lib.get_tokenizer(data.tokenizer if data.tokenizer == "byt5" else backbone)
    logging.info("predicting with the adapters in %s on %s", adapter_dir, backbone)
    return Predictor(model, params, tokenizer, data, ml_collections.ConfigDict(meta["eval"]),
                     task_types, reads_task_type)


def _artifact_spec(meta: dict):
    """-> (config.data as the run had it, task types, whether routing reads a line's type),
    from an artifact's mta_config.json."""
    data = data_lib.get_data_config()
    data.update(meta["data"])
    return data, tuple(meta["task_types"]), meta["plug"]["selector"] != "start_token"


def load_predictor(source: str, *, stage: Optional[str] = None, step: Optional[int] = None,
                   backbone: Optional[str] = None, accept_other_backbone: bool = False,
                   artifact_only: bool = False) -> Predictor:
    """From an adapter artifact folder (see load_artifact), else from a training workdir
    (artifact_only: never; a folder that is no artifact is then an error naming its files)."""
    if artifact_only or fmt.is_artifact(source):
        return load_artifact(source, backbone, accept_other_backbone=accept_other_backbone)
    setup, built, params, _ = load_model(source, stage, step)
    return Predictor(built.model, params, setup.tokenizer, setup.config.data, setup.config.eval,
                     setup.task_types, build.reads_task_type(setup.config))


def _input_spec(source: str, from_artifact: bool, stage: Optional[str]):
    """-> (task types, whether routing reads a line's type, config.data.on_bad_row), from the
    run's config.json or the artifact's mta_config.json alone."""
    if from_artifact:
        data, task_types, reads_task_type = _artifact_spec(fmt.read_meta(source))
        return task_types, reads_task_type, data.on_bad_row
    config = load_config(source)
    _stage_of(config, stage)
    return tuple(config.mta.task_types), build.reads_task_type(config), config.data.on_bad_row


def _check_output(path: str) -> None:
    """--output: a file name in an existing folder (gs://: a bucket that exists)."""
    if storage.is_remote(path):
        storage.makedirs(storage.path(path).parent)  # a missing bucket is one line
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--output {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise UserError(f"--output {path} is a folder; give a file name")


def predict_file(source: str, input_path: str, output_path: str, *, stage: Optional[str] = None,
                 step: Optional[int] = None, batch_size: Optional[int] = None,
                 backbone: Optional[str] = None, accept_other_backbone: bool = False,
                 artifact_only: bool = False, decode: Optional[dict] = None) -> dict[str, float]:
    """Writes predictions for every line of `input_path`; returns scores when targets exist.

    source: a training workdir or an adapter artifact folder (load_predictor); decode:
    config.eval fields to change (decode, beam_size, max_decode_length, ...). The stage, the
    output path and every input line are checked before any weight is read.
    """
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch_size must be >= 1; got {batch_size}")
    from_artifact = artifact_only or fmt.is_artifact(source)
    task_types, reads_task_type, on_bad_row = _input_spec(source, from_artifact, stage)
    _check_output(output_path)
    # In start_token mode routing reads the [START] token, so a line may omit its type.
    default_type = None if reads_task_type else task_types[0]
    examples, report = data_lib.read_jsonl(input_path, task_types=task_types,
                                           on_bad_row=on_bad_row,
                                           default_type=default_type, split="predict")
    p = load_predictor(source, stage=stage, step=step, backbone=backbone,
                       accept_other_backbone=accept_other_backbone, artifact_only=from_artifact)
    eval_cfg = ml_collections.ConfigDict(p.eval.to_dict())
    eval_cfg.update({k: v for k, v in (decode or {}).items() if v is not None})
    tokenized = tokenize.tokenize_with_config(examples, p.tokenizer, p.data, p.task_types, report,
                                              inference=True)
    eval_set = data_lib.EvalSet(examples, tokenized, report)
    decode_fn = evaluation.make_decoder(p.model, eval_cfg)
    preds, _, _ = evaluation.generate(decode_fn, p.params, eval_set,
                                      batch_size or eval_cfg.batch_size, p.tokenizer,
                                      len(p.task_types))
    if jax.process_index() == 0:  # several hosts decode the same inputs; one writes
        evaluation.write_predictions(output_path, examples, preds)
    scored = [(pred, ex) for pred, ex in zip(preds, examples) if ex.get("target")]
    if not scored or default_type is not None:
        return {}
    return scoring.score([pred for pred, _ in scored], [ex["target"] for _, ex in scored],
                         [ex["type"] for _, ex in scored],
                         pool_anaphora=eval_cfg.get("pool_anaphora", False))


def main(argv):
    del argv
    F = flags.FLAGS
    source = F.adapters or F.workdir
    for name, value in (("workdir or --adapters", source), ("input", F.input),
                        ("output", F.output)):
        if not value:
            print(f"error: --{name} is required", file=sys.stderr)
            return 1
    cli.quiet_libraries()
    decode = {"decode": F.decode, "beam_size": F.beam_size,
              "max_decode_length": F.max_decode_length}
    with cli.one_line_errors():
        scores = predict_file(source, F.input, F.output, stage=F.stage, step=F.step,
                              batch_size=F.batch_size, backbone=F.backbone,
                              accept_other_backbone=F.accept_other_backbone,
                              artifact_only=bool(F.adapters), decode=decode)
    if scores:
        print(json.dumps(scores, indent=2))
    print(f"wrote {F.output}")
    return 0


if __name__ == "__main__":
    cli.run(main)
