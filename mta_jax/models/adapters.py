"""The shared-adapter baseline: one bottleneck adapter, used by every task, beside the FFN.

    y = h + FFN( RMSNorm(h) ) + A( RMSNorm(h) ),   A: d_model -> adapter_dim -> d_model (ReLU)

It is MTA's `bottleneck` adapter with E = 1 and no selector (one `ffn.StackedFFN`, so the two
share their initialisation: the up-projection starts at zero, the block starts as the plain
FFN). It sits in the MTA blocks; its parameters live under
`<stack>/layers_<i>/ffn/shared_adapter/adapter`.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from mta_jax.errors import ConfigError
from mta_jax.models import ffn as ffn_lib
from mta_jax.models import t5 as t5_lib


@dataclasses.dataclass(frozen=True)
class SharedAdapterConfig(t5_lib.FfnPlug):
    adapter_dim: int = 384  # bottleneck width
    replaces_dense = False  # the pretrained FFN stays; the adapter's output is added to it

    def __post_init__(self):
        super().__post_init__()
        if self.adapter_dim < 1:
            raise ConfigError(f"moe.adapter_dim must be >= 1; got {self.adapter_dim!r}")

    def make(self, config: t5_lib.T5Config) -> nn.Module:
        return SharedAdapter(config, self, name="shared_adapter")


class SharedAdapter(nn.Module):
    config: t5_lib.T5Config
    plug: SharedAdapterConfig

    @nn.compact
    def __call__(self, x: jax.Array, ctx: t5_lib.FfnContext, *, deterministic: bool) -> jax.Array:
        """x: [b, l, embed] (already normed) -> the adapter's output [b, l, embed]."""
        adapter = ffn_lib.StackedFFN(self.config, num=1, kind="bottleneck",
                                     width=self.plug.adapter_dim, name="adapter")
        return adapter(x[None], deterministic=deterministic, dropout_after=ctx.dropout_after)[0]
