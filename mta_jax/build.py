"""From a config to what a stage runs: FFN plug, model, shardings, optimizer, initial parameters.

    config --validate_config--> make_setup(config): tokenizer, pretrained folder, mesh (once)
                                      |
                           setup.stage("stage1" | "stage2")
                                      v
        Stage: model, abstract parameters and their shardings, freezing labels, optimizer,
               abstract optimizer state and its shardings
                                      |
                  initial_params(setup, stage, ...): Hugging Face, random, or stage one

Training (train.py), inference (predict.py), the benchmarks and the experiments all build
through here, so one config means one model everywhere.

`config.variant` picks the FFN plug of each stage; every plug sits in the blocks named by
`config.mta.encoder_layers` / `decoder_layers`:

    dense           plain T5 multi-task fine-tuning (no plug)
    shared_adapter  one bottleneck adapter shared by all tasks, added to the FFN  (adapters.py)
    switch_moe      Switch top-1 token routing over FFN experts, replacing the FFN (moe.py)
    task_moe        one FFN expert per task type, hard routing by task id          (moe.py)
    mta_stage1      MTA stage one only                                             (mta.py)
    mta             MTA, both stages (the only variant with a stage two)
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from mta_jax import checkpoint as ckpt_lib
from mta_jax import data as data_lib
from mta_jax import hf, optim, sharding, storage
from mta_jax.errors import ConfigError
from mta_jax.models import adapters, moe, mta
from mta_jax.models import t5 as t5_lib

STAGES = ("stage1", "stage2")
VARIANTS = ("dense", "shared_adapter", "switch_moe", "task_moe", "mta_stage1", "mta")
OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "linear", "cosine", "rsqrt")
RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")  # jax.random key implementations (dropout)


def _fail(field: str, rule: str, value: Any):
    raise ConfigError(f"config.{field} must be {rule}; got {value!r}")


# ----------------------------------------------------------------------------- the FFN plug

def variant_of(config) -> str:
    variant = config.get("variant", "mta")
    if variant not in VARIANTS:
        _fail("variant", f"one of {', '.join(VARIANTS)}", variant)
    return variant


def stages_for(variant: str) -> tuple[str, ...]:
    """The stages a variant trains: only `mta` has a stage two."""
    return STAGES if variant == "mta" else ("stage1",)


def parse_layers(spec: str, field: str) -> t5_lib.LayerSpec:
    """'all' | 'last' | 'none' | '11' | '3,7,-1' -> the plug's placement of one stack."""
    spec = str(spec).strip()
    if spec in ("all", "last", "none"):
        return spec
    try:
        return tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"config.mta.{field} must be 'all', 'last', 'none' or comma-separated "
                          f"block indices; got {spec!r}") from None


def ffn_plug(config, stage: str) -> Optional[t5_lib.FfnPlug]:
    """The FFN plug of `stage` for this config (None: the plain dense T5)."""
    variant = variant_of(config)
    if variant != "mta" and (stage != "stage1" or "stage2" in tuple(config.stages)):
        _fail("stages", f"('stage1',) for config.variant={variant!r} (only 'mta' has a stage two)",
              tuple(config.stages))
    t, o = config.mta, config.moe
    placement = dict(encoder_layers=parse_layers(t.encoder_layers, "encoder_layers"),
                     decoder_layers=parse_layers(t.decoder_layers, "decoder_layers"))
    if variant in ("mta", "mta_stage1"):
        if not t.enabled:
            return None
        stage_two = stage == "stage2"
        return mta.MTAConfig(
            num_adapters=t.num_adapters, adapter_kind=t.adapter_kind, adapter_dim=t.adapter_dim,
            selector=t.selector, temperature=t.temperature, init_base=t.init_base,
            init_bias=t.init_bias, top_k=t.top_k if stage_two else None,
            renormalize=t.renormalize, topk_compute=t.get("topk_compute", "dense"),
            num_shared_adapters=t.num_shared_adapters if stage_two else 0,
            gate_hidden_dim=t.gate_hidden_dim, task_types=tuple(t.task_types),
            selector_loss_weight=t.selector_loss_weight,
            # .get: a run's config.json written before these fields existed still loads.
            stage2_selection=t.get("stage2_selection", "top_k"),
            gate_bias=t.get("gate_bias", True), **placement)
    if variant == "dense":
        return None
    if variant == "shared_adapter":
        return adapters.SharedAdapterConfig(adapter_dim=o.adapter_dim, **placement)
    if variant == "switch_moe":
        return moe.SwitchConfig(
            num_experts=o.num_experts, capacity_factor=o.capacity_factor,
            eval_capacity_factor=o.eval_capacity_factor,
            load_balance_weight=o.load_balance_weight, z_loss_weight=o.z_loss_weight,
            router_init_std=o.router_init_std, **placement)
    return moe.TaskMoEConfig(task_types=tuple(t.task_types), **placement)


def reads_task_type(config) -> bool:
    """Whether routing needs each example's task type (False: MTA's start_token selector)."""
    return not (variant_of(config) in ("mta", "mta_stage1") and config.mta.selector == "start_token")


# ----------------------------------------------------------------------------- validation

def validate_config(config: ml_collections.ConfigDict, *, training: bool = True,
                    data_files: bool = True) -> dict[str, Optional[t5_lib.FfnPlug]]:
    """Checks everything that can be checked before anything heavy runs (ConfigError/DataError).

    training=False checks what inference needs: the model, decoding and data layout.
    data_files=False skips the data files' existence (compiling ahead of time reads none).
    Returns each stage's FFN plug: building it is how the mta / moe fields are checked.
    """
    stages = tuple(config.stages)
    if not stages or any(s not in STAGES for s in stages) or list(stages) != sorted(set(stages)):
        _fail("stages", f"a non-empty ordered subset of {STAGES}", stages)
    if not config.mta.enabled and "stage2" in stages:
        _fail("stages", "('stage1',) when config.mta.enabled is False (stage two trains MTA)", stages)
    plugs = {stage: ffn_plug(config, stage) for stage in STAGES if stage in stages or
             (stage == "stage1" and "stage2" in stages)}  # stage two starts from stage one's
    if training:
        _validate_training(config, stages, data_files)
    e = config.eval
    if e.decode not in ("beam", "greedy"):
        _fail("eval.decode", "'beam' or 'greedy'", e.decode)
    for field in ("batch_size", "max_decode_length", "beam_size"):
        if e[field] < 1:
            _fail(f"eval.{field}", ">= 1", e[field])
    if config.init_from and not storage.path(config.init_from).is_dir() \
            and os.path.sep in config.init_from and config.init_from.count("/") != 1:
        _fail("init_from", "an existing Hugging Face folder (local or gs://) or a hub name such "
              "as 't5-base'", config.init_from)
    data_lib.validate_data_config(config.data)
    return plugs


def _validate_training(config, stages, data_files: bool) -> None:
    for stage in stages:
        s = config[stage]
        if s.num_train_steps < 1:
            _fail(f"{stage}.num_train_steps", ">= 1", s.num_train_steps)
        if not s.learning_rate > 0:
            _fail(f"{stage}.learning_rate", "> 0", s.learning_rate)
        if s.optimizer not in OPTIMIZERS:
            _fail(f"{stage}.optimizer", "'adamw' or 'adafactor'", s.optimizer)
        if s.schedule not in SCHEDULES:
            _fail(f"{stage}.schedule", "'constant', 'linear', 'cosine' or 'rsqrt'", s.schedule)
        try:
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
    rng_impl = config.train.get("rng_impl", "threefry2x32")
    if rng_impl not in RNG_IMPLS:
        _fail("train.rng_impl", f"one of {', '.join(RNG_IMPLS)}", rng_impl)
    if data_files and config.data.source == "jsonl":
        for field in ("train_path", "eval_path"):
            path = config.data[field]
            if not path or not storage.path(path).exists():
                _fail(f"data.{field}", "an existing JSON-lines file (data.source = 'jsonl')", path)


# ----------------------------------------------------------------------------- pretrained

def resolve_init_from(name: str) -> str:
    """A local or gs:// folder as is; a hub name through huggingface_hub (cached, safetensors
    only)."""
    if not name or storage.path(name).is_dir():
        return name
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model"])
    except Exception as e:  # offline, unknown repo, no safetensors ...
        raise ConfigError(f"config.init_from={name!r} is not a local folder and could not be "
                          f"fetched from the Hugging Face hub ({type(e).__name__}: {e})") from e


class Pretrained:
    """A Hugging Face T5 folder: its config.json, and its weights opened once, when first asked
    for (a local file memory-mapped; a gs:// one read tensor by tensor when used)."""

    def __init__(self, folder: str):
        self.folder = folder

    @functools.cached_property
    def weights(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        return hf.read_weights(self.folder)  # (tensors, the file each came from)

    def model_config(self, **overrides) -> t5_lib.T5Config:
        """The folder's T5Config; the head is untied iff the weights hold `lm_head.weight`."""
        config = hf.read_config(self.folder, **overrides)
        return config.replace(tie_word_embeddings="lm_head.weight" not in self.weights[0])

    def backbone(self, config: t5_lib.T5Config) -> dict:
        """The backbone's parameters as a flat {path: array} (hf.hf_to_backbone)."""
        tensors, origin = self.weights
        return flax.traverse_util.flatten_dict(hf.hf_to_backbone(tensors, config, origin))


class ShapesOnly:
    """A pretrained checkpoint's shapes without its weights or tokenizer, for compiling ahead of
    time: a local folder's config.json, or a published checkpoint's (hf.PUBLISHED_CONFIGS).
    Nothing is downloaded; `source` says where the shapes came from."""

    def __init__(self, name: str):
        if storage.path(name).is_dir():
            self.source = str(storage.path(name) / hf.CONFIG_FILE)
            self._config = lambda **overrides: hf.read_config(name, **overrides)
        elif name in hf.PUBLISHED_CONFIGS:
            self.source = f"the published config.json of {name} (mta_jax/hf.py)"
            self._config = lambda **overrides: hf.config_from_dict(
                hf.PUBLISHED_CONFIGS[name], self.source, **overrides)
        else:
            raise ConfigError(
                f"config.init_from={name!r} is neither a local folder nor a checkpoint whose shapes "
                f"are known offline ({', '.join(sorted(hf.PUBLISHED_CONFIGS))}): pass a folder "
                "holding its config.json")

    def model_config(self, **overrides) -> t5_lib.T5Config:
        """The T5Config; config.json's tie_word_embeddings decides the head (no weights here)."""
        return self._config(**overrides)


# ----------------------------------------------------------------------------- a stage

@dataclasses.dataclass(frozen=True)
class Stage:
    """Everything about one stage that follows from the config, before any weight exists."""

    name: str
    model: t5_lib.T5
    abstract_params: Any  # ShapeDtypeStructs carrying their NamedShardings
    param_shardings: Any
    labels: Any  # 'trainable' | 'frozen' per parameter (optim.param_labels)
    tx: optax.GradientTransformation
    schedule: Callable
    abstract_opt_state: Any
    opt_shardings: Any

    @property
    def plug(self) -> Optional[t5_lib.FfnPlug]:
        return self.model.config.ffn_plug


@dataclasses.dataclass
class Setup:
    """What every stage of a run shares, built once per start."""

    config: ml_collections.ConfigDict
    plugs: dict  # stage -> its FFN plug (None: plain T5), from validate_config
    tokenizer: Any  # None when built from shapes only
    pretrained: Optional[Pretrained | ShapesOnly]
    mesh: Any
    rules: tuple
    train_decoder_start_id: Optional[int] = None  # config.data.train_decoder_start; None: pad
    _stages: dict = dataclasses.field(default_factory=dict)

    @property
    def task_types(self) -> tuple[str, ...]:
        return tuple(self.config.mta.task_types)

    def stage(self, name: str) -> Stage:
        if name not in self._stages:
            self._stages[name] = _build_stage(self, name)
        return self._stages[name]


def make_setup(config: ml_collections.ConfigDict, *, training: bool = True,
               mesh: Any = None, shapes_only: bool = False) -> Setup:
    """Validates `config` and opens what every stage shares (no weights are read yet).

    Without a `mesh`, several processes (a multi-host slice) first join jax.distributed, then
    the mesh spans every device of every process (config.mesh). shapes_only=True reads no
    weights, tokenizer or data and downloads nothing: `init_from` gives its shapes only
    (ShapesOnly), enough for abstract parameters and compiling (mta_jax.compile).
    """
    plugs = validate_config(config, training=training, data_files=not shapes_only)
    if mesh is None:
        sharding.maybe_initialize_distributed()
        mesh = sharding.make_mesh(config.mesh)
    if training:  # each micro-batch is split over the mesh; rows it cannot split are recomputed
        accum = config.train.grad_accum_steps
        sharding.check_batch_size(config.train.batch_size // accum, mesh, name=(
            f"a micro-batch (train.batch_size={config.train.batch_size} / "
            f"train.grad_accum_steps={accum})"))
    decoder_start = None  # shapes only: the start token does not change a shape
    if shapes_only:
        pretrained = ShapesOnly(config.init_from) if config.init_from else None
        needs_vocab = pretrained is None and not config.model.vocab_size
        tokenizer = data_lib.get_tokenizer(config.data.tokenizer) if needs_vocab else None
    else:
        init_dir = resolve_init_from(config.init_from)
        pretrained = Pretrained(init_dir) if init_dir else None
        tokenizer = data_lib.get_tokenizer(config.data.tokenizer or init_dir)
        # Before any model is sized from the tokenizer: a new start token (`<e>`) joins it here.
        decoder_start = data_lib.train_decoder_start_id(tokenizer, config.data)
    return Setup(config, plugs, tokenizer, pretrained, mesh, sharding.logical_rules(config.mesh),
                 decoder_start)


def model_config(config, plug: Optional[t5_lib.FfnPlug], vocab_size: int,
                 pretrained: Optional[Pretrained], mesh=None) -> t5_lib.T5Config:
    """The T5Config with `plug`: the pretrained folder's shape, or `config.model`'s. A mesh
    with tensor parallelism ties each block's dropout masks to the block (ffn.Dropout): under
    data and fsdp XLA drew them where used already, and the tie cost HBM traffic there."""
    m = config.model
    tensor_parallel = mesh is not None and mesh.shape["tensor"] > 1
    common = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                  dropout_rate=m.dropout_rate, ffn_plug=plug, tie_dropout_masks=tensor_parallel)
    if pretrained is not None:
        t5 = pretrained.model_config(**common)
        if vocab_size > t5.vocab_size:  # ids past the embedding would be clamped silently
            raise ConfigError(
                f"config.data.tokenizer has {vocab_size} tokens but the model of "
                f"config.init_from={config.init_from!r} has vocab_size {t5.vocab_size}; use a "
                "tokenizer of at most that many tokens (the folder's own: data.tokenizer='')")
        return t5
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


def abstract_params(model: t5_lib.T5, mesh, rules) -> tuple[Any, Any]:
    """(ShapeDtypeStructs with shardings, NamedShardings) of the model's parameters."""
    boxed = jax.eval_shape(lambda: t5_lib.init_params(model, jax.random.PRNGKey(0)))
    shardings = sharding.param_shardings(boxed, mesh, rules)
    unboxed = nn.unbox(boxed)
    sharding.check_param_divisibility(unboxed, shardings, mesh)
    return sharding.with_shardings(unboxed, shardings), shardings


def _build_stage(setup: Setup, name: str) -> Stage:
    config = setup.config
    vocab = len(setup.tokenizer) if setup.tokenizer is not None else 0  # shapes only: unused
    model = t5_lib.T5(model_config(config, setup.plugs[name], vocab, setup.pretrained,
                                   setup.mesh))
    start, vocab = setup.train_decoder_start_id, model.config.vocab_size
    if start is not None and start >= vocab:  # the embedding is not resized for it
        _fail("data.train_decoder_start", f"a token or id below the model's vocabulary size "
              f"{vocab}", f"{config.data.train_decoder_start} (id {start})")
    abstract, shardings = abstract_params(model, setup.mesh, setup.rules)
    stage_cfg = config[name]
    labels = optim.param_labels(abstract, stage_cfg.trainable)
    if not optim.count_params(abstract, labels)[optim.TRAINABLE]:
        _fail(f"{name}.trainable", "a regex that matches at least one parameter path",
              stage_cfg.trainable)
    tx, schedule = optim.make_optimizer(stage_cfg, stage_cfg.num_train_steps, labels)
    opt_shape = jax.eval_shape(tx.init, abstract)
    opt_shardings = sharding.opt_state_shardings(opt_shape, shardings, setup.mesh)
    return Stage(name, model, abstract, shardings, labels, tx, schedule,
                 sharding.with_shardings(opt_shape, opt_shardings), opt_shardings)


# ----------------------------------------------------------------------------- parameters

def initial_params(setup: Setup, stage: Stage, workdir: str) -> Any:
    """Stage one: the pretrained folder's weights (plug parameters fresh, `ffn` adapters and
    experts copies of their layer's FFN) or random. Stage two: stage one's final checkpoint,
    every leaf kept, the new leaves (shared adapters, gate) added by mta.stage_two_params."""
    rng = jax.random.PRNGKey(setup.config.seed)
    model = stage.model
    if stage.name == "stage1":
        if setup.pretrained is None:
            init = jax.jit(lambda r: nn.unbox(t5_lib.init_params(model, r)),
                           out_shardings=stage.param_shardings)
            return init(rng)
        backbone = setup.pretrained.backbone(model.config)
        host = hf.assemble_params(model, backbone, rng=rng)
        return jax.device_put(host, stage.param_shardings)

    src = storage.path(setup.config.stage2.init_checkpoint
                       or storage.path(workdir) / "stage1" / "checkpoints")
    if not src.is_dir():
        raise ConfigError(f"stage two starts from stage one's checkpoint, but {src} does not "
                          "exist: run stage1 first or set config.stage2.init_checkpoint")
    stage1 = setup.stage("stage1")
    step, stage1_params = ckpt_lib.restore_params_from(src, params_target=stage1.abstract_params)
    pretrained = None
    if setup.pretrained is not None and stage.plug.adapter_kind == "ffn":
        pretrained = setup.pretrained.backbone(model.config)
    converted = mta.stage_two_params(stage1_params, model, jax.random.fold_in(rng, 2),
                                     pretrained=pretrained)
    logging.info("stage two starts from %s step %d", src, step)
    return jax.device_put(converted, stage.param_shardings)
