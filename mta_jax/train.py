"""The two-stage training driver: `train_and_evaluate(config, workdir)`.

Workdir layout (one folder per stage):
    <workdir>/config.json                      the resolved config of the last launch
    <workdir>/<stage>/checkpoints/<step>/      Orbax: params, opt_state, data_state, extra
    <workdir>/<stage>/metrics.jsonl            one JSON object per logged step / evaluation
    <workdir>/<stage>/events.out.tfevents.*    TensorBoard (tensorboardX, no TensorFlow)
    <workdir>/<stage>/predictions_<step>.jsonl input, target, prediction, type
    <workdir>/<stage>/routing_<step>.png       task x adapter weights
    <workdir>/<stage>/loss.png                 the stage's loss curve
Restarting the same command resumes from the newest readable checkpoint of the newest
unfinished stage and continues exactly: the data iterator state is in the checkpoint and each
step's dropout key is fold_in(seed, step).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mta_jax import checkpoint as ckpt_lib
from mta_jax import data as data_lib
from mta_jax import decoding, evaluation, hf, optim, plots, sharding
from mta_jax.models import mta as mta_lib
from mta_jax.models import variants
from mta_jax.models import t5 as t5_lib

STAGES = ("stage1", "stage2")


class ConfigError(ValueError):
    """A config value that cannot work; the message names `config.<field>`."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the step."""


class Preempted(Exception):
    """SIGTERM arrived: a checkpoint was saved and the run should exit 0."""


# ----------------------------------------------------------------------------- config

def _fail(field: str, rule: str, value: Any):
    raise ConfigError(f"config.{field} must be {rule}; got {value!r}")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks everything that can be checked before anything heavy runs."""
    stages = tuple(config.stages)
    if not stages or any(s not in STAGES for s in stages) or list(stages) != sorted(set(stages)):
        _fail("stages", f"a non-empty ordered subset of {STAGES}", stages)
    if not config.mta.enabled and "stage2" in stages:
        _fail("stages", "('stage1',) when config.mta.enabled is False (stage two trains MTA)", stages)
    for stage in stages:
        s = config[stage]
        if s.num_train_steps < 1:
            _fail(f"{stage}.num_train_steps", ">= 1", s.num_train_steps)
        if not s.learning_rate > 0:
            _fail(f"{stage}.learning_rate", "> 0", s.learning_rate)
        if s.optimizer not in ("adamw", "adafactor"):
            _fail(f"{stage}.optimizer", "'adamw' or 'adafactor'", s.optimizer)
        if s.schedule not in ("constant", "linear", "cosine", "rsqrt"):
            _fail(f"{stage}.schedule", "'constant', 'linear', 'cosine' or 'rsqrt'", s.schedule)
        try:
            import re
            re.compile(s.trainable)
        except re.error as e:
            _fail(f"{stage}.trainable", f"a valid regular expression ({e})", s.trainable)
    b = config.train.batch_size
    if b < 1:
        _fail("train.batch_size", ">= 1", b)
    if config.train.grad_accum_steps < 1 or b % config.train.grad_accum_steps:
        _fail("train.grad_accum_steps", f">= 1 and a divisor of train.batch_size={b}",
              config.train.grad_accum_steps)
    for field in ("checkpoint_every_steps", "eval_every_steps", "log_every_steps"):
        if config[field] < 1:
            _fail(field, ">= 1", config[field])
    if config.eval.decode not in ("beam", "greedy"):
        _fail("eval.decode", "'beam' or 'greedy'", config.eval.decode)
    if config.eval.batch_size < 1 or config.eval.max_decode_length < 1 or config.eval.beam_size < 1:
        _fail("eval", "batch_size, max_decode_length and beam_size >= 1", dict(config.eval))
    if config.init_from and not os.path.isdir(config.init_from) and os.path.sep in config.init_from \
            and not config.init_from.count("/") == 1:
        _fail("init_from", "an existing Hugging Face folder or a hub name such as 't5-base'",
              config.init_from)
    for stage in stages:
        variants.ffn_plug(config, stage)  # MTAConfigError names the mta / moe field
    data_lib.validate_data_config(config.data)
    if config.data.source == "jsonl":
        for field in ("train_path", "eval_path"):
            path = config.data[field]
            if not path or not os.path.exists(path):
                _fail(f"data.{field}", "an existing JSON-lines file (data.source = 'jsonl')", path)


def _layers(spec: str) -> Any:
    spec = str(spec).strip()
    if spec in ("all", "last", "none"):
        return spec
    try:
        return tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise mta_lib.MTAConfigError(
            f"mta layers must be 'all', 'last', 'none' or comma-separated block indices; got {spec!r}")


def mta_config(config, stage: str) -> Optional[mta_lib.MTAConfig]:
    t = config.mta
    if not t.enabled:
        return None
    stage_two = stage == "stage2"
    return mta_lib.MTAConfig(
        num_adapters=t.num_adapters, adapter_kind=t.adapter_kind, adapter_dim=t.adapter_dim,
        encoder_layers=_layers(t.encoder_layers), decoder_layers=_layers(t.decoder_layers),
        selector=t.selector, temperature=t.temperature, init_base=t.init_base,
        init_bias=t.init_bias, top_k=t.top_k if stage_two else None,
        renormalize=t.renormalize,
        topk_compute=t.get("topk_compute", "dense"),  # absent from workdirs before 2026-11-22
        num_shared_adapters=t.num_shared_adapters if stage_two else 0,
        gate_hidden_dim=t.gate_hidden_dim, task_types=tuple(t.task_types),
        selector_loss_weight=t.selector_loss_weight)


def resolve_init_from(name: str) -> str:
    """A local folder as is; a hub name through huggingface_hub (cached, safetensors only)."""
    if not name or os.path.isdir(name):
        return name
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model"])
    except Exception as e:  # offline, unknown repo, no safetensors ...
        raise ConfigError(f"config.init_from={name!r} is not a local folder and could not be "
                          f"fetched from the Hugging Face hub ({type(e).__name__}: {e})") from e


def model_config(config, stage: str, vocab_size: int, init_dir: str) -> t5_lib.T5Config:
    m = config.model
    plug = variants.ffn_plug(config, stage)
    common = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                  dropout_rate=m.dropout_rate, ffn_plug=plug)
    if init_dir:
        base = hf.read_config(init_dir, **common)
        tied = not os.path.exists(os.path.join(init_dir, "model.safetensors")) or \
            "lm_head.weight" not in hf.read_weights(init_dir)[0]
        return base.replace(tie_word_embeddings=tied)
    vocab = m.vocab_size or int(math.ceil(vocab_size / 128) * 128)
    if vocab < vocab_size:
        _fail("model.vocab_size", f">= the tokenizer's size {vocab_size}", m.vocab_size)
    return t5_lib.T5Config(
        vocab_size=vocab, d_model=m.d_model, d_kv=m.d_kv, d_ff=m.d_ff, num_layers=m.num_layers,
        num_decoder_layers=m.num_decoder_layers or None, num_heads=m.num_heads,
        relative_attention_num_buckets=m.relative_attention_num_buckets,
        relative_attention_max_distance=m.relative_attention_max_distance,
        feed_forward_proj=m.feed_forward_proj, tie_word_embeddings=m.tie_word_embeddings,
        scale_decoder_outputs=m.tie_word_embeddings, **common)


# ----------------------------------------------------------------------------- the step

def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits: float32 [b, t, vocab]; labels, mask: [b, t] -> (summed NLL, token count)."""
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def _router_metrics(router: Mapping) -> dict[str, jax.Array]:
    """Per MTA layer [b, E] weights -> usage per adapter, confidence, gate share (flaxformer's
    `expert_usage` / `router_confidence`, averaged over the MTA layers)."""
    flat = flax.traverse_util.flatten_dict(dict(router))
    out = {}
    for name, key in (("adapter_weights", "router/adapter_usage"), ("gate_weights", "router/gate")):
        values = [v[0] if isinstance(v, tuple) else v for k, v in flat.items() if k[-1] == name]
        if values:
            w = jnp.mean(jnp.stack([jnp.mean(v, axis=0) for v in values]), axis=0)
            out[key] = w
            if name == "adapter_weights":
                out["router/confidence"] = jnp.mean(jnp.stack([jnp.mean(jnp.max(v, -1)) for v in values]))
    # Scalar statistics a plug sows (Switch MoE: load_balancing_loss, router_z_loss,
    # fraction_tokens_left_behind, ...): logged as router/<name>, averaged over the layers.
    scalars: dict[str, list] = {}
    for k, v in flat.items():
        v = v[0] if isinstance(v, tuple) else v
        if jnp.ndim(v) == 0:
            scalars.setdefault(k[-1], []).append(v)
    for name, values in scalars.items():
        out.setdefault(f"router/{name}", jnp.mean(jnp.stack(values)))
    return out


def make_loss_fn(model: t5_lib.T5):
    def loss_fn(params, batch, rng, denominator):
        logits, state = model.apply(
            {"params": params}, batch["input_ids"], batch["decoder_input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_attention_mask=batch["decoder_attention_mask"], task_ids=batch["task_ids"],
            deterministic=False, rngs={"dropout": rng}, mutable=["router", "losses"])
        nll, ntok = cross_entropy(logits, batch["labels"], batch["decoder_attention_mask"])
        # Auxiliary losses (selector supervision, load balancing, z-loss) are sown weighted.
        aux = sum((jnp.sum(x) for x in jax.tree_util.tree_leaves(state.get("losses", {}))),
                  jnp.zeros(()))
        loss = nll / denominator + aux
        return loss, (nll, ntok, aux, _router_metrics(state.get("router", {})))
    return loss_fn


def state_donation() -> tuple[int, ...]:
    """`donate_argnums` for a train step (params, opt_state, batch, rng).

    On accelerators the parameters and optimizer state are donated, so the step updates them
    in place. XLA CPU (jax 0.10) instead copies every donated buffer at the start of the
    step: no memory saved, and a T5-small step 5-9% slower (README, Benchmarks), so there
    nothing is donated.
    """
    return () if jax.default_backend() == "cpu" else (0, 1)


def make_train_step(model: t5_lib.T5, tx: optax.GradientTransformation, trainable: frozenset,
                    *, grad_accum_steps: int = 1):
    """(params, opt_state, batch, rng) -> (params, opt_state, metrics).

    Gradients are taken with respect to the `trainable` leaves only: the frozen subtree is a
    constant of the loss, so no backward pass runs into it beyond what the trainable leaves
    need. Frozen leaves come out of the step bitwise unchanged.
    """
    loss_fn = make_loss_fn(model)

    def step(params, opt_state, batch, rng):
        train_p, frozen_p = optim.split_params(params, trainable)
        denominator = jnp.maximum(jnp.sum(batch["decoder_attention_mask"]).astype(jnp.float32), 1.0)

        def micro_loss(tp, micro, micro_rng):
            return loss_fn(optim.merge_params(tp, frozen_p), micro, micro_rng, denominator)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        if grad_accum_steps == 1:
            (loss, (nll, ntok, aux, router)), grads = grad_fn(train_p, batch, rng)
        else:
            micro = jax.tree_util.tree_map(
                lambda x: x.reshape((grad_accum_steps, -1) + x.shape[1:]), batch)

            def body(carry, xs):
                acc, i = carry
                (l, (n, t, a, r)), g = grad_fn(train_p, xs, jax.random.fold_in(rng, i))
                acc = jax.tree_util.tree_map(jnp.add, acc, (g, l, n, t, a))
                return (acc, i + 1), r

            zeros = (jax.tree_util.tree_map(jnp.zeros_like, train_p),) + (jnp.zeros(()),) * 4
            ((grads, loss, nll, ntok, aux), _), routers = jax.lax.scan(body, (zeros, 0), micro)
            aux = aux / grad_accum_steps
            router = jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), routers)
        # multi_transform sees the whole tree; frozen leaves get zeros it never reads.
        full_grads = optim.merge_params(grads, jax.tree_util.tree_map(jnp.zeros_like, frozen_p))
        updates, opt_state = tx.update(full_grads, opt_state, params)
        upd_train, _ = optim.split_params(updates, trainable)
        new_train = optax.apply_updates(train_p, upd_train)
        params = optim.merge_params(new_train, frozen_p)
        out = {"loss": nll / jnp.maximum(ntok, 1.0), "total_loss": loss, "aux_loss": aux,
               "grad_norm": optax.global_norm(grads), "target_tokens": ntok, **router}
        return params, opt_state, out

    return step


# ----------------------------------------------------------------------------- logging

class MetricWriter:
    """metrics.jsonl + TensorBoard event files (tensorboardX: no TensorFlow)."""

    def __init__(self, directory: str, enabled: bool = True):
        self.path = os.path.join(directory, "metrics.jsonl")
        self.enabled = enabled
        self._tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(directory, flush_secs=30)
            except ImportError:  # TensorBoard is optional; metrics.jsonl is not.
                logging.warning("tensorboardX is not installed: no TensorBoard event files")

    def write(self, step: int, row: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {"step": int(step)}
        for k, v in row.items():
            v = np.asarray(v)
            clean[k] = v.item() if v.ndim == 0 else [round(float(x), 6) for x in v.ravel()]
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if k == "step":
                    continue
                if isinstance(v, list):
                    for i, x in enumerate(v):
                        self._tb.add_scalar(f"{k}/{i}", x, step)
                elif isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows a crashed run wrote after its last checkpoint."""
        if not (self.enabled and os.path.exists(self.path)):
            return
        with open(self.path) as f:
            rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(rows)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A tqdm bar with examples/s and ETA; silent when disabled or not the first host."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.bar = None
        if enabled and jax.process_index() == 0:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                            dynamic_ncols=True, mininterval=1.0)

    def update(self, n: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- a stage

@dataclasses.dataclass
class StageSetup:
    name: str
    dir: str
    model: t5_lib.T5
    mesh: Any
    param_shardings: Any
    abstract_params: Any
    tx: optax.GradientTransformation
    schedule: Callable
    labels: Any



def _abstract_with_shardings(model, mesh, rules):
    boxed = jax.eval_shape(lambda: t5_lib.init_params(model, jax.random.PRNGKey(0)))
    shardings = sharding.param_shardings(boxed, mesh, rules)
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings)
    sharding.check_param_divisibility(nn.unbox(boxed), shardings, mesh)
    return abstract, shardings


def _opt_abstract(tx, abstract_params, mesh, param_shardings):
    opt_shape = jax.eval_shape(tx.init, abstract_params)
    shardings = sharding.opt_state_shardings(opt_shape, param_shardings, mesh)
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_shape, shardings), shardings


def initial_params(config, stage: str, setup: StageSetup, workdir: str, init_dir: str):
    """Stage one: Hugging Face weights (+ MTA from the FFN) or random. Stage two: stage one's
    final checkpoint converted by mta.stage_two_params."""
    rng = jax.random.PRNGKey(config.seed)
    model = setup.model
    if stage == "stage1":
        if init_dir:
            tensors, origin = hf.read_weights(init_dir)
            backbone = hf.hf_to_backbone(tensors, model.config, origin)
            host = hf.assemble_params(model, backbone, rng=rng)
        else:
            host = nn.unbox(jax.jit(lambda r: t5_lib.init_params(model, r))(rng))
        return jax.device_put(host, setup.param_shardings)

    src = config.stage2.init_checkpoint or os.path.join(workdir, "stage1", "checkpoints")
    stage1_model = t5_lib.T5(model.config.replace(ffn_plug=mta_config(config, "stage1")))
    s1_abstract, _ = _abstract_with_shardings(stage1_model, setup.mesh,
                                             sharding.logical_rules(config.mesh))
    if not os.path.isdir(src):
        raise ConfigError(f"stage two starts from stage one's checkpoint, but {src} does not exist: "
                          "run stage1 first or set config.stage2.init_checkpoint")
    with ckpt_lib.Checkpointer(src, max_to_keep=None, async_save=False) as ck:
        step, stage1_params = ck.restore_params(params_target=s1_abstract)
    logging.info("stage two starts from %s step %d", src, step)
    pretrained = None
    if init_dir and model.config.ffn_plug.adapter_kind == "ffn":
        tensors, origin = hf.read_weights(init_dir)
        pretrained = hf.hf_to_backbone(tensors, model.config, origin)
    converted = mta_lib.stage_two_params(stage1_params, model, jax.random.fold_in(rng, 2),
                                         pretrained=pretrained)
    return jax.device_put(converted, setup.param_shardings)


def run_stage(config, workdir: str, stage: str, *, tokenizer, init_dir: str,
              stop: Callable[[], bool]) -> dict[str, Any]:
    stage_cfg = config[stage]
    stage_dir = os.path.join(workdir, stage)
    os.makedirs(stage_dir, exist_ok=True)
    task_types = tuple(config.mta.task_types)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config.mesh)
    sharding.check_batch_size(config.train.batch_size, mesh)
    vocab = len(tokenizer)
    model = t5_lib.T5(model_config(config, stage, vocab, init_dir))
    abstract, p_shardings = _abstract_with_shardings(model, mesh, rules)
    labels = optim.param_labels(abstract, stage_cfg.trainable)
    trainable = optim.trainable_keys(labels)
    if not trainable:
        _fail(f"{stage}.trainable", "a regex that matches at least one parameter path", stage_cfg.trainable)
    tx, schedule = optim.make_optimizer(stage_cfg, stage_cfg.num_train_steps, labels)
    opt_abstract, o_shardings = _opt_abstract(tx, abstract, mesh, p_shardings)
    setup = StageSetup(stage, stage_dir, model, mesh, p_shardings, abstract, tx, schedule, labels)

    counts = optim.count_params(abstract, labels)
    logging.info("%s: %s; %d trainable / %d frozen parameters; optimizer state %.2f MB "
                 "(params %.2f MB)", stage, sharding.describe(mesh), counts["trainable"],
                 counts["frozen"], optim.tree_bytes(opt_abstract) / 2**20,
                 optim.tree_bytes(abstract) / 2**20)

    # Data.
    pipeline = data_lib.build_train_pipeline(
        config.data, tokenizer=tokenizer, task_types=task_types,
        batch_size=config.train.batch_size, seed=config.seed)
    eval_set = data_lib.build_eval_set(config.data, tokenizer=tokenizer, task_types=task_types)

    # Resume or start.
    ckpt = ckpt_lib.Checkpointer(os.path.join(stage_dir, "checkpoints"),
                                 max_to_keep=config.keep_checkpoints, keep_best_metric="eval/score")
    writer = MetricWriter(stage_dir, enabled=jax.process_index() == 0)
    start = 0
    if ckpt.latest_step() is not None:
        restored = ckpt.restore(params_target=abstract, opt_state_target=opt_abstract)
        params, opt_state, start = restored.params, restored.opt_state, restored.step
        pipeline.iterator.set_state(restored.data_state)
        writer.truncate_after(start)
        logging.info("%s: resumed from step %d", stage, start)
    else:
        params = initial_params(config, stage, setup, workdir, init_dir)
        opt_state = jax.jit(tx.init, out_shardings=o_shardings)(params)
    stats = {"stage": stage, "trainable_params": counts["trainable"],
             "frozen_params": counts["frozen"], "opt_state_bytes": optim.tree_bytes(opt_state),
             "start_step": start}
    if start >= stage_cfg.num_train_steps:
        logging.info("%s: already finished (step %d)", stage, start)
        ckpt.close()
        writer.close()
        return stats

    b_sharding = sharding.batch_sharding(mesh)
    step_fn = make_train_step(model, tx, trainable, grad_accum_steps=config.train.grad_accum_steps)
    train_step = jax.jit(step_fn, in_shardings=(p_shardings, o_shardings, b_sharding, None),
                         out_shardings=(p_shardings, o_shardings, None),
                         donate_argnums=state_donation())
    e = config.eval
    decode_fn = decoding.make_decoder(model, method=e.decode, max_length=e.max_decode_length,
                                      beam_size=e.beam_size, length_penalty=e.length_penalty)
    mta = model.config.ffn_plug
    evaluator = evaluation.Evaluator(
        model, eval_set, decode_fn, tokenizer, batch_size=e.batch_size, task_types=task_types,
        out_dir=stage_dir, name=stage)
    base_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), STAGES.index(stage))
    num_steps = stage_cfg.num_train_steps
    progress = Progress(num_steps, start, stage, config.progress_bar)
    window = {"examples": 0, "tokens": 0, "t0": time.perf_counter(), "metrics": []}
    eval_scores: dict[str, float] = {}

    def save(step, scores=None):
        ckpt.save(step, params=params, opt_state=opt_state,
                  data_state=pipeline.iterator.get_state(),
                  extra={"stage": stage, **(scores or {})}, metrics=scores or None)

    try:
        with sharding.mesh_context(mesh, rules):
            for step in range(start + 1, num_steps + 1):
                host_batch = next(pipeline.iterator)
                if mta is not None and mta.selector == "task":
                    mta_lib.check_task_ids(host_batch["task_ids"], mta)
                batch = sharding.shard_batch(
                    {k: v for k, v in host_batch.items() if k != "example_mask"}, mesh)
                params, opt_state, out = train_step(params, opt_state, batch,
                                                    jax.random.fold_in(base_rng, step))
                window["examples"] += host_batch["input_ids"].shape[0] * jax.process_count()
                window["tokens"] += int(host_batch["attention_mask"].sum() +
                                        host_batch["decoder_attention_mask"].sum()) * jax.process_count()
                window["metrics"].append(out)
                if step % config.log_every_steps == 0 or step == num_steps:
                    row = _summarise(window, schedule(step - 1))
                    if not math.isfinite(row["loss"]):
                        raise TrainingError(
                            f"{stage}: non-finite loss {row['loss']} at or before step {step}; the "
                            f"last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")
                    writer.write(step, row)
                    progress.update(0, loss=f"{row['loss']:.4f}",
                                    ex_s=f"{row['examples_per_sec']:.1f}")
                progress.update(1)
                is_eval = step % config.eval_every_steps == 0 or step == num_steps
                if is_eval:
                    eval_scores = evaluator.run(params, step)
                    writer.write(step, eval_scores)
                    logging.info("%s step %d: %s", stage, step,
                                 ", ".join(f"{k}={v:.4f}" for k, v in eval_scores.items()
                                           if k.endswith("score")))
                if is_eval or step % config.checkpoint_every_steps == 0:
                    _check_finite(out, stage, step, ckpt)
                    save(step, eval_scores if is_eval else None)
                if stop():
                    _check_finite(out, stage, step, ckpt)
                    save(step)
                    ckpt.wait()
                    logging.warning("%s: SIGTERM at step %d: checkpoint saved, exiting", stage, step)
                    raise Preempted()
    finally:
        progress.close()
        ckpt.close()
        writer.close()
    if jax.process_index() == 0:
        rows = plots.read_metrics_jsonl(writer.path)
        steps, losses = plots.metric_curve(rows, "loss")
        if steps:
            plots.loss_curves({stage: (steps, losses)}, os.path.join(stage_dir, "loss.png"),
                              title=f"{stage} training loss")
    stats.update(eval_scores)
    return stats


def _check_finite(out, stage, step, ckpt):
    loss = float(out["loss"])
    if not math.isfinite(loss):
        raise TrainingError(f"{stage}: non-finite loss {loss} at step {step}; the last good "
                            f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}")


def _summarise(window: dict, learning_rate) -> dict[str, Any]:
    outs = jax.device_get(window["metrics"])
    elapsed = max(time.perf_counter() - window["t0"], 1e-9)
    row = {k: float(np.mean([o[k] for o in outs])) if np.ndim(outs[0][k]) == 0
           else np.mean([o[k] for o in outs], axis=0) for k in outs[0]}
    row.pop("target_tokens", None)
    row["learning_rate"] = float(learning_rate)
    row["examples_per_sec"] = window["examples"] / elapsed
    row["tokens_per_sec"] = window["tokens"] / elapsed
    window.update(examples=0, tokens=0, t0=time.perf_counter(), metrics=[])
    return row


# ----------------------------------------------------------------------------- entry

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs config.stages in order under workdir; returns per-stage statistics."""
    validate_config(config)
    sharding.maybe_initialize_distributed()
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    init_dir = resolve_init_from(config.init_from)
    tokenizer = data_lib.get_tokenizer(config.data.tokenizer or init_dir)

    stop_requested = {"flag": False}

    def on_sigterm(signum, frame):
        stop_requested["flag"] = True

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    results = {}
    try:
        for stage in config.stages:
            results[stage] = run_stage(config, workdir, stage, tokenizer=tokenizer,
                                       init_dir=init_dir, stop=lambda: stop_requested["flag"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    return results
