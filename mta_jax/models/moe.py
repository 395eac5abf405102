"""Mixture-of-experts baselines for MTA: Switch (token-level top-1) and task-level top-1.

    switch_moe:  y = h + sum_t combine[t, e, c] * FFN_e( dispatch(RMSNorm(h)) )     (Switch)
    task_moe:    y = h + FFN_{task(example)}( RMSNorm(h) )                          (hard routing)

Both replace the dense FFN in the MTA blocks (`encoder_layers` / `decoder_layers`, the same
syntax as mta.MTAConfig) with E FFN experts of the backbone's shape, stacked on the `adapter`
axis (replicated, as MTA's adapters are) and initialised as copies of the pretrained FFN of
their layer. Their parameters live under `<stack>/layers_<i>/ffn/moe`.

Switch routing follows Fedus et al. (2021) and flaxformer: each sequence is one routing
group; a token goes to its argmax expert, first come first served, until the expert holds
`capacity = ceil(capacity_factor * tokens / E)` tokens; later tokens are dropped (the plug
returns zero for them, so the block's residual carries them through unchanged). The expert
output is scaled by the router probability, which is how the router gets its gradient.
Auxiliary losses are sown already weighted in 'losses'; router statistics in 'router'.

Padding tokens are routed too (the plug sees no mask); with right padding they come last in
every group and so can only be dropped, never displace a real token. Incremental decoding
routes one token per sequence at a time, so no decoder token is dropped at inference.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mta_jax.models import mta as mta_lib
from mta_jax.models import t5 as t5_lib

Array = jax.Array
LayerSpec = mta_lib.LayerSpec


@dataclasses.dataclass(frozen=True)
class Placement:
    """Which blocks a plug sits in: the MTA blocks' syntax, checked against stack depths.

    Errors name `mta.<stack>_layers`: the variants read their placement from there.
    """

    encoder_layers: LayerSpec = "last"
    decoder_layers: LayerSpec = "last"
    task_types: tuple[str, ...] = mta_lib.TASK_TYPES  # task id i is task_types[i]

    def __post_init__(self):
        mta_lib.normalize_placement(self)
        object.__setattr__(self, "task_types", tuple(self.task_types))

    def layer_indices(self, stack: str, num_layers: int) -> tuple[int, ...]:
        return mta_lib.layer_indices(getattr(self, f"{stack}_layers"), stack, num_layers)

    def applies_to(self, stack: str, layer: int, num_layers: int) -> bool:
        return layer in self.layer_indices(stack, num_layers)

    def validate(self, config: t5_lib.T5Config) -> None:
        self.layer_indices("encoder", config.num_layers)
        self.layer_indices("decoder", config.n_decoder_layers)


def _check(ok: bool, field: str, rule: str, value: Any) -> None:
    if not ok:
        raise mta_lib.MTAConfigError(f"moe.{field} must be {rule}; got {value!r}")


def copy_pretrained_ffn(flat: dict, backbone: Mapping, name: str, group: str) -> dict:
    """Leaves `.../<name>/<group>/<w>` [E, ...] <- E copies of the layer's pretrained `mlp/<w>`."""
    flat = dict(flat)
    for key in list(flat):
        if name in key and len(key) >= 2 and key[-2] == group:
            dense = key[: key.index(name)] + ("mlp", key[-1])
            if dense in backbone:
                flat[key] = np.broadcast_to(backbone[dense], flat[key].shape).copy()
    return flat


# ----------------------------------------------------------------------------- the experts

class ExpertFFNs(nn.Module):
    """`num` FFNs of the backbone's shape stacked on the `adapter` axis (no Python loop).

    Two ways in: dispatched tokens x [..., num, capacity, embed] (expert axis third from last)
    go through their own expert; or x [b, l, embed] with `expert_ids` [b] runs each example
    through one expert, whose weights are gathered per example.
    """

    config: t5_lib.T5Config
    num: int

    @nn.compact
    def __call__(self, x: Array, expert_ids: Optional[Array] = None, *,
                 deterministic: bool) -> Array:
        c = self.config
        dt, pdt = t5_lib.dtype_of(c.dtype), t5_lib.dtype_of(c.param_dtype)

        def w(name, shape, axes, std):
            init = nn.with_logical_partitioning(nn.initializers.normal(std), axes)
            kernel = self.param(name, init, (self.num,) + shape, pdt).astype(dt)
            # Out-of-range ids give NaN weights (loud under jit); train.py names them host-side.
            return kernel if expert_ids is None else mta_lib.take_or_nan(kernel, expert_ids)

        w_in = lambda name: w(name, (c.d_model, c.d_ff), ("adapter", "embed", "mlp"), c.d_model ** -0.5)
        w_out = w("wo", (c.d_ff, c.d_model), ("adapter", "mlp", "embed"), c.d_ff ** -0.5)
        # "n" is the expert axis (dispatched) or the batch axis (gathered weights).
        spec_in, spec_out = ("...nce,nef->...ncf", "...ncf,nfe->...nce") if expert_ids is None \
            else ("nle,nef->nlf", "nlf,nfe->nle")
        project = lambda name: jnp.einsum(spec_in, x, w_in(name))
        if c.is_gated:
            h = c.activation(project("wi_0")) * project("wi_1")
        else:
            h = c.activation(project("wi"))
        h = nn.Dropout(c.dropout_rate)(h, deterministic=deterministic)
        return jnp.einsum(spec_out, h, w_out)


# ----------------------------------------------------------------------------- Switch

def load_balancing_loss(probs: Array, expert_index: Array) -> Array:
    """Switch's auxiliary loss E * sum_e f_e P_e over all tokens; 1.0 when perfectly balanced.

    probs: float32 [..., tokens, E] router probabilities; expert_index: int [..., tokens]
    (the argmax, before capacity). f_e: fraction of tokens whose argmax is e; P_e: mean
    probability of e. A uniform router gives exactly 1 whatever the argmax ties do.
    """
    num_experts = probs.shape[-1]
    mask = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)
    f = jnp.mean(mask.reshape(-1, num_experts), axis=0)
    p = jnp.mean(probs.reshape(-1, num_experts).astype(jnp.float32), axis=0)
    return num_experts * jnp.sum(f * p)


def router_z_loss(logits: Array) -> Array:
    """ST-MoE's z-loss: mean over tokens of logsumexp(router logits)^2. logits: [..., E]."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def expert_capacity(tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert in a group of `tokens` (static): ceil(factor * tokens / E), at least 1."""
    return max(1, int(math.ceil(capacity_factor * tokens / num_experts)))


def top1_dispatch(probs: Array, capacity: int) -> tuple[Array, Array, Array]:
    """Top-1 routing with a capacity, first come first served within each group.

    probs: [g, t, E] -> (dispatch [g, t, E, C] 0/1, combine [g, t, E, C] = dispatch * the
    chosen probability, expert_index [g, t]). A token whose expert is full has an all-zero
    row in both (it is dropped).
    """
    num_experts = probs.shape[-1]
    expert_index = jnp.argmax(probs, axis=-1)
    chosen = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # [g, t, E]
    position = jnp.cumsum(chosen, axis=1) * chosen - 1  # slot in the expert's buffer, -1 elsewhere
    slot = jax.nn.one_hot(position, capacity, dtype=probs.dtype)  # position >= C: all zeros
    dispatch = slot * chosen[..., None].astype(probs.dtype)
    gate = jnp.max(probs, axis=-1)
    return dispatch, dispatch * gate[..., None, None], expert_index


@dataclasses.dataclass(frozen=True)
class ExpertPlacement(Placement):
    """A plug whose FFN experts replace the dense FFN and start as copies of it on import."""

    name: str = "moe"
    replaces_dense = True

    def init_from_pretrained(self, flat: dict, backbone: Mapping) -> dict:
        return copy_pretrained_ffn(flat, backbone, self.name, "experts")


@dataclasses.dataclass(frozen=True)
class SwitchConfig(ExpertPlacement):
    num_experts: int = 5
    capacity_factor: float = 1.25  # training: expert slots = ceil(factor * tokens / E) per group
    eval_capacity_factor: float = 2.0  # the same when deterministic (evaluation, decoding)
    load_balance_weight: float = 0.01  # Switch's alpha
    z_loss_weight: float = 1e-3  # ST-MoE's router z-loss coefficient
    router_init_std: float = 0.02  # flaxformer's router kernel initialisation
    # The FfnPlug protocol, and what train.py / evaluation.py read from a plug.
    selector = "token"  # routes on each token's hidden state: needs no task id

    def __post_init__(self):
        super().__post_init__()
        _check(self.num_experts >= 1, "num_experts", ">= 1", self.num_experts)
        for field in ("capacity_factor", "eval_capacity_factor"):
            _check(getattr(self, field) > 0, field, "> 0", getattr(self, field))
        for field in ("load_balance_weight", "z_loss_weight"):
            _check(getattr(self, field) >= 0, field, ">= 0", getattr(self, field))

    @property
    def num_adapters(self) -> int:  # columns of evaluation's routing heatmap
        return self.num_experts

    def make(self, config: t5_lib.T5Config, stack: str, layer: int, name: str) -> nn.Module:
        return SwitchMoE(config, self, name=name)


class SwitchMoE(nn.Module):
    """Token-level top-1 mixture of FFN experts with a capacity (see the module docstring)."""

    config: t5_lib.T5Config
    moe: SwitchConfig

    @nn.compact
    def __call__(self, x: Array, ctx: t5_lib.FfnContext, *, deterministic: bool) -> Array:
        """x: [b, l, embed] (already normed) -> [b, l, embed]; zero rows for dropped tokens."""
        c, m = self.config, self.moe
        kernel = self.param(
            "router", nn.with_logical_partitioning(
                nn.initializers.normal(m.router_init_std), ("embed", "adapter")),
            (c.d_model, m.num_experts), jnp.float32)
        logits = x.astype(jnp.float32) @ kernel  # [b, l, E]; routing in float32
        probs = jax.nn.softmax(logits, axis=-1)
        factor = m.eval_capacity_factor if deterministic else m.capacity_factor
        capacity = expert_capacity(x.shape[1], m.num_experts, factor)
        dispatch, combine, expert_index = top1_dispatch(probs, capacity)

        balance, z = load_balancing_loss(probs, expert_index), router_z_loss(logits)
        self.sow("losses", "load_balancing_loss", m.load_balance_weight * balance)
        self.sow("losses", "router_z_loss", m.z_loss_weight * z)
        dispatched = jnp.sum(dispatch)
        self.sow("router", "load_balancing_loss", balance)
        self.sow("router", "router_z_loss", z)
        # flaxformer's names: filled share of all expert slots, mean gate of routed tokens.
        self.sow("router", "expert_usage", dispatched / (x.shape[0] * m.num_experts * capacity))
        self.sow("router", "router_confidence", jnp.sum(combine) / jnp.maximum(dispatched, 1.0))
        self.sow("router", "fraction_tokens_left_behind", 1.0 - dispatched / (x.shape[0] * x.shape[1]))
        # Per-example mean router probabilities: train.py's router/adapter_usage and the
        # per-task routing heatmap of evaluation.py read this name.
        self.sow("router", "adapter_weights", jnp.mean(probs, axis=1))

        dt = t5_lib.dtype_of(c.dtype)
        expert_in = jnp.einsum("btec,btm->becm", dispatch.astype(dt), x)
        expert_out = ExpertFFNs(c, m.num_experts, name="experts")(
            expert_in, deterministic=deterministic)  # [b, E, C, embed]
        return jnp.einsum("btec,becm->btm", combine.astype(dt), expert_out)


# ----------------------------------------------------------------------------- task-level

@dataclasses.dataclass(frozen=True)
class TaskMoEConfig(ExpertPlacement):  # one expert per task type, in task_types' order
    selector = "task"  # reads task_ids: train.py checks them against task_types host-side

    def __post_init__(self):
        super().__post_init__()
        _check(len(self.task_types) >= 1, "task_types", "non-empty", self.task_types)

    @property
    def num_adapters(self) -> int:
        return len(self.task_types)

    def make(self, config: t5_lib.T5Config, stack: str, layer: int, name: str) -> nn.Module:
        return TaskMoE(config, self, name=name)


class TaskMoE(nn.Module):
    """Each task type has its own FFN; an example uses its type's (hard routing by task id)."""

    config: t5_lib.T5Config
    moe: TaskMoEConfig

    @nn.compact
    def __call__(self, x: Array, ctx: t5_lib.FfnContext, *, deterministic: bool) -> Array:
        """x: [b, l, embed] (already normed) -> [b, l, embed]."""
        if ctx.task_ids is None:
            raise mta_lib.MTAConfigError("task_ids (int32[batch]) is required by variant 'task_moe'")
        n = self.moe.num_adapters
        self.sow("router", "adapter_weights", jax.nn.one_hot(ctx.task_ids, n, dtype=jnp.float32))
        return ExpertFFNs(self.config, n, name="experts")(
            x, ctx.task_ids, deterministic=deterministic)
