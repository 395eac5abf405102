"""The two-stage training loop: `train_and_evaluate(config, workdir)`.

Workdir layout (one folder per stage; a local folder or a gs:// URL, written through storage.py):
    <workdir>/config.json                      the resolved config of the last launch
    <workdir>/summary.json                     per stage: parameter counts, optimizer bytes, scores
    <workdir>/<stage>/checkpoints/<step>/      Orbax: params, opt_state, data_state, extra
    <workdir>/<stage>/metrics.jsonl            one JSON object per logged step / evaluation
    <workdir>/<stage>/events.out.tfevents.*    TensorBoard (tensorboardX, no TensorFlow)
    <workdir>/<stage>/predictions_<step>.jsonl input, target, prediction, type
    <workdir>/<stage>/routing_<step>.png       task x adapter weights
    <workdir>/<stage>/loss.png                 the stage's loss curve
The first process alone writes the shared files (config, summary, metrics, TensorBoard,
predictions, figures); every process writes its own part of each checkpoint, so several hosts
need a workdir they all reach: a gs:// bucket. Restarting the same command resumes from the
newest readable checkpoint of the newest unfinished stage and continues exactly: the data
iterator state is in the checkpoint and each step's dropout key is fold_in(seed, step). What a
stage trains is built by build.py; the step itself is step.py.
"""
from __future__ import annotations

import json
import math
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from mta_jax import build, evaluation, optim, plots, sharding, storage, step as step_lib, train_log
from mta_jax import checkpoint as ckpt_lib
from mta_jax import data as data_lib
from mta_jax.errors import ConfigError, DataError, TrainingError


class Preempted(Exception):
    """SIGTERM arrived: a checkpoint was saved and the run should exit 0."""


# The fields that decide what a stage's checkpoints hold: the shapes of its parameters and of
# its optimizer state. A relaunch on a workdir with checkpoints of a stage must keep the model
# fields and that stage's fields; everything else (steps, learning rate, schedule, evaluation,
# logging, dropout, dtype, data) may change between launches. A data change the saved input
# iterator cannot follow is named when the stage resumes (config.train.reset_data_iterator).
MODEL_FIELDS = (
    "init_from", "variant", "model.vocab_size", "model.d_model", "model.d_kv", "model.d_ff",
    "model.num_layers", "model.num_decoder_layers", "model.num_heads", "model.feed_forward_proj",
    "model.tie_word_embeddings", "model.relative_attention_num_buckets", "model.param_dtype",
    "mta.enabled", "mta.num_adapters", "mta.adapter_kind", "mta.adapter_dim",
    "mta.encoder_layers", "mta.decoder_layers", "mta.selector", "mta.task_types",
    "moe.num_experts", "moe.adapter_dim", "data.tokenizer")
STAGE_FIELDS = {
    "stage1": ("stage1.optimizer", "stage1.trainable"),
    "stage2": ("stage2.optimizer", "stage2.trainable", "mta.num_shared_adapters",
               "mta.gate_hidden_dim"),
}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs config.stages in order under workdir; returns per-stage statistics.

    `<workdir>/config.json` is written when a stage starts training, so a launch refused on
    the way (a different model, data the saved iterator cannot follow, a bad checkpoint)
    leaves the workdir as it was.
    """
    setup = build.make_setup(config)
    check_relaunch(config, workdir)
    root = storage.makedirs(workdir)

    def write_config():  # as a stage starts training
        if jax.process_index() == 0:  # shared files: one writer; every process saves checkpoints
            storage.write_text(root / "config.json", config.to_json_best_effort(indent=2))

    stop_requested = {"flag": False}

    def on_sigterm(signum, frame):
        stop_requested["flag"] = True

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    results = {}
    try:
        for name in config.stages:
            results[name] = StageRun(setup, name, workdir, lambda: stop_requested["flag"],
                                     before_training=write_config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if jax.process_index() == 0:
        path = root / "summary.json"
        if path.exists():  # a launch of fewer stages keeps the others' entries
            results = {**storage.read_json(path), **results}
        storage.write_json(path, results, indent=2, default=float)
    return results


def _field(config, path: str) -> Any:
    """config['a.b'] as plain JSON values (tuples as lists); None where the field is absent."""
    node = config
    for part in path.split("."):
        if part not in node:
            return None
        node = node[part]
    return json.loads(json.dumps(node, default=str))


def _has_checkpoint(directory) -> bool:
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check_relaunch(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Refuses (ConfigError) a launch whose model differs from the checkpoints in `workdir`:
    MODEL_FIELDS, and STAGE_FIELDS of every stage with a checkpoint, must be as saved."""
    root = storage.path(workdir)
    path = root / "config.json"
    trained = [s for s in build.STAGES if _has_checkpoint(root / s / "checkpoints")]
    if not trained or not path.exists():
        return
    saved = storage.read_json(path)
    fields = MODEL_FIELDS + tuple(f for s in trained for f in STAGE_FIELDS[s])
    differ = [f"{f} {_field(saved, f)!r} -> {_field(config, f)!r}" for f in fields
              if _field(saved, f) is not None and _field(saved, f) != _field(config, f)]
    if differ:
        raise ConfigError(
            f"{workdir} holds checkpoints of a different model ({', '.join(trained)}): "
            f"{'; '.join(differ)}. Relaunch with the values in {path}, or use a new --workdir")


class StageRun:
    """One stage of one run: data, checkpoints, metrics, evaluation around the train step."""

    def __init__(self, setup: build.Setup, name: str, workdir: str, stop: Callable[[], bool],
                 before_training: Callable[[], None] = lambda: None):
        self.setup, self.name, self.workdir, self.stop = setup, name, workdir, stop
        self.before_training = before_training
        self.stage = setup.stage(name)
        self.cfg = setup.config[name]
        self.dir = storage.makedirs(storage.path(workdir) / name)
        config = setup.config
        self.pipeline = data_lib.build_train_pipeline(
            config.data, tokenizer=setup.tokenizer, task_types=setup.task_types,
            batch_size=config.train.batch_size, seed=config.seed)
        self.ckpt = ckpt_lib.Checkpointer(self.dir / "checkpoints",
                                          max_to_keep=config.keep_checkpoints,
                                          keep_best_metric="eval/score")
        self.writer = train_log.MetricWriter(self.dir, enabled=jax.process_index() == 0)
        self.params = self.opt_state = None
        self.saved_scores: dict[str, float] = {}  # the restored step's evaluation, if any

    def run(self) -> dict[str, Any]:
        try:
            start = self._restore_or_init()
            counts = optim.count_params(self.stage.abstract_params, self.stage.labels)
            stats = {"stage": self.name, "trainable_params": counts[optim.TRAINABLE],
                     "frozen_params": counts[optim.FROZEN],
                     "opt_state_bytes": optim.tree_bytes(self.opt_state), "start_step": start}
            logging.info("%s: %s; %d trainable / %d frozen parameters; optimizer state %.2f MB "
                         "(params %.2f MB)", self.name, sharding.describe(self.setup.mesh),
                         stats["trainable_params"], stats["frozen_params"],
                         stats["opt_state_bytes"] / 2**20,
                         optim.tree_bytes(self.stage.abstract_params) / 2**20)
            if start >= self.cfg.num_train_steps:
                logging.info("%s: already finished (step %d)", self.name, start)
                return {**stats, **self.saved_scores}
            self.before_training()
            stats.update(self._train(start))
        finally:
            self.ckpt.close()
            self.writer.close()
        self._plot_loss()
        return stats

    def _restore_or_init(self) -> int:
        """Resumes from the newest readable checkpoint, or starts the stage; returns the step."""
        stage = self.stage
        if self.ckpt.latest_step() is not None:
            restored = self.ckpt.restore(params_target=stage.abstract_params,
                                         opt_state_target=stage.abstract_opt_state)
            self.params, self.opt_state = restored.params, restored.opt_state
            self.saved_scores = {k: v for k, v in restored.extra.items() if k.startswith("eval/")}
            if restored.step < self.cfg.num_train_steps:  # a finished stage reads no more data
                self._resume_data(restored)
            self.writer.truncate_after(restored.step)
            logging.info("%s: resumed from step %d", self.name, restored.step)
            return restored.step
        self.writer.truncate_after(0)  # rows of an attempt killed before its first checkpoint
        self.params = build.initial_params(self.setup, stage, self.workdir)
        self.opt_state = jax.jit(stage.tx.init, out_shardings=stage.opt_shardings)(self.params)
        return 0

    def _resume_data(self, restored: ckpt_lib.Restored) -> None:
        """The input iterator continues where the checkpoint's left off, or starts over."""
        if self.setup.config.train.get("reset_data_iterator", False):
            logging.warning("%s: config.train.reset_data_iterator: the data iterator starts "
                            "over at step %d", self.name, restored.step)
            return
        try:
            self.pipeline.iterator.set_state(restored.data_state)
        except DataError as e:
            raise DataError(
                f"{self.name}: cannot resume {self.ckpt.directory}/{restored.step}: {e}. Start a "
                "new --workdir, or add --config.train.reset_data_iterator=True to restart the "
                "data iterator from the beginning of the data") from None

    def _train(self, start: int) -> dict[str, float]:
        config, stage, mesh = self.setup.config, self.stage, self.setup.mesh
        train_step = step_lib.jit_train_step(stage, sharding.batch_sharding(mesh),
                                             grad_accum_steps=config.train.grad_accum_steps)
        evaluator = evaluation.Evaluator.for_config(config, stage.model, self.setup.tokenizer,
                                                    out_dir=self.dir, name=self.name)
        base_rng = step_lib.dropout_key(config.seed, build.STAGES.index(self.name),
                                        config.train.get("rng_impl", "threefry2x32"))
        num_steps = self.cfg.num_train_steps
        progress = train_log.Progress(num_steps, start, self.name, config.progress_bar)
        window = Window()
        scores: dict[str, float] = {}
        try:
            with sharding.mesh_context(mesh, self.setup.rules):
                for step in range(start + 1, num_steps + 1):
                    host_batch = next(self.pipeline.iterator)
                    batch = sharding.shard_batch(
                        {k: v for k, v in host_batch.items() if k != "example_mask"}, mesh)
                    self.params, self.opt_state, out = train_step(
                        self.params, self.opt_state, batch, jax.random.fold_in(base_rng, step))
                    window.add(host_batch, out)
                    if step % config.log_every_steps == 0 or step == num_steps:
                        row = window.summary(stage.schedule(step - 1))
                        self._check_finite(row["loss"], step)
                        self.writer.write(step, row)
                        progress.update(0, loss=f"{row['loss']:.4f}",
                                        ex_s=f"{row['examples_per_sec']:.1f}")
                    progress.update(1)
                    is_eval = step % config.eval_every_steps == 0 or step == num_steps
                    if is_eval:
                        scores = evaluator.run(self.params, step)
                        self.writer.write(step, scores)
                    if is_eval or step % config.checkpoint_every_steps == 0 or self.stop():
                        self._check_finite(out["loss"], step)
                        self._save(step, scores if is_eval else None)
                    if self.stop():
                        self.ckpt.wait()
                        logging.warning("%s: SIGTERM at step %d: checkpoint saved, exiting",
                                        self.name, step)
                        raise Preempted()
        finally:
            progress.close()
        return scores

    def _save(self, step: int, scores) -> None:
        self.writer.flush()  # the rows up to this step outlive a crash, as the checkpoint does
        self.ckpt.save(step, params=self.params, opt_state=self.opt_state,
                       data_state=self.pipeline.iterator.get_state(),
                       extra={"stage": self.name, **(scores or {})}, metrics=scores or None)

    def _check_finite(self, loss, step: int) -> None:
        loss = float(loss)
        if not math.isfinite(loss):
            raise TrainingError(
                f"{self.name}: non-finite loss {loss} at or before step {step}; the last good "
                f"checkpoint is step {self.ckpt.latest_step()} in {self.ckpt.directory}")

    def _plot_loss(self) -> None:
        if jax.process_index() != 0:
            return
        steps, losses = plots.metric_curve(plots.read_metrics_jsonl(self.writer.path), "loss")
        if steps:
            plots.loss_curves({self.name: (steps, losses)}, self.dir / "loss.png",
                              title=f"{self.name} training loss")


class Window:
    """The train steps since the last logged row: their metrics and throughput."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.examples, self.tokens, self.t0, self.metrics = 0, 0, time.perf_counter(), []

    def add(self, host_batch, out) -> None:
        hosts = jax.process_count()
        self.examples += host_batch["input_ids"].shape[0] * hosts
        self.tokens += int(host_batch["attention_mask"].sum()
                           + host_batch["decoder_attention_mask"].sum()) * hosts
        self.metrics.append(out)

    def summary(self, learning_rate) -> dict[str, Any]:
        """The mean of each metric over the window, the learning rate and throughput."""
        outs = jax.device_get(self.metrics)
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        row = {k: float(np.mean([o[k] for o in outs])) if np.ndim(outs[0][k]) == 0
               else np.mean([o[k] for o in outs], axis=0) for k in outs[0]}
        row.pop("target_tokens", None)
        row["learning_rate"] = float(learning_rate)
        row["examples_per_sec"] = self.examples / elapsed
        row["tokens_per_sec"] = self.tokens / elapsed
        self.reset()
        return row
