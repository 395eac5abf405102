"""The JAX side of the benchmarks: model shapes, random weights, batches, compiled steps.

Every step measured is the library's own: `step.make_train_step` with the optimizer of
`optim.make_optimizer`, jitted with the train loop's donation (`step.state_donation`), compiled
ahead of time (`jit(...).lower(...).compile()`) so that timing never includes tracing and
the compiled program's `memory_analysis()` is at hand.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mta_jax import decoding, optim, step as step_lib
from mta_jax.models import ffn
from mta_jax.models import mta as mta_lib
from mta_jax.models.t5 import T5, T5Config, init_params

# T5 v1.0 (ReLU FFN, head tied to the embedding) shapes; `micro` is for the unit test.
SIZES = {
    "micro": {"vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1,
              "num_heads": 4},
    "small": {"vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6,
              "num_heads": 8},
    "base": {"vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12,
             "num_heads": 12},
}


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    source: int
    target: int

    def __str__(self) -> str:
        return f"b{self.batch} s{self.source} t{self.target}"


def t5_config(size: str, plug: mta_lib.MTAConfig | None = None, **changes) -> T5Config:
    fields = {**SIZES[size], "dropout_rate": 0.1, "feed_forward_proj": "relu", **changes}
    return T5Config(**fields, ffn_plug=plug)


def stage_one_plug(**changes) -> mta_lib.MTAConfig:
    """The released stage one: 5 full-FFN adapters in the last block of each stack."""
    return mta_lib.MTAConfig(**{"num_adapters": 5, "adapter_kind": "ffn",
                                "encoder_layers": "last", "decoder_layers": "last", **changes})


def _leaf(path: tuple, shape: tuple, seed: int) -> np.ndarray:
    """A deterministic random leaf: the same path and shape give the same values."""
    rng = np.random.default_rng([seed, zlib.crc32("/".join(path).encode())])
    return (rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(np.float32)


def random_params(model: T5, seed: int = 0) -> dict:
    """Random weights for `model`, without running its (slow, eager) initialiser.

    Leaves shared by two models (same path) are equal, so a dense model and its MTA variant
    have the same backbone; `ffn` adapters start as copies of their layer's dense FFN, as
    in the released method, and selector logits take the released biased initialisation.
    Norm scales are 1. Values otherwise do not matter for timing.
    """
    plug = model.config.ffn_plug
    boxed = jax.eval_shape(lambda: init_params(model, jax.random.PRNGKey(0)))
    flat = flax.traverse_util.flatten_dict(flax.linen.unbox(boxed))
    values = {}
    for path, leaf in flat.items():
        if path[-1] == "scale":
            values[path] = np.ones(leaf.shape, np.float32)
        elif path[-1] == "logits" and plug is not None:
            values[path] = plug.initial_logits()
        else:
            values[path] = _leaf(path, leaf.shape, seed)
    # Stacked adapters and experts of the FFN's shape copy the values the dense model has at
    # their layer's FFN (the released method starts `ffn` adapters from the pretrained FFN).
    dense = {ffn.dense_ffn_path(p): _leaf(ffn.dense_ffn_path(p), leaf.shape[1:], seed)
             for p, leaf in flat.items() if "ffn" in p and "mlp" not in p and leaf.ndim == 3}
    values.update(ffn.stacked_copies_of_dense(boxed, dense))
    return flax.traverse_util.unflatten_dict(
        {p: jnp.asarray(v, flat[p].dtype) for p, v in values.items()})


def make_batch(config: T5Config, shape: Shape, seed: int = 0, num_task_types: int = 5) -> dict:
    """A full batch (no padding): random tokens, labels shifted into decoder inputs, tasks
    cycling through the task types so that routing differs between examples."""
    rng = np.random.default_rng(seed)
    b, s, t = shape.batch, shape.source, shape.target
    labels = rng.integers(2, config.vocab_size, (b, t), dtype=np.int32)
    dec = np.concatenate([np.full((b, 1), config.decoder_start_token_id, np.int32),
                          labels[:, :-1]], axis=1)
    host = {"input_ids": rng.integers(2, config.vocab_size, (b, s), dtype=np.int32),
            "attention_mask": np.ones((b, s), np.int32), "decoder_input_ids": dec,
            "labels": labels, "decoder_attention_mask": np.ones((b, t), np.int32),
            "task_ids": (np.arange(b) % num_task_types).astype(np.int32)}
    return {k: jnp.asarray(v) for k, v in host.items()}


def stage_config(trainable: str):
    from configs.default import stage_config as default_stage
    return default_stage(num_train_steps=1000, learning_rate=1e-4, trainable=trainable)


@dataclasses.dataclass
class TrainStep:
    """One compiled training step and its live state; calling it runs one step, blocking."""

    name: str
    model: T5
    shape: Shape
    compiled: Any
    params: Any
    opt_state: Any
    batch: dict
    rng: jax.Array
    trainable_bytes: int
    param_bytes: int
    opt_state_bytes: int
    compile_seconds: float

    def __call__(self) -> float:
        self.params, self.opt_state, metrics = self.compiled(
            self.params, self.opt_state, self.batch, self.rng)
        return float(metrics["loss"])  # blocks until the step is done

    def memory(self) -> dict[str, int]:
        """Compiled buffer sizes; peak = arguments + outputs not aliased to them + temporaries."""
        m = self.compiled.memory_analysis()
        return {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
                "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
                "peak": m.argument_size_in_bytes + m.output_size_in_bytes
                - m.alias_size_in_bytes + m.temp_size_in_bytes}


def train_step(name: str, config: T5Config, shape: Shape, *, trainable: str = ".*",
               seed: int = 0) -> TrainStep:
    import time

    model = T5(config)
    params = random_params(model, seed)
    labels = optim.param_labels(params, trainable)
    tx, _ = optim.make_optimizer(stage_config(trainable), 1000, labels)
    opt_state = tx.init(params)
    step = jax.jit(step_lib.make_train_step(model, tx, labels),
                   donate_argnums=step_lib.state_donation())
    batch = make_batch(config, shape, seed)
    rng = jax.random.PRNGKey(seed)
    start = time.perf_counter()
    compiled = step.lower(params, opt_state, batch, rng).compile()
    seconds = time.perf_counter() - start
    trainable_tree = jax.tree.map(lambda p, l: p if l == optim.TRAINABLE else None, params, labels)
    return TrainStep(name, model, shape, compiled, params, opt_state, batch, rng,
                     trainable_bytes=optim.tree_bytes(trainable_tree),
                     param_bytes=optim.tree_bytes(params),
                     opt_state_bytes=optim.tree_bytes(opt_state), compile_seconds=seconds)


def greedy_decoder(model: T5, params, batch: dict, length: int):
    """A warm-able callable: the library's jitted greedy decoder producing exactly `length`
    tokens per row (EOS disabled by an id no token has, so no row stops early), and it."""
    never = T5(model.config.replace(eos_token_id=-1))
    decode = decoding.make_decoder(never, method="greedy", max_length=length)
    args = (params, batch["input_ids"], batch["attention_mask"], batch["task_ids"])
    return lambda: np.asarray(decode(*args))


def forward_logits(model: T5, params, batch: dict) -> np.ndarray:
    """Deterministic float32 logits [b, t, vocab] (for parity with the PyTorch side)."""
    fn = jax.jit(lambda p, b: model.apply(
        {"params": p}, b["input_ids"], b["decoder_input_ids"], attention_mask=b["attention_mask"],
        decoder_attention_mask=b["decoder_attention_mask"], task_ids=b["task_ids"]))
    return np.asarray(fn(params, batch))
