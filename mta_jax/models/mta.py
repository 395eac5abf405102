"""Mixture-of-Task-Adapters: parallel task adapters, Task Weight Selector, top-k, gate.

    y = h + dropout( sum_e w_e * A_e( RMSNorm(h) ) )                       (stage one)
    y = h + dropout( g_0 * y_task + sum_j g_j * S_j( RMSNorm(h) ) )         (stage two)

`MTAConfig` is the FFN plug of `models.t5`: it says in which blocks the mixture sits and
builds `MTABlock` there. The E adapters are stacked on an `adapter` axis and computed
together: each product is one einsum with the adapter axis as its batch axis, and the
selector weights mix the E outputs (`Adapters`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mta_jax.models import t5 as t5_lib

Array = jax.Array
TASK_TYPES = ("classify", "nli", "mrc", "generate", "anaphora_resolution")
LayerSpec = Union[str, Sequence[int]]  # "all" | "last" | "none" | indices (negative: from the end)


class MTAConfigError(ValueError):
    """An MTA setting out of its allowed range; the message names the `mta.<field>`."""


@dataclasses.dataclass(frozen=True)
class MTAConfig:
    num_adapters: int = 5
    adapter_kind: str = "ffn"  # "ffn": copies of the FFN replace it | "bottleneck": added to it
    adapter_dim: int = 384  # bottleneck width
    encoder_layers: LayerSpec = (11,)
    decoder_layers: LayerSpec = (11,)
    selector: str = "task"  # "task": logit table by task type | "start_token": reads [START]
    temperature: float = 0.1  # Softmax-T
    init_base: float = 0.20  # biased initialisation of the selector logits
    init_bias: float = 0.02  # added for a task's own adapters {t, t+1} mod E
    top_k: Optional[int] = None  # None: stage one (all adapters); k: keep the k largest weights
    renormalize: bool = False  # renormalise the kept top-k weights to sum to one
    # With top_k: "dense" computes every adapter and zeroes the unkept weights; "gather"
    # computes only each example's k kept adapters, their weights gathered per example.
    topk_compute: str = "dense"
    num_shared_adapters: int = 0  # stage two: adapters every task uses, mixed in by the gate
    gate_hidden_dim: int = 128
    task_types: tuple[str, ...] = TASK_TYPES
    selector_loss_weight: float = 0.0  # start_token: weight of the task-type loss on the selector
    name: str = "mta"  # module name; every MTA parameter lives under it

    def __post_init__(self):
        object.__setattr__(self, "task_types", tuple(self.task_types))
        normalize_placement(self)
        check = lambda ok, field, rule: None if ok else _fail(field, rule, getattr(self, field))
        check(self.num_adapters >= 1, "num_adapters", ">= 1")
        check(self.adapter_kind in ("ffn", "bottleneck"), "adapter_kind", "'ffn' or 'bottleneck'")
        check(self.adapter_dim > 0, "adapter_dim", "> 0")
        check(self.selector in ("task", "start_token"), "selector", "'task' or 'start_token'")
        check(self.temperature > 0, "temperature", "> 0")
        check(self.top_k is None or 1 <= self.top_k <= self.num_adapters, "top_k",
              f"None or an integer in [1, num_adapters={self.num_adapters}]")
        check(self.topk_compute in ("dense", "gather"), "topk_compute", "'dense' or 'gather'")
        check(self.num_shared_adapters >= 0, "num_shared_adapters", ">= 0")
        check(self.gate_hidden_dim > 0, "gate_hidden_dim", "> 0")
        check(len(self.task_types) >= 1 and len(set(self.task_types)) == len(self.task_types),
              "task_types", "a non-empty list of distinct names")

    # ---- the FfnPlug protocol of models.t5
    @property
    def replaces_dense(self) -> bool:
        return self.adapter_kind == "ffn"

    def layer_indices(self, stack: str, num_layers: int) -> tuple[int, ...]:
        return layer_indices(getattr(self, f"{stack}_layers"), stack, num_layers)

    def applies_to(self, stack: str, layer: int, num_layers: int) -> bool:
        return layer in self.layer_indices(stack, num_layers)

    def validate(self, config: t5_lib.T5Config) -> None:
        self.layer_indices("encoder", config.num_layers)
        self.layer_indices("decoder", config.n_decoder_layers)

    def make(self, config: t5_lib.T5Config, stack: str, layer: int, name: str) -> nn.Module:
        return MTABlock(config, self, stack, name=name)

    def init_from_pretrained(self, flat: dict, backbone: Mapping) -> dict:
        """`ffn` adapters (task and shared) start as copies of their layer's pretrained FFN."""
        if self.adapter_kind != "ffn":
            return flat
        flat = dict(flat)
        for key in list(flat):
            for group in ("adapters", "shared_adapters"):
                if self.name in key and len(key) >= 2 and key[-2] == group:
                    dense = key[: key.index(self.name)] + ("mlp", key[-1])
                    if dense in backbone:
                        flat[key] = np.broadcast_to(backbone[dense], flat[key].shape).copy()
        return flat

    # ---- helpers
    def task_id(self, task_type: str) -> int:
        if task_type not in self.task_types:
            raise MTAConfigError(
                f"unknown task type {task_type!r}; mta.task_types are {list(self.task_types)}")
        return self.task_types.index(task_type)

    def initial_logits(self) -> np.ndarray:
        """[num_task_types, num_adapters]: init_base, plus init_bias on adapters {t, t+1} mod E."""
        n, e = len(self.task_types), self.num_adapters
        table = np.full((n, e), self.init_base, np.float32)
        for t in range(n):
            for own in {t % e, (t + 1) % e}:
                table[t, own] += self.init_bias
        return table


def _fail(field: str, rule: str, value: Any):
    raise MTAConfigError(f"mta.{field} must be {rule}; got {value!r}")


def take_or_nan(table: Array, ids: Array) -> Array:
    """table[ids] along axis 0, NaN rows where an id is out of range.

    Written as clip + where rather than `jnp.take(mode="fill")`: on XLA CPU (jax 0.10.2) the
    fill form gave a finite garbage row for an out-of-range id in some runs.
    """
    ids = jnp.asarray(ids)
    valid = (ids >= 0) & (ids < table.shape[0])
    rows = jnp.take(table, jnp.clip(ids, 0, table.shape[0] - 1), axis=0)
    return jnp.where(valid.reshape(valid.shape + (1,) * (rows.ndim - ids.ndim)), rows, jnp.nan)


def normalize_placement(plug) -> None:
    """Checks a frozen plug's `encoder_layers` / `decoder_layers`; index lists become tuples."""
    for stack in ("encoder", "decoder"):
        spec = getattr(plug, f"{stack}_layers")
        if isinstance(spec, str):
            if spec not in ("all", "last", "none"):
                _fail(f"{stack}_layers", "'all', 'last', 'none' or a list of block indices", spec)
        else:
            object.__setattr__(plug, f"{stack}_layers", tuple(int(i) for i in spec))


def layer_indices(spec: LayerSpec, stack: str, num_layers: int) -> tuple[int, ...]:
    """The sorted block indices a placement names in a stack of `num_layers` blocks."""
    if spec == "all":
        return tuple(range(num_layers))
    if spec == "last":
        return (num_layers - 1,)
    if spec == "none":
        return ()
    bad = [i for i in spec if not -num_layers <= i < num_layers]
    if bad:
        _fail(f"{stack}_layers", f"block indices in [-{num_layers}, {num_layers - 1}] "
              f"(the {stack} has {num_layers} blocks)", spec)
    return tuple(sorted({i % num_layers for i in spec}))


def check_task_ids(task_ids, mta: MTAConfig) -> None:
    """Host-side check of a batch's task ids (inside jit an out-of-range id gives NaN logits)."""
    ids = np.asarray(task_ids)
    bad = ids[(ids < 0) | (ids >= len(mta.task_types))]
    if bad.size:
        raise MTAConfigError(
            f"task_ids must lie in [0, {len(mta.task_types) - 1}] (mta.task_types = "
            f"{list(mta.task_types)}); got {sorted(set(bad.tolist()))}")


def top_k_weights(weights: Array, k: int, renormalize: bool) -> Array:
    """Keep the k largest weights per row (static k, lax.top_k), zero the others.

    weights: [batch, num_adapters] -> [batch, num_adapters], exactly n - k zeros per row.
    """
    _, idx = lax.top_k(weights, k)
    keep = jnp.sum(jax.nn.one_hot(idx, weights.shape[-1], dtype=weights.dtype), axis=-2)
    kept = weights * keep
    if renormalize:
        kept = kept / jnp.sum(kept, axis=-1, keepdims=True)
    return kept


class Adapters(nn.Module):
    """`num` adapters of one kind stacked on an `adapter` axis, computed together."""

    config: t5_lib.T5Config
    mta: MTAConfig
    num: int

    @nn.compact
    def __call__(self, x: Array, weights: Optional[Array], *, deterministic: bool) -> Array:
        """x: [b, l, embed]; weights: [b, num] or None.

        With weights: sum_n w_bn A_n(x) -> [b, l, embed]. Without: every output [b, l, num, embed].
        """
        c, m = self.config, self.mta
        dt = t5_lib.dtype_of(c.dtype)
        pdt = t5_lib.dtype_of(c.param_dtype)
        ffn = m.adapter_kind == "ffn"
        width, width_axis = (c.d_ff, "mlp") if ffn else (m.adapter_dim, "adapter_mlp")

        def w(name, shape, axes, init):
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, pdt).astype(dt)

        w_in = lambda name: w(name, (self.num, c.d_model, width), ("adapter", "embed", width_axis),
                              nn.initializers.normal(c.d_model ** -0.5))
        # Bottleneck adapters start as an exact no-op: their up-projection is zero.
        out_init = nn.initializers.normal(width ** -0.5) if ffn else nn.initializers.zeros
        w_out = w("wo", (self.num, width, c.d_model), ("adapter", width_axis, "embed"), out_init)

        gather = weights is not None and m.top_k is not None and m.topk_compute == "gather"
        if gather:
            # Only the k kept adapters of each example: [b, k] weights and indices, and the
            # adapters' matrices taken per example, [num, ...] -> [b, k, ...].
            weights, kept = lax.top_k(weights, m.top_k)
            take = lambda a: jnp.take(a, kept, axis=0)
            project = lambda name: jnp.einsum("ble,bnef->blnf", x, take(w_in(name)))
            w_out = take(w_out)
        else:
            # The adapter axis is a batch axis of both products (the input broadcast along
            # it), so XLA runs n plain matmuls on the weights as stored; contracting it as a
            # free axis ("ble,nef->blnf") made XLA CPU transpose every adapter matrix in the
            # forward and backward passes (benchmarks/README.md).
            xn = jnp.broadcast_to(x, (self.num,) + x.shape)
            project = lambda name: jnp.einsum("nble,nef->nblf", xn, w_in(name))
        if ffn and c.is_gated:
            h = c.activation(project("wi_0")) * project("wi_1")
        else:
            h = (c.activation if ffn else nn.relu)(project("wi"))
        h = nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)  # [b, l, n, f] | [n, b, l, f]
        if gather:
            h = h * weights.astype(dt)[:, None, :, None]
            return jnp.einsum("blnf,bnfe->ble", h, w_out)
        y = jnp.einsum("nblf,nfe->nble", h, w_out)
        if weights is None:
            return y.transpose(1, 2, 0, 3)  # [b, l, n, embed]
        return jnp.einsum("nble,bn->ble", y, weights.astype(dt))


class Selector(nn.Module):
    """Task Weight Selector: logits [b, num_adapters], Softmax-T applied by the caller."""

    config: t5_lib.T5Config
    mta: MTAConfig

    @nn.compact
    def __call__(self, task_ids: Optional[Array], route_hidden: Array) -> Array:
        m = self.mta
        if m.selector == "task":
            if task_ids is None:
                raise MTAConfigError(
                    "task_ids (int32[batch]) is required when mta.selector == 'task'")
            table = self.param(
                "logits", nn.with_logical_partitioning(
                    lambda *_: jnp.asarray(m.initial_logits()), ("task", "adapter")),
                (len(m.task_types), m.num_adapters), jnp.float32)
            # Out-of-range ids give NaN logit rows under jit; check_task_ids names them on the
            # host before a step (XLA may not carry the NaN through a fused softmax).
            return take_or_nan(table, task_ids)
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
    stack: str

    @nn.compact
    def __call__(self, x: Array, ctx: t5_lib.FfnContext, *, deterministic: bool) -> Array:
        """x: [b, l, embed] (already normed) -> [b, l, embed]."""
        c, m = self.config, self.mta
        # The encoder routes on its own [START] position; the decoder on the encoder's.
        route_hidden = x[:, 0] if ctx.route_hidden is None else ctx.route_hidden
        logits = Selector(c, m, name="selector")(ctx.task_ids, route_hidden)  # [b, E]
        weights = jax.nn.softmax(logits / m.temperature, axis=-1)
        self.sow("router", "selector_weights", weights)
        if m.selector == "start_token" and ctx.task_ids is not None:
            # The biased initialisation's spirit: task t should route to its own {t, t+1}.
            own = jnp.asarray(m.initial_logits() > m.init_base, jnp.float32)[ctx.task_ids]
            aux = -jnp.mean(jnp.log(jnp.sum(weights * own, axis=-1) + 1e-9))
            self.sow("router", "selector_task_loss", aux)
            # Sown already weighted: the train step adds every leaf of 'losses' to the loss.
            self.sow("losses", "selector_task_loss", m.selector_loss_weight * aux)
        if m.top_k is not None:
            weights = top_k_weights(weights, m.top_k, m.renormalize)
        self.sow("router", "adapter_weights", weights)
        y_task = Adapters(c, m, m.num_adapters, name="adapters")(
            x, weights, deterministic=deterministic)
        if m.num_shared_adapters == 0:
            return y_task

        y_shared = Adapters(c, m, m.num_shared_adapters, name="shared_adapters")(
            x, None, deterministic=deterministic)  # [b, l, S, embed]
        gate = self._gate(jnp.concatenate([y_task[:, :1, None], y_shared[:, :1]], axis=2), ctx)
        self.sow("router", "gate_weights", gate)
        g = gate.astype(y_task.dtype)
        return g[:, None, :1] * y_task + jnp.einsum("blse,bs->ble", y_shared, g[:, 1:])

    def _gate(self, first: Array, ctx: t5_lib.FfnContext) -> Array:
        """first: [b, 1, 1 + S, embed] outputs at the first position -> weights [b, 1 + S].

        In incremental decoding only the first step sees position 0: its gate is cached.
        """
        m = self.mta
        n_out = 1 + m.num_shared_adapters
        flat = first.reshape(first.shape[0], -1).astype(jnp.float32)
        hidden = nn.relu(nn.Dense(
            m.gate_hidden_dim, name="gate_hidden", dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("gate_in", "gate_hidden")))(flat))
        gate = jax.nn.softmax(nn.Dense(
            n_out, name="gate_out", dtype=jnp.float32,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("gate_hidden", "gate_out")))(hidden), axis=-1)
        if ctx.decode:
            stepping = self.has_variable("cache", "gate")
            cached = self.variable("cache", "gate", jnp.zeros, gate.shape, gate.dtype)
            if stepping:
                gate = jnp.where(ctx.decode_index == 0, gate, cached.value)
                cached.value = gate
        return gate


def stage_two_config(stage1: MTAConfig, *, top_k: Optional[int] = 2,
                     num_shared_adapters: int = 1, **changes) -> MTAConfig:
    return dataclasses.replace(stage1, top_k=top_k, num_shared_adapters=num_shared_adapters,
                               **changes)


def stage_two_params(stage1_params: Mapping, model: t5_lib.T5, rng: Array,
                     pretrained: Optional[Mapping] = None) -> dict:
    """Stage-one parameters -> stage-two parameters for `model` (its plug has the gate).

    Every stage-one leaf is kept bitwise. New leaves (shared adapters, gate) are initialised
    from `rng`; `ffn` shared adapters then start as copies of the pretrained FFN of their
    layer when `pretrained` (a flat backbone tree from hf.hf_to_backbone) is given, else as
    the mean of that layer's stage-one task adapters.
    """
    import flax

    fresh = flax.traverse_util.flatten_dict(nn.unbox(t5_lib.init_params(model, rng)))
    old = flax.traverse_util.flatten_dict(nn.unbox(dict(stage1_params)))
    unknown = sorted("/".join(k) for k in old if k not in fresh)
    if unknown:
        raise MTAConfigError(f"stage-one parameters not in the stage-two model: {unknown[:3]}")
    plug: MTAConfig = model.config.ffn_plug
    out = dict(fresh)
    out.update(old)
    if plug.adapter_kind == "ffn":
        if pretrained is not None:
            pre = flax.traverse_util.flatten_dict(dict(pretrained))
            new_shared = {k: v for k, v in plug.init_from_pretrained(fresh, pre).items()
                          if "shared_adapters" in k}
        else:
            new_shared = {}
            for k in fresh:
                if k[-2:-1] == ("shared_adapters",):
                    task = k[:-2] + ("adapters", k[-1])
                    mean = jnp.mean(old[task], axis=0, keepdims=True)
                    new_shared[k] = jnp.broadcast_to(mean, fresh[k].shape)
        out.update({k: v for k, v in new_shared.items() if k not in old})
    return flax.traverse_util.unflatten_dict(
        {k: jnp.asarray(v, dtype=fresh[k].dtype) if k not in old else v for k, v in out.items()})
