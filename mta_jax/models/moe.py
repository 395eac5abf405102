"""Mixture-of-experts baselines for MTA: Switch (token-level top-1) and task-level top-1.

    switch_moe:  y = h + sum_t combine[t, e, c] * FFN_e( dispatch(RMSNorm(h)) )     (Switch)
    task_moe:    y = h + FFN_{task(example)}( RMSNorm(h) )                          (hard routing)

Both replace the dense FFN in the MTA blocks (`encoder_layers` / `decoder_layers`, the same
syntax as mta.MTAConfig) with E FFN experts of the backbone's shape: one `ffn.StackedFFN` on
the `adapter` axis (replicated, as MTA's adapters are), initialised as copies of the
pretrained FFN of their layer. Their parameters live under `<stack>/layers_<i>/ffn/moe`.

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

import flax.linen as nn
import jax
import jax.numpy as jnp

from mta_jax.errors import ConfigError
from mta_jax.models import ffn as ffn_lib
from mta_jax.models import t5 as t5_lib
from mta_jax.task_types import TASK_TYPES

Array = jax.Array


def _check(ok: bool, field: str, rule: str, value) -> None:
    if not ok:
        raise ConfigError(f"moe.{field} must be {rule}; got {value!r}")


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
class SwitchConfig(t5_lib.FfnPlug):
    num_experts: int = 5
    capacity_factor: float = 1.25  # training: expert slots = ceil(factor * tokens / E) per group
    eval_capacity_factor: float = 2.0  # the same when deterministic (evaluation, decoding)
    load_balance_weight: float = 0.01  # Switch's alpha
    z_loss_weight: float = 1e-3  # ST-MoE's router z-loss coefficient
    router_init_std: float = 0.02  # flaxformer's router kernel initialisation

    def __post_init__(self):
        super().__post_init__()
        _check(self.num_experts >= 1, "num_experts", ">= 1", self.num_experts)
        for field in ("capacity_factor", "eval_capacity_factor"):
            _check(getattr(self, field) > 0, field, "> 0", getattr(self, field))
        for field in ("load_balance_weight", "z_loss_weight"):
            _check(getattr(self, field) >= 0, field, ">= 0", getattr(self, field))

    def make(self, config: t5_lib.T5Config) -> nn.Module:
        return SwitchMoE(config, self, name="moe")


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
        if not ctx.decode:
            # Per-example mean router probabilities (router/adapter_usage and the routing
            # heatmap). While decoding, the decoder's tokens are a cache's placeholders.
            self.sow("router", "adapter_weights", jnp.mean(probs, axis=1))

        dt = jnp.dtype(c.dtype)
        expert_in = jnp.einsum("btec,btm->ebcm", dispatch.astype(dt), x)  # [E, b, C, embed]
        expert_out = ffn_lib.StackedFFN(c, num=m.num_experts, name="experts")(
            expert_in, deterministic=deterministic, dropout_after=ctx.dropout_after)
        return jnp.einsum("btec,ebcm->btm", combine.astype(dt), expert_out)


# ----------------------------------------------------------------------------- task-level

@dataclasses.dataclass(frozen=True)
class TaskMoEConfig(t5_lib.FfnPlug):
    task_types: tuple[str, ...] = TASK_TYPES  # one expert per task type, in this order

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "task_types", tuple(self.task_types))
        _check(len(self.task_types) >= 1, "task_types", "non-empty", self.task_types)

    def make(self, config: t5_lib.T5Config) -> nn.Module:
        return TaskMoE(config, self, name="moe")


class TaskMoE(nn.Module):
    """Each task type has its own FFN; an example uses its type's (hard routing by task id)."""

    config: t5_lib.T5Config
    moe: TaskMoEConfig

    @nn.compact
    def __call__(self, x: Array, ctx: t5_lib.FfnContext, *, deterministic: bool) -> Array:
        """x: [b, l, embed] (already normed) -> [b, l, embed]."""
        if ctx.task_ids is None:
            raise ConfigError("task_ids (int32[batch]) is required by variant 'task_moe'")
        n = len(self.moe.task_types)
        self.sow("router", "adapter_weights", jax.nn.one_hot(ctx.task_ids, n, dtype=jnp.float32))
        y = ffn_lib.StackedFFN(self.config, num=n, name="experts")(
            x, deterministic=deterministic, select=ctx.task_ids[:, None],
            dropout_after=ctx.dropout_after)  # [b, l, 1, embed]
        return y[:, :, 0]
