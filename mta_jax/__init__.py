"""mta-jax: Mixture-of-Task-Adapters for T5 in JAX/Flax.

The names below load on first use, so that `mta_jax.torch` (the PyTorch runtime) imports no JAX.
"""
import importlib

from mta_jax.errors import CheckpointFormatError

_LAZY = {"load_hf_t5": "mta_jax.hf", "save_hf_t5": "mta_jax.hf", "T5": "mta_jax.models.t5",
         "T5Config": "mta_jax.models.t5", "load_adapters": "mta_jax.artifact"}

__all__ = ["CheckpointFormatError", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mta_jax' has no attribute {name!r}")
