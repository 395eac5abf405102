"""mta-jax: Mixture-of-Task-Adapters for T5 in JAX/Flax."""
from mta_jax.errors import CheckpointFormatError
from mta_jax.hf import load_hf_t5, save_hf_t5
from mta_jax.models.t5 import T5, T5Config

__all__ = ["CheckpointFormatError", "T5", "T5Config", "load_hf_t5", "save_hf_t5"]
__version__ = "0.1.0"
