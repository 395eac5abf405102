"""What the tests share: tiny models, their parameters and inputs, tiny Hugging Face folders.

    TINY_T5               a tiny T5Config (v1.1 shape: gated GELU, untied head, no scaling)
    init_params(model)    its random parameters, unboxed numpy arrays
    random_inputs(...)    input ids, decoder ids and task ids for a forward pass
    HF_TINY, HF_SHAPES    the three Hugging Face folder shapes a user can have
    make_hf_t5(folder)    a tiny random T5ForConditionalGeneration saved there (needs torch;
                          skips the test without it)
    assert_trees_equal(a, b), assert_trees_close(a, b)
                          every leaf of two pytrees, same structure, bitwise / within tolerance
"""
import functools
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mta_jax.models import t5 as t5_lib

TINY_T5 = t5_lib.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2,
                          dropout_rate=0.0, feed_forward_proj="gated-gelu",
                          tie_word_embeddings=False, scale_decoder_outputs=False)


def init_params(model: t5_lib.T5, seed: int = 0, batch: int = 4) -> dict:
    """The model's random parameters as numpy arrays (no logical-axis boxes); a fresh copy
    each call (initialisation compiles once per config, seed and batch)."""
    return jax.tree.map(np.copy, _init_params(model.config, seed, batch))


@functools.lru_cache(maxsize=None)
def _init_params(config: t5_lib.T5Config, seed: int, batch: int) -> dict:
    model = t5_lib.T5(config)
    boxed = jax.jit(lambda: t5_lib.init_params(model, jax.random.PRNGKey(seed), batch=batch))()
    return jax.tree.map(np.asarray, flax.linen.unbox(boxed))


def random_inputs(batch: int = 4, source: int = 9, target: int = 6, vocab: int = 64,
                  num_task_types: int = 5, seed: int = 0):
    """(input_ids [b, s], decoder_input_ids [b, t], task_ids [b]) as int32 jax arrays."""
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(2, vocab, (batch, source)), jnp.int32)
    dec = jnp.asarray(rng.integers(2, vocab, (batch, target)), jnp.int32)
    return ids, dec, jnp.asarray(rng.integers(0, num_task_types, (batch,)), jnp.int32)


HF_TINY = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=20,
               dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)

# The three shapes a user's folder can have (docs/method.md, "The backbone").
HF_SHAPES = {
    # v1.0: ReLU, head tied to the embedding, output scaled.
    "v1_0": dict(feed_forward_proj="relu"),
    # v1.1 as transformers 5 saves it: tie_word_embeddings true, scale_decoder_outputs false,
    # no lm_head.weight in the file.
    "v1_1_hf5": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                     num_decoder_layers=3, relative_attention_num_buckets=12),
    # An older v1.1 / Flan folder: tie_word_embeddings false, a separate lm_head.weight.
    "v1_1_old": dict(feed_forward_proj="gated-gelu", num_decoder_layers=1),
}


TORCH_REASON = ("needs PyTorch (tiny reference checkpoints are built with transformers + torch): "
                "pip install -e '.[test]'")


def make_hf_t5(folder, shape="v1_0", seed=0, **overrides):
    """Save a tiny random T5ForConditionalGeneration in `folder`; returns the torch model.

    Without PyTorch the calling test is skipped (CI, which installs it, fails on any skip)."""
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    import transformers
    from mta_jax.hf import read_safetensors, write_safetensors

    torch.manual_seed(seed)
    kwargs = {**HF_TINY, **HF_SHAPES[shape], **overrides}
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**kwargs)).eval()
    model.save_pretrained(folder)
    if shape == "v1_1_old":
        # Rewrite the folder the way transformers 4 saved untied v1.1 checkpoints.
        cfg_path = os.path.join(folder, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["tie_word_embeddings"] = False
        cfg.pop("scale_decoder_outputs", None)
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        path = os.path.join(folder, "model.safetensors")
        tensors = {k: np.array(v) for k, v in read_safetensors(path).items()}
        head = torch.randn(kwargs["vocab_size"], kwargs["d_model"],
                           generator=torch.Generator().manual_seed(seed + 1))
        tensors["lm_head.weight"] = head.numpy()
        write_safetensors(path, tensors)
        model = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
    return model


def _paired_leaves(actual, expected):
    flat_a = jax.tree_util.tree_leaves_with_path(actual)
    flat_e = jax.tree_util.tree_leaves_with_path(expected)
    paths_a = [jax.tree_util.keystr(p) for p, _ in flat_a]
    paths_e = [jax.tree_util.keystr(p) for p, _ in flat_e]
    assert paths_a == paths_e, (sorted(set(paths_a) ^ set(paths_e)))
    assert paths_a, "empty trees"
    return [(path, np.asarray(a), np.asarray(e))
            for path, (_, a), (_, e) in zip(paths_a, flat_a, flat_e)]


def assert_trees_equal(actual, expected) -> None:
    """Same structure, and every leaf bitwise equal (shape and dtype included)."""
    for path, a, e in _paired_leaves(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype, (path, a.shape, e.shape, a.dtype, e.dtype)
        np.testing.assert_array_equal(a, e, err_msg=path)


def assert_trees_close(actual, expected, *, rtol: float, atol: float) -> None:
    """Same structure, and every leaf within rtol / atol."""
    for path, a, e in _paired_leaves(actual, expected):
        assert a.shape == e.shape, (path, a.shape, e.shape)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=path)
