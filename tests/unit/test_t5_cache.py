"""The decoder's key/value cache: stepping one position at a time gives the full pass's logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mta_jax.models import t5 as t5_lib
from tests.helpers import HF_TINY, init_params

SHAPES = {
    "v1_0": dict(feed_forward_proj="relu"),
    # v1.1: gated GELU, untied head, no output scaling, more decoder than encoder layers.
    "v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                 scale_decoder_outputs=False, num_decoder_layers=3),
}
MAX_LENGTH = 9  # cache room; the target below uses fewer positions, the rest must stay unseen
TARGET_LENGTH = 6


def _inputs(config):
    """Two sources, the second padded; a fixed target fed with the start token in front."""
    rng = np.random.default_rng(1)
    ids = rng.integers(2, config.vocab_size, (2, 7)).astype(np.int32)  # [b, s]
    mask = np.ones_like(ids)
    mask[1, 4:] = 0
    ids[1, 4:] = config.pad_token_id
    target = rng.integers(1, config.vocab_size, (2, TARGET_LENGTH - 1)).astype(np.int32)
    start = np.full((2, 1), config.decoder_start_token_id, np.int32)
    dec = np.concatenate([start, target], axis=1)  # [b, t]
    return ids, mask, dec, np.array([0, 3], np.int32)


@pytest.mark.slow  # over 3 s on 2 cores
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cached_steps_equal_full_forward(shape):
    config = t5_lib.T5Config(**HF_TINY, **SHAPES[shape])
    model = t5_lib.T5(config)
    params = init_params(model)
    ids, mask, dec, task_ids = _inputs(config)

    # Jitted, because compiling once is faster than running a Flax model op by op.
    @jax.jit
    def prepare(params):
        """-> full-pass logits [b, t, vocab], encoded [b, s, embed], a MAX_LENGTH cache."""
        full = model.apply({"params": params}, ids, dec, mask, task_ids=task_ids)
        encoded = model.apply({"params": params}, ids, mask, task_ids=task_ids,
                              method=model.encode)
        _, created = model.apply({"params": params}, encoded, mask,
                                 jnp.zeros((2, MAX_LENGTH), jnp.int32), task_ids=task_ids,
                                 decode=True, method=model.decode, mutable=["cache"])
        return full, encoded, created["cache"]

    full, encoded, cache = prepare(params)
    # The protocol the searches rely on: a scalar index, max_length recorded statically.
    assert int(cache["decoder"]["index"]) == 0
    assert cache["decoder"]["key_positions"].shape == (MAX_LENGTH,)

    @jax.jit  # one compilation for all steps
    def step(cache, token):  # token: int32[b, 1] -> logits [b, vocab]
        logits, new = model.apply({"params": params, "cache": cache}, encoded, mask, token,
                                  task_ids=task_ids, decode=True, method=model.decode,
                                  mutable=["cache"])
        return logits[:, 0], new["cache"]

    for t in range(TARGET_LENGTH):
        logits, cache = step(cache, jnp.asarray(dec[:, t:t + 1]))
        np.testing.assert_allclose(logits, full[:, t], atol=1e-5, rtol=0,
                                   err_msg=f"{shape}: position {t}")
    assert int(cache["decoder"]["index"]) == TARGET_LENGTH
