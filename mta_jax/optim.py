"""Optimizers, schedules, and the parameter labels that freeze a stage's backbone.

Freezing is data, not code: a stage's `trainable` regex is matched against each parameter's
path ('decoder/layers_11/ffn/mta/adapters/wo'); leaves that match are labelled 'trainable',
the rest 'frozen'. `optax.multi_transform` gives frozen leaves `set_to_zero()`, which holds no
optimizer state; the train step (step.py) reads the same labels to trace no gradient for them.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

TRAINABLE, FROZEN = "trainable", "frozen"


def path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def param_labels(params: Mapping, trainable: str) -> dict:
    """A tree like `params` with 'trainable' where re.search(trainable, path) else 'frozen'."""
    pattern = re.compile(trainable)
    flat = flax.traverse_util.flatten_dict(dict(params))
    return flax.traverse_util.unflatten_dict(
        {k: TRAINABLE if pattern.search(path_str(k)) else FROZEN for k in flat})


def make_schedule(stage_cfg, num_steps: int) -> optax.Schedule:
    """Learning rate per step: constant | linear | cosine | rsqrt, after `warmup_steps`."""
    lr, warm = stage_cfg.learning_rate, stage_cfg.warmup_steps
    kind = stage_cfg.schedule
    if kind == "constant":
        main = optax.constant_schedule(lr)
    elif kind == "linear":
        main = optax.linear_schedule(lr, 0.0, max(num_steps - warm, 1))
    elif kind == "cosine":
        main = optax.cosine_decay_schedule(lr, max(num_steps - warm, 1))
    elif kind == "rsqrt":
        main = lambda step: lr * jax.lax.rsqrt(jnp.maximum(step + warm, 1.0) / max(warm, 1))
    else:
        raise ValueError(f"schedule must be constant | linear | cosine | rsqrt, got {kind!r}")
    if warm <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def make_optimizer(stage_cfg, num_steps: int, labels: Mapping | None = None):
    """The stage's optimizer; with `labels`, frozen leaves get set_to_zero() and no state."""
    schedule = make_schedule(stage_cfg, num_steps)
    if stage_cfg.optimizer == "adamw":
        base = optax.adamw(schedule, b1=stage_cfg.b1, b2=stage_cfg.b2, eps=stage_cfg.eps,
                           weight_decay=stage_cfg.weight_decay)
    elif stage_cfg.optimizer == "adafactor":
        base = optax.adafactor(schedule, weight_decay_rate=stage_cfg.weight_decay or None)
    else:
        raise ValueError(f"optimizer must be adamw | adafactor, got {stage_cfg.optimizer!r}")
    if stage_cfg.grad_clip_norm > 0:
        base = optax.chain(optax.clip_by_global_norm(stage_cfg.grad_clip_norm), base)
    if labels is None:
        return base, schedule
    tx = optax.multi_transform({TRAINABLE: base, FROZEN: optax.set_to_zero()}, labels)
    return tx, schedule


def count_params(params: Mapping, labels: Mapping) -> dict[str, int]:
    sizes = jax.tree_util.tree_map(lambda x: int(np.prod(x.shape)), dict(params))
    flat_s = flax.traverse_util.flatten_dict(sizes)
    flat_l = flax.traverse_util.flatten_dict(dict(labels))
    out = {TRAINABLE: 0, FROZEN: 0}
    for k, n in flat_s.items():
        out[flat_l[k]] += n
    return out


def tree_bytes(tree: Any) -> int:
    """Bytes held by the array leaves of a pytree (shape-dtype structs count too)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves
                   if hasattr(x, "shape") and hasattr(x, "dtype")))
