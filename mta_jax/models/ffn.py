"""T5's feed-forward network, and any number of them stacked on an `adapter` axis.

    FFN(x) = wo( dropout( act(x wi) ) )               T5 v1.0 (ReLU)
    FFN(x) = wo( dropout( act(x wi_0) * (x wi_1) ) )  T5 v1.1 / Flan-T5 (gated GELU)

One module serves every FFN of the project: the backbone's dense FFN (`num=None`), MTA's task
and shared adapters, the Switch and task-level MoE experts and the shared-adapter baseline
(`num=E`). Stacked weights are [E, embed, width] and [E, width, embed]; the adapter axis is a
batch axis of both products, so XLA runs E plain matmuls on the weights as they are stored
(contracting it as a free axis made XLA transpose every adapter matrix: benchmarks/README.md).

Two kinds: `ffn` has the backbone's shape and activation (axis `mlp`, shardable like the dense
FFN); `bottleneck` is embed -> width -> embed with ReLU (axis `adapter_mlp`) and starts as an
exact no-op (its `wo` is zero).

`Dropout`, the model's dropout, lives here too, in the lowest model module.
"""
from __future__ import annotations

from typing import Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

KINDS = ("ffn", "bottleneck")
STACK_AXIS = "adapter"


class Dropout(nn.Dropout):
    """`nn.Dropout` (the same key, the same mask) whose mask, given `after`, is drawn no earlier
    than `after` exists.

    A mask depends on its key alone, so XLA may draw it anywhere in the step. Compiled for TPU
    under tensor parallelism it drew every layer's masks at the start, all live at once: in
    stage two, whose frozen layers keep nothing for a backward pass, that was most of the
    temporaries (T5-base on a v5e-8 under fsdp=4 x tensor=2: 3.01 GiB against 1.44 under
    fsdp=8). The key passes through an optimization barrier with `after` (a block's input, a
    buffer that exists anyway), so each mask waits for its block. T5Config.tie_dropout_masks.
    """

    @nn.compact
    def __call__(self, inputs: Array, deterministic: Optional[bool] = None, rng=None, *,
                 after: Optional[Array] = None) -> Array:
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if after is not None and not deterministic and 0.0 < self.rate < 1.0:
            if rng is None:
                rng = self.make_rng(self.rng_collection)
            _, rng = lax.optimization_barrier((after, rng))
        return super().__call__(inputs, deterministic, rng)


def take_or_nan(table: Array, ids: Array) -> Array:
    """table[ids] along axis 0, with NaN rows where an id is out of range.

    Inside jit an out-of-range id cannot raise; a NaN row makes it loud rather than silently
    clamped to the last row.
    """
    ids = jnp.asarray(ids)
    valid = (ids >= 0) & (ids < table.shape[0])
    rows = jnp.take(table, jnp.clip(ids, 0, table.shape[0] - 1), axis=0)
    return jnp.where(valid.reshape(valid.shape + (1,) * (rows.ndim - ids.ndim)), rows, jnp.nan)


class StackedFFN(nn.Module):
    """`num` FFNs on a leading `adapter` axis (`num=None`: one FFN, no such axis).

    Attributes:
      config: the backbone's T5Config (dtypes, d_model, d_ff, dropout, activation).
      num: how many FFNs are stacked; None for the plain dense FFN.
      kind: "ffn" (the backbone's shape) or "bottleneck" (width `width`, ReLU, zero `wo`).
      width: hidden width; None means config.d_ff.
      activation_axes: logical axes of x's leading dims when stacked (e.g. ("adapter",
        "batch", "length")): the hidden [E, b, l, width] and the output are constrained to
        them, so they stay split along the batch under fsdp. Without it XLA's partitioner
        gathered the whole batch of MTA's adapter activations on every chip (README,
        "Compile for TPU").
    """

    config: "object"  # models.t5.T5Config (not imported: t5.py builds on this module)
    num: Optional[int] = None
    kind: str = "ffn"
    width: Optional[int] = None
    activation_axes: Optional[tuple[str, ...]] = None

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool, select: Optional[Array] = None,
                 dropout_after: Optional[Array] = None) -> Array:
        """Three ways in (`dropout_after`: what the dropout mask waits for, see Dropout):

          num None:        x [..., embed] -> [..., embed]
          num E:           x [E, ..., embed], slice e through FFN e -> [E, ..., embed]
          num E, select:   x [b, l, embed], select int[b, k]: each example through its k
                           chosen FFNs (weights gathered per example; an id outside [0, E)
                           gives NaN) -> [b, l, k, embed]
        """
        c = self.config
        ffn = self.kind == "ffn"
        width = self.width or c.d_ff
        width_axis = "mlp" if ffn else "adapter_mlp"
        stack = () if self.num is None else (self.num,)
        stack_axes = () if self.num is None else (STACK_AXIS,)
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)

        def weight(name, shape, axes, init):
            w = self.param(name, nn.with_logical_partitioning(init, stack_axes + axes),
                           stack + shape, pdt).astype(dt)
            return w if select is None else take_or_nan(w, select)

        w_in = lambda name: weight(name, (c.d_model, width), ("embed", width_axis),
                                   nn.initializers.normal(c.d_model ** -0.5))
        w_out = weight("wo", (width, c.d_model), (width_axis, "embed"),
                       nn.initializers.normal(width ** -0.5) if ffn else nn.initializers.zeros)
        if self.num is None:
            spec_in, spec_out = "...e,ef->...f", "...f,fe->...e"
        elif select is None:
            spec_in, spec_out = "n...e,nef->n...f", "n...f,nfe->n...e"
        else:
            spec_in, spec_out = "ble,bkef->blkf", "blkf,bkfe->blke"
        axes = self.activation_axes if self.num is not None and select is None else None
        keep = lambda y, last: y if axes is None else nn.with_logical_constraint(
            y, tuple(axes) + (last,))
        project = lambda name: keep(jnp.einsum(spec_in, x, w_in(name)), width_axis)
        if ffn and c.is_gated:
            h = c.activation(project("wi_0")) * project("wi_1")
        else:
            h = (c.activation if ffn else nn.relu)(project("wi"))
        h = Dropout(c.dropout_rate)(h, deterministic=deterministic, after=dropout_after)
        return keep(jnp.einsum(spec_out, h, w_out), "embed")


def dense_ffn_path(path: tuple) -> tuple:
    """`<stack>/layers_<i>/ffn/<plug>/.../<w>` -> that layer's dense `<stack>/layers_<i>/ffn/mlp/<w>`."""
    return tuple(path[:3]) + ("mlp", path[-1])


def stacked_copies_of_dense(boxed_params: Mapping, dense: Mapping) -> dict:
    """The leaves of stacked FFNs of the backbone's shape, each E copies of its layer's dense FFN.

    boxed_params: a parameter tree whose leaves carry logical axis names (`nn.Partitioned`,
      e.g. from `jax.eval_shape(model.init, ...)`); stacked `ffn`-kind leaves are the ones
      named ("adapter", "embed", "mlp") or ("adapter", "mlp", "embed").
    dense: flat {path: array} holding the dense FFN of each plugged layer (a pretrained
      backbone), e.g. from `hf.hf_to_backbone`.

    Returns {path: array} for every such leaf whose dense counterpart is in `dense`: this is
    how MTA's `ffn` adapters, its shared adapters and the MoE experts start from a pretrained
    FFN. Bottleneck adapters (`adapter_mlp`) are not copies of anything.
    """
    import flax

    flat = flax.traverse_util.flatten_dict(
        dict(boxed_params), is_leaf=lambda _, v: isinstance(v, nn.Partitioned))
    out = {}
    for path, leaf in flat.items():
        names = tuple(getattr(leaf, "names", ()))
        if names[:1] != (STACK_AXIS,) or set(names[1:]) != {"embed", "mlp"}:
            continue
        source = dense.get(dense_ffn_path(path))
        if source is not None:
            shape = getattr(leaf, "value", leaf).shape
            out[path] = np.broadcast_to(np.asarray(source), shape).copy()
    return out
