"""Mixture-of-Task-Adapters: parallel task adapters, Task Weight Selector, top-k, gate.

    y = h + dropout( sum_e w_e * A_e( RMSNorm(h) ) )                       (stage one)
    y = h + dropout( g_0 * y_task + sum_j g_j * S_j( RMSNorm(h) ) )         (stage two)

In stage two y_task keeps only some adapters per example (`stage2_selection`: the top-k
weights, or the task's own {t, t+1}), and the gate g reads the outputs at position 0.
`MTAConfig` is the FFN plug of `models.t5`: it says in which blocks the mixture sits and
builds `MTABlock` there. The E task adapters are one `StackedFFN` computed together; the
selector's weights mix their outputs. docs/method.md describes the method, the released
code's defaults and where this implementation differs.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mta_jax.errors import ConfigError
from mta_jax.models import ffn as ffn_lib
from mta_jax.models import t5 as t5_lib
from mta_jax.task_types import TASK_TYPES

Array = jax.Array
SELECTORS = ("task", "start_token")
TOPK_COMPUTE = ("dense", "gather")
STAGE2_SELECTIONS = ("top_k", "own")


@dataclasses.dataclass(frozen=True)
class MTAConfig(t5_lib.FfnPlug):
    encoder_layers: t5_lib.LayerSpec = (11,)  # the released placement: block 11 of each stack
    decoder_layers: t5_lib.LayerSpec = (11,)
    num_adapters: int = 5
    adapter_kind: str = "ffn"  # "ffn": copies of the FFN replace it | "bottleneck": added to it
    adapter_dim: int = 384  # bottleneck width
    selector: str = "task"  # what the Task Weight Selector reads: "task" ids | "start_token"
    temperature: float = 0.1  # Softmax-T
    init_base: float = 0.20  # biased initialisation of the selector logits
    init_bias: float = 0.02  # added for a task's own adapters {t, t+1} mod E
    top_k: Optional[int] = None  # None: stage one (all adapters); k: keep the k largest weights
    renormalize: bool = False  # renormalise the kept top-k weights to sum to one
    # With top_k: "dense" computes every adapter and zeroes the unkept weights; "gather"
    # computes only each example's k kept adapters, their weights gathered per example.
    topk_compute: str = "dense"
    # With top_k: which adapters each example keeps. "top_k": the k largest weights; "own": its
    # task's adapters {t, t+1} mod E (the released MTA_sharemoe4; top_k must then be 2).
    stage2_selection: str = "top_k"
    num_shared_adapters: int = 0  # stage two: adapters every task uses, mixed in by the gate
    gate_hidden_dim: int = 128  # 0: d_model (the released gate)
    gate_bias: bool = True  # biases in both gate layers (the released gate has none)
    task_types: tuple[str, ...] = TASK_TYPES
    selector_loss_weight: float = 0.0  # start_token: weight of the task-type loss on the selector

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "task_types", tuple(self.task_types))

        def check(ok, field, rule):
            if not ok:
                raise ConfigError(f"mta.{field} must be {rule}; got {getattr(self, field)!r}")

        check(self.num_adapters >= 1, "num_adapters", ">= 1")
        check(self.adapter_kind in ffn_lib.KINDS, "adapter_kind", "'ffn' or 'bottleneck'")
        check(self.adapter_dim > 0, "adapter_dim", "> 0")
        check(self.selector in SELECTORS, "selector", "'task' or 'start_token'")
        check(self.temperature > 0, "temperature", "> 0")
        check(self.top_k is None or 1 <= self.top_k <= self.num_adapters, "top_k",
              f"None or an integer in [1, num_adapters={self.num_adapters}]")
        check(self.topk_compute in TOPK_COMPUTE, "topk_compute", "'dense' or 'gather'")
        check(self.stage2_selection in STAGE2_SELECTIONS, "stage2_selection", "'top_k' or 'own'")
        if self.stage2_selection == "own":
            check(self.selector == "task", "selector",
                  "'task' with mta.stage2_selection='own' (it keeps each task's own adapters)")
            own = self.own_adapters().shape[1]
            check(self.top_k in (None, own), "top_k",
                  f"{own} with mta.stage2_selection='own' (a task's adapters {{t, t+1}} mod E)")
        check(self.num_shared_adapters >= 0, "num_shared_adapters", ">= 0")
        check(self.gate_hidden_dim >= 0, "gate_hidden_dim", ">= 0 (0: d_model)")
        check(len(self.task_types) >= 1 and len(set(self.task_types)) == len(self.task_types),
              "task_types", "a non-empty list of distinct names")

    @property
    def replaces_dense(self) -> bool:
        return self.adapter_kind == "ffn"

    def make(self, config: t5_lib.T5Config) -> nn.Module:
        return MTABlock(config, self, name="mta")

    def own_adapters(self) -> np.ndarray:
        """int32[num_task_types, 2]: task t's own adapters {t, t+1} mod E (one column if E = 1)."""
        t = np.arange(len(self.task_types))[:, None]
        return ((t + np.arange(min(2, self.num_adapters))) % self.num_adapters).astype(np.int32)

    def own_mask(self) -> np.ndarray:
        """float32[num_task_types, num_adapters]: 1 on each task's own adapters, else 0."""
        mask = np.zeros((len(self.task_types), self.num_adapters), np.float32)
        np.put_along_axis(mask, self.own_adapters(), 1.0, axis=1)
        return mask

    def initial_logits(self) -> np.ndarray:
        """[num_task_types, num_adapters]: init_base, plus init_bias on adapters {t, t+1} mod E."""
        table = np.full((len(self.task_types), self.num_adapters), self.init_base, np.float32)
        table[self.own_mask() > 0] += np.float32(self.init_bias)
        return table

    def gate_width(self, d_model: int) -> int:
        """The gate's hidden width: gate_hidden_dim, or d_model for 0."""
        return self.gate_hidden_dim or d_model


def keep_weights(weights: Array, idx: Array, renormalize: bool) -> Array:
    """Keep the weights at `idx` per row, zero the others.

    weights: [batch, num_adapters], idx: int[batch, k] (distinct per row) -> [batch, num_adapters].
    """
    keep = jnp.sum(jax.nn.one_hot(idx, weights.shape[-1], dtype=weights.dtype), axis=-2)
    kept = weights * keep
    if renormalize:
        kept = kept / jnp.sum(kept, axis=-1, keepdims=True)
    return kept


def top_k_weights(weights: Array, k: int, renormalize: bool) -> Array:
    """Keep the k largest weights per row (static k, lax.top_k), zero the others.

    weights: [batch, num_adapters] -> [batch, num_adapters], exactly n - k zeros per row.
    """
    _, idx = lax.top_k(weights, k)
    return keep_weights(weights, idx, renormalize)


def select_adapters(weights: Array, task_ids: Optional[Array], mta: MTAConfig) -> Array:
    """Stage two's selection (mta.stage2_selection), unkept weights zeroed: [b, E] -> [b, E].

    "own" keeps the weights the selector gives a task's own adapters as they are, like the
    released MTA_sharemoe4: they sum to less than one unless mta.renormalize.
    """
    if mta.stage2_selection == "own":
        own = jnp.take(jnp.asarray(mta.own_adapters()), task_ids, axis=0)  # [b, 2]
        return keep_weights(weights, own, mta.renormalize)
    return top_k_weights(weights, mta.top_k, mta.renormalize)


class TaskWeightSelector(nn.Module):
    """Selector logits [b, num_adapters]; the block applies Softmax-T."""

    config: t5_lib.T5Config
    mta: MTAConfig

    @nn.compact
    def __call__(self, task_ids: Optional[Array], route_hidden: Array) -> Array:
        m = self.mta
        if m.selector == "task":
            if task_ids is None:
                raise ConfigError("task_ids (int32[batch]) is required when mta.selector == 'task'")
            table = self.param(
                "logits", nn.with_logical_partitioning(
                    lambda *_: jnp.asarray(m.initial_logits()), ("task", "adapter")),
                (len(m.task_types), m.num_adapters), jnp.float32)
            return ffn_lib.take_or_nan(table, task_ids)
        # start_token: a linear read-out of the [START] position; the bias starts at init_base
        # (uniform routing) and the kernel small, so routing is learned from the token.
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(nn.initializers.normal(1e-3), ("embed", "adapter")),
            (self.config.d_model, m.num_adapters), jnp.float32)
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.constant(m.init_base), ("adapter",)),
            (m.num_adapters,), jnp.float32)
        return route_hidden.astype(jnp.float32) @ kernel + bias


class MTABlock(nn.Module):
    """The mixture in one FFN sub-layer (see the module docstring)."""

    config: t5_lib.T5Config
    mta: MTAConfig

    @nn.compact
    def __call__(self, x: Array, ctx: t5_lib.FfnContext, *, deterministic: bool) -> Array:
        """x: [b, l, embed] (already normed) -> [b, l, embed]."""
        c, m = self.config, self.mta
        # The encoder routes on its own [START] position; the decoder on the encoder's.
        route_hidden = x[:, 0] if ctx.route_hidden is None else ctx.route_hidden
        logits = TaskWeightSelector(c, m, name="selector")(ctx.task_ids, route_hidden)  # [b, E]
        weights = jax.nn.softmax(logits / m.temperature, axis=-1)
        self.sow("router", "selector_weights", weights)
        if m.selector == "start_token" and ctx.task_ids is not None:
            # The biased initialisation's spirit: task t should route to its own {t, t+1}.
            own = jnp.asarray(m.own_mask())[ctx.task_ids]
            aux = -jnp.mean(jnp.log(jnp.sum(weights * own, axis=-1) + 1e-9))
            self.sow("router", "selector_task_loss", aux)
            # Sown already weighted: the train step adds every leaf of 'losses' to the loss.
            self.sow("losses", "selector_task_loss", m.selector_loss_weight * aux)
        if m.top_k is not None:
            weights = select_adapters(weights, ctx.task_ids, m)
        self.sow("router", "adapter_weights", weights)
        y_task = self._task_adapters(x, weights, deterministic, ctx.dropout_after)
        if m.num_shared_adapters == 0:
            return y_task

        y_shared = self._adapters("shared_adapters", m.num_shared_adapters)(
            _broadcast(x, m.num_shared_adapters), deterministic=deterministic,
            dropout_after=ctx.dropout_after)  # [S, b, l, embed]
        first = jnp.concatenate([y_task[None, :, :1], y_shared[:, :, :1]], axis=0)  # [1+S, b, 1, e]
        gate = self._gate(first, ctx)  # [b, 1 + S]
        self.sow("router", "gate_weights", gate)
        g = gate.astype(y_task.dtype)
        return g[:, None, :1] * y_task + jnp.einsum("sble,bs->ble", y_shared, g[:, 1:])

    def _adapters(self, name: str, num: int) -> ffn_lib.StackedFFN:
        m = self.mta
        return ffn_lib.StackedFFN(self.config, num=num, kind=m.adapter_kind,
                                  width=None if m.adapter_kind == "ffn" else m.adapter_dim,
                                  activation_axes=(ffn_lib.STACK_AXIS, "batch", "length"),
                                  name=name)

    def _task_adapters(self, x: Array, weights: Array, deterministic: bool,
                       dropout_after: Optional[Array]) -> Array:
        """sum_e w_be A_e(x): x [b, l, embed], weights [b, E] -> [b, l, embed]."""
        m = self.mta
        adapters = self._adapters("adapters", m.num_adapters)
        dt = x.dtype
        if m.top_k is not None and m.topk_compute == "gather":
            # The selection zeroed the unkept weights, so the k largest are the kept ones (a
            # kept weight that underflowed to 0 adds nothing either way).
            kept_weights, kept = lax.top_k(weights, m.top_k)  # [b, k]
            y = adapters(x, deterministic=deterministic, select=kept,
                         dropout_after=dropout_after)  # [b, l, k, embed]
            return jnp.einsum("blke,bk->ble", y, kept_weights.astype(dt))
        y = adapters(_broadcast(x, m.num_adapters), deterministic=deterministic,
                     dropout_after=dropout_after)  # [E, b, l, e]
        return jnp.einsum("nble,bn->ble", y, weights.astype(dt))

    def _gate(self, first: Array, ctx: t5_lib.FfnContext) -> Array:
        """first: [1 + S, b, 1, embed] outputs at the first position -> weights [b, 1 + S].

        In incremental decoding only the first step sees position 0: its gate is cached.
        """
        m = self.mta
        n_out = 1 + m.num_shared_adapters
        flat = first[:, :, 0].transpose(1, 0, 2).reshape(first.shape[1], -1).astype(jnp.float32)
        hidden = nn.relu(nn.Dense(
            m.gate_width(self.config.d_model), use_bias=m.gate_bias, name="gate_hidden",
            dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("gate_in", "gate_hidden")))(flat))
        gate = jax.nn.softmax(nn.Dense(
            n_out, use_bias=m.gate_bias, name="gate_out", dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("gate_hidden", "gate_out")))(hidden), axis=-1)
        if ctx.decode:
            stepping = self.has_variable("cache", "gate")
            cached = self.variable("cache", "gate", jnp.zeros, gate.shape, gate.dtype)
            if stepping:
                gate = jnp.where(ctx.decode_index == 0, gate, cached.value)
                cached.value = gate
        return gate


def _broadcast(x: Array, n: int) -> Array:
    """x [b, l, embed] -> [n, b, l, embed]: each of n stacked FFNs reads the same input."""
    return jnp.broadcast_to(x, (n,) + x.shape)


def stage_two_config(stage1: MTAConfig, *, top_k: Optional[int] = 2,
                     num_shared_adapters: int = 1, **changes) -> MTAConfig:
    return dataclasses.replace(stage1, top_k=top_k, num_shared_adapters=num_shared_adapters,
                               **changes)


def stage_two_params(stage1_params: Mapping, model: t5_lib.T5, rng: Array,
                     pretrained: Optional[Mapping] = None) -> dict:
    """Stage-one parameters -> stage-two parameters for `model` (its plug has the gate).

    Every stage-one leaf is kept bitwise. New leaves (shared adapters, gate) are initialised
    from `rng`; `ffn` shared adapters then start as copies of the pretrained FFN of their
    layer when `pretrained` (flat {path: array}, e.g. hf.hf_to_backbone flattened) is given,
    else as the mean of that layer's stage-one task adapters.
    """
    boxed = t5_lib.init_params(model, rng)
    fresh = flax.traverse_util.flatten_dict(nn.unbox(boxed))
    old = flax.traverse_util.flatten_dict(nn.unbox(dict(stage1_params)))
    unknown = sorted("/".join(k) for k in old if k not in fresh)
    if unknown:
        raise ConfigError(f"stage-one parameters not in the stage-two model: {unknown[:3]}")
    out = {**fresh, **old}
    if model.config.ffn_plug.adapter_kind == "ffn":
        if pretrained is not None:
            new_shared = ffn_lib.stacked_copies_of_dense(boxed, pretrained)
        else:
            new_shared = {k: jnp.broadcast_to(jnp.mean(old[k[:-2] + ("adapters", k[-1])], axis=0),
                                              fresh[k].shape)
                          for k in fresh if k[-2:-1] == ("shared_adapters",)}
        out.update({k: v for k, v in new_shared.items() if k not in old})
    return flax.traverse_util.unflatten_dict(
        {k: jnp.asarray(v, dtype=fresh[k].dtype) if k not in old else v for k, v in out.items()})
