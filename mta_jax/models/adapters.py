"""The shared-adapter baseline: one bottleneck adapter, used by every task, beside the FFN.

    y = h + FFN( RMSNorm(h) ) + A( RMSNorm(h) ),   A: d_model -> adapter_dim -> d_model (ReLU)

It is MTA's `bottleneck` adapter with E = 1 and no selector (mta.Adapters, so the two share
their initialisation: the up-projection starts at zero, the block starts as the plain FFN).
It sits in the MTA blocks; its parameters live under `<stack>/layers_<i>/ffn/shared_adapter`.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mta_jax.models import moe as moe_lib
from mta_jax.models import mta as mta_lib
from mta_jax.models import t5 as t5_lib


@dataclasses.dataclass(frozen=True)
class SharedAdapterConfig(moe_lib.Placement):
    adapter_dim: int = 384  # bottleneck width
    name: str = "shared_adapter"
    replaces_dense = False  # the pretrained FFN stays; the adapter's output is added to it
    selector = "none"  # no routing
    num_adapters = 1

    def __post_init__(self):
        super().__post_init__()
        if self.adapter_dim < 1:
            raise mta_lib.MTAConfigError(f"moe.adapter_dim must be >= 1; got {self.adapter_dim!r}")

    def make(self, config: t5_lib.T5Config, stack: str, layer: int, name: str) -> nn.Module:
        return SharedAdapter(config, self, name=name)

    def init_from_pretrained(self, flat: dict, backbone) -> dict:
        return flat  # nothing to copy: the dense FFN keeps its own weights


class SharedAdapter(nn.Module):
    config: t5_lib.T5Config
    plug: SharedAdapterConfig

    @nn.compact
    def __call__(self, x: jax.Array, ctx: t5_lib.FfnContext, *, deterministic: bool) -> jax.Array:
        """x: [b, l, embed] (already normed) -> the adapter's output [b, l, embed]."""
        spec = mta_lib.MTAConfig(adapter_kind="bottleneck", adapter_dim=self.plug.adapter_dim,
                                 num_adapters=1)
        weights = jnp.ones((x.shape[0], 1), jnp.float32)
        self.sow("router", "adapter_weights", weights)  # evaluation's heatmap expects the name
        return mta_lib.Adapters(self.config, spec, 1, name="adapter")(
            x, weights, deterministic=deterministic)
