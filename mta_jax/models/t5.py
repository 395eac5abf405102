"""A Flax Linen T5 encoder-decoder (v1.0, v1.1, Flan-T5) that matches Hugging Face's.

Parity-relevant choices, all taken from the PyTorch reference:
  * no 1/sqrt(d) scaling of attention scores;
  * one bucketed relative-position bias per stack (bidirectional in the encoder, causal in
    the decoder), owned by the stack and shared by all its layers;
  * RMS layer norm without mean or bias, computed in float32;
  * pre-norm residual sub-layers, a final norm per stack;
  * v1.0 scales the decoder output by d_model**-0.5 before a head tied to the embedding.

The FFN sub-layer is pluggable: `T5Config.ffn_plug` (an `FfnPlug`) says in which blocks of
each stack a different module (the MTA block, a mixture-of-experts baseline, ...) replaces or
joins the dense FFN, and builds that module. Every parameter carries logical axis names, so
sharding needs no model change.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional, Union

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mta_jax.errors import ConfigError
from mta_jax.models.ffn import Dropout, StackedFFN

Array = jax.Array
# Blocks of one stack: "all" | "last" | "none" | block indices (negative count from the end).
LayerSpec = Union[str, tuple[int, ...]]
STACKS = ("encoder", "decoder")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "silu": nn.silu,
}


def dtype_of(name: str) -> Any:
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


@struct.dataclass
class FfnContext:
    """Per-example information a plugged FFN may route on. A pytree whose `decode` is static:
    a rematerialised block (config.remat) traces the arrays and still branches on `decode`."""

    task_ids: Optional[Array]  # int32[batch] or None
    route_hidden: Optional[Array]  # [batch, embed]: encoder output at position 0 (decoder only)
    decode: bool = struct.field(pytree_node=False)  # a key/value cache is in use
    decode_index: Optional[Array] = None  # int32 scalar: the position being decoded, if stepping
    dropout_after: Optional[Array] = None  # the block's input, when its masks wait for it


@dataclasses.dataclass(frozen=True)
class FfnPlug:
    """A module that replaces (or, `replaces_dense` False, is added to) the dense FFN of chosen
    blocks: where it sits, and how it builds its module. Subclasses add their settings:
    `mta.MTAConfig`, `moe.SwitchConfig`, `moe.TaskMoEConfig`, `adapters.SharedAdapterConfig`.

    Placement errors name `mta.<stack>_layers`: every plug reads its blocks from there.
    """

    encoder_layers: LayerSpec = "last"  # encoder blocks that carry the plug
    decoder_layers: LayerSpec = "last"  # decoder blocks, same syntax
    replaces_dense: ClassVar[bool] = True  # False: the dense FFN stays, the plug's output is added

    def __post_init__(self):
        for stack in STACKS:
            spec = getattr(self, f"{stack}_layers")
            if isinstance(spec, str):
                if spec not in ("all", "last", "none"):
                    raise ConfigError(f"mta.{stack}_layers must be 'all', 'last', 'none' or a "
                                      f"list of block indices; got {spec!r}")
            else:
                object.__setattr__(self, f"{stack}_layers", tuple(int(i) for i in spec))

    def layer_indices(self, stack: str, num_layers: int) -> tuple[int, ...]:
        """The sorted block indices of `stack` (of `num_layers` blocks) that carry the plug."""
        spec = getattr(self, f"{stack}_layers")
        if spec == "all":
            return tuple(range(num_layers))
        if spec == "last":
            return (num_layers - 1,)
        if spec == "none":
            return ()
        if any(not -num_layers <= i < num_layers for i in spec):
            raise ConfigError(f"mta.{stack}_layers must be block indices in [-{num_layers}, "
                              f"{num_layers - 1}] (the {stack} has {num_layers} blocks); "
                              f"got {spec!r}")
        return tuple(sorted({i % num_layers for i in spec}))

    def make(self, config: "T5Config") -> nn.Module:
        """The module of one plugged block; called inside the block's FFN sub-layer, it takes
        (x [b, l, embed] normed, FfnContext, deterministic=...) -> [b, l, embed]."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: Optional[int] = None  # None: same as num_layers (num_layers_of)
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (v1.0) | "gated-gelu" (v1.1, Flan) | "gated-<act>" | "<act>"
    tie_word_embeddings: bool = True  # the LM head is the shared embedding
    scale_decoder_outputs: bool = True  # multiply the decoder output by d_model**-0.5 (v1.0)
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    dtype: str = "float32"  # computation dtype
    param_dtype: str = "float32"  # storage dtype of parameters
    remat: bool = False  # rematerialise each block in the backward pass
    # Draw each block's dropout masks once the block's input exists (ffn.Dropout); build sets
    # it under tensor parallelism, where XLA drew every mask at the start of the step.
    tie_dropout_masks: bool = False
    ffn_plug: Optional[FfnPlug] = None  # e.g. mta.MTAConfig; None for plain T5

    def __post_init__(self):
        dtype_of(self.dtype)
        dtype_of(self.param_dtype)
        act = self.feed_forward_proj.split("-")[-1]
        if act not in _ACTIVATIONS or self.feed_forward_proj.count("-") > 1 or (
            "-" in self.feed_forward_proj and not self.feed_forward_proj.startswith("gated-")
        ):
            raise ValueError(
                f"feed_forward_proj must be '<act>' or 'gated-<act>' with act in "
                f"{sorted(_ACTIVATIONS)}, got {self.feed_forward_proj!r}"
            )
        if self.ffn_plug is not None:
            for stack in STACKS:  # block indices against the stack depths, before any tracing
                self.ffn_plug.layer_indices(stack, self.num_layers_of(stack))

    def num_layers_of(self, stack: str) -> int:
        """Blocks in "encoder" or "decoder" (num_decoder_layers None: as many as the encoder)."""
        if stack == "decoder" and self.num_decoder_layers is not None:
            return self.num_decoder_layers
        return self.num_layers

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self):
        act = self.feed_forward_proj.split("-")[-1]
        # Hugging Face maps "gated-gelu" to the tanh approximation ("gelu_new").
        if self.feed_forward_proj == "gated-gelu":
            act = "gelu_new"
        return _ACTIVATIONS[act]

    def replace(self, **changes) -> "T5Config":
        return dataclasses.replace(self, **changes)


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


def _param(module: nn.Module, name: str, init, shape, axes, config: T5Config):
    return module.param(
        name, nn.with_logical_partitioning(init, axes), shape, dtype_of(config.param_dtype)
    )


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean, statistics in float32."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",), self.config)
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * lax.rsqrt(var + self.config.layer_norm_epsilon)
        return (y * scale.astype(jnp.float32)).astype(dtype_of(self.config.dtype))


class Embed(nn.Module):
    config: T5Config

    def setup(self):
        c = self.config
        self.embedding = _param(
            self, "embedding", _normal(1.0), (c.vocab_size, c.d_model), ("vocab", "embed"), c
        )

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding, ids, axis=0).astype(dtype_of(self.config.dtype))

    def attend(self, x: Array) -> Array:
        """x: [batch, length, embed] -> float32 logits [batch, length, vocab]."""
        w = self.embedding.astype(x.dtype)
        return jnp.einsum("ble,ve->blv", x, w, preferred_element_type=jnp.float32)


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """Hugging Face's `_relative_position_bucket`, written with the same float32 steps."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
        relative_position = jnp.abs(relative_position)
    else:
        relative_position = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    # The reference divides a float32 tensor by a Python float: float32 arithmetic.
    scaled = (jnp.log(relative_position.astype(jnp.float32) / max_exact)
              / np.float32(math.log(max_distance / max_exact))
              * np.float32(num_buckets - max_exact))
    if_large = max_exact + scaled.astype(relative_position.dtype)
    if_large = jnp.minimum(if_large, num_buckets - 1)
    return buckets + jnp.where(is_small, relative_position, if_large)


class RelativePositionBias(nn.Module):
    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, query_positions: Array, key_length: int) -> Array:
        """query_positions: int32[q] -> float32 bias [1, heads, q, key_length]."""
        c = self.config
        table = _param(
            self, "rel_embedding", _normal(c.d_model ** -0.5),
            (c.relative_attention_num_buckets, c.num_heads), ("relpos_buckets", "heads"), c,
        )
        rel = jnp.arange(key_length, dtype=jnp.int32)[None, :] - query_positions[:, None]
        buckets = relative_position_bucket(
            rel, self.bidirectional, c.relative_attention_num_buckets,
            c.relative_attention_max_distance,
        )
        values = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [q, k, heads]
        return jnp.transpose(values, (2, 0, 1))[None]


class Attention(nn.Module):
    """Multi-head attention without score scaling; an optional key/value cache."""

    config: T5Config
    is_cross: bool = False

    @nn.compact
    def __call__(self, x: Array, kv_input: Array, bias: Array, *, deterministic: bool,
                 decode: bool = False, decode_index: Optional[Array] = None,
                 dropout_after: Optional[Array] = None) -> Array:
        """x: [b, q, embed]; kv_input: [b, k, embed]; bias: float32 [b|1, heads, q, k]."""
        c = self.config
        dt = dtype_of(c.dtype)
        h, d, e = c.num_heads, c.d_kv, c.d_model
        proj = lambda name, std: _param(self, name, _normal(std), (e, h, d), ("embed", "heads", "kv"), c)
        wq, wk, wv = proj("query", (e * d) ** -0.5), proj("key", e ** -0.5), proj("value", e ** -0.5)
        wo = _param(self, "out", _normal((h * d) ** -0.5), (h, d, e), ("heads", "kv", "embed"), c)

        # Projections are plain 2-D matmuls against [embed, heads * kv] views of the weights
        # (free reshapes); only the small activations are transposed to head-major
        # [b, heads, length, kv], the layout the score and mixing dots read and the cache
        # keeps. Einsums straight to head-major made XLA re-lay out the weights at every
        # decoding step instead (benchmarks/README.md, decoding).
        def project(t, w):  # t: [b, l, embed], w: [embed, heads, kv] -> [b, heads, l, kv]
            y = t @ w.reshape(e, h * d).astype(dt)
            return y.reshape(t.shape[0], t.shape[1], h, d).transpose(0, 2, 1, 3)

        q = project(x, wq)
        project_kv = lambda t: (project(t, wk), project(t, wv))
        if decode and self.is_cross:
            # Encoder keys/values are computed once, when the cache is created, then reused.
            kv = self.variable("cache", "cross_kv", lambda: project_kv(kv_input))
            k, v = kv.value
        elif decode:
            k_new, v_new = project_kv(kv_input)
            initialised = self.has_variable("cache", "cached_key")
            ck = self.variable("cache", "cached_key", jnp.zeros, k_new.shape, k_new.dtype)
            cv = self.variable("cache", "cached_value", jnp.zeros, v_new.shape, v_new.dtype)
            if initialised:
                start = (0, 0, decode_index, 0)
                ck.value = lax.dynamic_update_slice(ck.value, k_new, start)
                cv.value = lax.dynamic_update_slice(cv.value, v_new, start)
            k, v = ck.value, cv.value
        else:
            k, v = project_kv(kv_input)

        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(scores + bias, axis=-1).astype(dt)
        weights = Dropout(c.dropout_rate)(weights, deterministic=deterministic,
                                          after=dropout_after)
        out = jnp.einsum("bhqk,bhkd->bhqd", weights, v)
        out = out.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], h * d)
        return out @ wo.reshape(h * d, e).astype(dt)


class FfnSubLayer(nn.Module):
    """The FFN sub-layer of one block: dense, plugged, or both (the plug added in parallel)."""

    config: T5Config
    stack: str
    layer: int

    @nn.compact
    def __call__(self, x: Array, ctx: FfnContext, *, deterministic: bool) -> Array:
        c = self.config
        plug = c.ffn_plug
        plugged = plug is not None and self.layer in plug.layer_indices(
            self.stack, c.num_layers_of(self.stack))
        out = 0.0
        if not plugged or not plug.replaces_dense:
            out = StackedFFN(c, name="mlp")(x, deterministic=deterministic,
                                            dropout_after=ctx.dropout_after)
        if plugged:
            out = out + plug.make(c)(x, ctx, deterministic=deterministic)
        return out


class Block(nn.Module):
    config: T5Config
    stack: str  # "encoder" | "decoder"
    layer: int

    @nn.compact
    def __call__(self, x, self_bias, encoded, cross_bias, ctx: FfnContext, deterministic: bool,
                 decode: bool):
        """x: [b, l, embed]; biases: float32 [b|1, heads, q, k]; encoded: [b, s, embed] | None."""
        c = self.config
        is_dec = self.stack == "decoder"
        idx = ctx.decode_index
        after = x if c.tie_dropout_masks else None  # every mask of the block waits for x
        dropout = Dropout(c.dropout_rate)  # one module (one key stream) for the three
        drop = lambda y: dropout(y, deterministic=deterministic, after=after)

        y = RMSNorm(c, name="pre_self_attention_layer_norm")(x)
        y = Attention(c, name="self_attention")(y, y, self_bias, deterministic=deterministic,
                                               decode=decode, decode_index=idx,
                                               dropout_after=after)
        x = x + drop(y)
        if is_dec:
            y = RMSNorm(c, name="pre_cross_attention_layer_norm")(x)
            y = Attention(c, is_cross=True, name="encoder_decoder_attention")(
                y, encoded, cross_bias, deterministic=deterministic, decode=decode,
                dropout_after=after)
            x = x + drop(y)
        y = RMSNorm(c, name="pre_mlp_layer_norm")(x)
        y = FfnSubLayer(c, self.stack, self.layer, name="ffn")(
            y, ctx.replace(dropout_after=after), deterministic=deterministic)
        return x + drop(y)


def _mask_bias(mask: Array) -> Array:
    """1/0 mask [b, q|1, k] -> additive float32 bias [b, 1, q|1, k], as Hugging Face does."""
    return ((1.0 - mask.astype(jnp.float32)) * jnp.finfo(jnp.float32).min)[:, None]


class Stack(nn.Module):
    config: T5Config
    stack: str
    embed: Embed

    @nn.compact
    def __call__(self, ids, mask, encoded=None, encoder_mask=None, *, task_ids=None,
                 deterministic=True, decode=False):
        """ids: int32[b, l]; mask: [b, l] (1 = token) -> normed hidden [b, l, embed]."""
        c = self.config
        is_dec = self.stack == "decoder"
        n_layers = c.num_layers_of(self.stack)
        length = ids.shape[1]
        rel = RelativePositionBias(c, bidirectional=not is_dec, name="relpos_bias")

        decode_index = None
        stepping = False
        if decode:
            assert is_dec, "only the decoder decodes incrementally"
            # The cache is created by one call with a [b, max_length] dummy input; the shape
            # of `key_positions` then records max_length statically for every later step.
            stepping = self.has_variable("cache", "index")
            index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
            key_positions = self.variable(
                "cache", "key_positions", lambda: jnp.arange(length, dtype=jnp.int32))
            if stepping:
                assert length == 1, "incremental decoding feeds one position at a time"
                decode_index = index.value
                index.value = decode_index + 1

        if stepping:
            key_len = key_positions.value.shape[0]
            bias = rel(decode_index[None], key_len)
            visible = (jnp.arange(key_len) <= decode_index).astype(jnp.float32)
            self_bias = bias + _mask_bias(jnp.broadcast_to(visible, (ids.shape[0], 1, key_len)))
        else:
            bias = rel(jnp.arange(length, dtype=jnp.int32), length)
            key_mask = mask[:, None, :].astype(jnp.float32)
            if is_dec:
                key_mask = key_mask * jnp.tril(jnp.ones((length, length), jnp.float32))[None]
            self_bias = bias + _mask_bias(key_mask)

        cross_bias = _mask_bias(encoder_mask[:, None, :]) if is_dec else None
        route_hidden = encoded[:, 0] if is_dec else None
        ctx = FfnContext(task_ids, route_hidden, decode, decode_index)

        x = self.embed(ids)
        x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
        block_cls = Block
        if c.remat and not decode:
            block_cls = nn.remat(Block, static_argnums=(6, 7))
        # Activations stay batch-sharded between blocks (a no-op without a mesh and rules);
        # without it XLA may gather whole activations around the norms under FSDP.
        constrain = lambda h: nn.with_logical_constraint(h, ("batch", "length", "embed"))
        x = constrain(x)
        for i in range(n_layers):
            x = constrain(block_cls(c, self.stack, i, name=f"layers_{i}")(
                x, self_bias, encoded, cross_bias, ctx, deterministic, decode))
        x = RMSNorm(c, name="final_layer_norm")(x)
        return nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)


class T5(nn.Module):
    """T5 encoder-decoder. `__call__` returns float32 logits [batch, target_length, vocab]."""

    config: T5Config

    def setup(self):
        self.shared = Embed(self.config)
        self.encoder = Stack(self.config, "encoder", self.shared)
        self.decoder = Stack(self.config, "decoder", self.shared)
        if not self.config.tie_word_embeddings:
            c = self.config
            # Hugging Face initialises the head with std 1; with no output scaling that gives
            # logits of std sqrt(d_model) and a loss far above log(vocab) for random models.
            self.lm_head = self.param(
                "lm_head", nn.with_logical_partitioning(_normal(c.d_model ** -0.5), ("embed", "vocab")),
                (c.d_model, c.vocab_size), dtype_of(c.param_dtype))

    def __call__(self, input_ids, decoder_input_ids, attention_mask=None,
                 decoder_attention_mask=None, deterministic=True, task_ids=None):
        encoded = self.encode(input_ids, attention_mask, task_ids=task_ids,
                              deterministic=deterministic)
        return self.decode(encoded, attention_mask, decoder_input_ids, decoder_attention_mask,
                           task_ids=task_ids, deterministic=deterministic)

    def encode(self, input_ids, attention_mask=None, *, task_ids=None, deterministic=True):
        """input_ids: int32[b, s] -> encoded [b, s, embed]."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        return self.encoder(input_ids, attention_mask, task_ids=task_ids,
                            deterministic=deterministic)

    def decode(self, encoded, attention_mask, decoder_input_ids, decoder_attention_mask=None, *,
               task_ids=None, deterministic=True, decode=False):
        """encoded: [b, s, embed]; decoder_input_ids: int32[b, t] -> float32 [b, t, vocab].

        decode=True uses the 'cache' collection: the first call (no cache yet, t = the maximum
        length) creates it, every later call feeds one position (t = 1).
        """
        c = self.config
        if attention_mask is None:
            attention_mask = jnp.ones(encoded.shape[:2], jnp.int32)
        if decoder_attention_mask is None:
            decoder_attention_mask = jnp.ones_like(decoder_input_ids)
        x = self.decoder(decoder_input_ids, decoder_attention_mask, encoded, attention_mask,
                         task_ids=task_ids, deterministic=deterministic, decode=decode)
        if c.scale_decoder_outputs:
            x = x * (c.d_model ** -0.5)
        if c.tie_word_embeddings:
            return self.shared.attend(x)
        w = self.lm_head.astype(x.dtype)
        return jnp.einsum("ble,ev->blv", x, w, preferred_element_type=jnp.float32)


def init_params(model: T5, rng: Array, batch: int = 1, source_length: int = 8,
                target_length: int = 8) -> Any:
    """Random parameters (boxed with logical axis names; `nn.unbox` removes the boxes)."""
    ids = jnp.ones((batch, source_length), jnp.int32)
    dec = jnp.ones((batch, target_length), jnp.int32)
    task_ids = jnp.zeros((batch,), jnp.int32)
    return model.init(rng, ids, dec, task_ids=task_ids)["params"]
