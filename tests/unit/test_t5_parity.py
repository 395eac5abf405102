"""Our Flax T5 against Hugging Face's PyTorch T5 on tiny random checkpoints."""
import numpy as np
import pytest

import jax.numpy as jnp
from mta_jax import load_hf_t5, save_hf_t5
from tests.helpers import TORCH_REASON, assert_trees_equal, make_hf_t5

torch = pytest.importorskip("torch", reason=TORCH_REASON)


def _batch(seed=0, vocab=96):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, (3, 13))
    mask = np.ones_like(ids)
    mask[1, 8:] = 0  # padded encoder inputs
    mask[2, 3:] = 0
    ids = ids * mask
    labels = rng.integers(2, vocab, (3, 7))
    dec = np.concatenate([np.zeros((3, 1), np.int64), labels[:, :-1]], axis=1)
    dec_mask = np.ones_like(dec)
    dec_mask[0, 5:] = 0  # a padded target: its positions are excluded below
    return ids, mask, dec, dec_mask, labels


def _torch_logits(model, ids, mask, dec, dec_mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     decoder_input_ids=torch.tensor(dec),
                     decoder_attention_mask=torch.tensor(dec_mask)).logits.numpy()


def _loss(logits, labels, dec_mask):
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                  keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    return float(np.sum(nll * dec_mask) / np.sum(dec_mask))


@pytest.mark.slow  # over 3 s on 2 cores
def test_logits_and_loss_match_pytorch(tmp_path, hf_shape):
    ref_model = make_hf_t5(tmp_path, hf_shape)
    model, params = load_hf_t5(str(tmp_path))
    ids, mask, dec, dec_mask, labels = _batch()
    ref = _torch_logits(ref_model, ids, mask, dec, dec_mask)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(dec),
                                  attention_mask=jnp.asarray(mask),
                                  decoder_attention_mask=jnp.asarray(dec_mask)))
    assert ours.shape == ref.shape == (3, 7, 96) and ours.dtype == np.float32
    real = dec_mask.astype(bool)
    assert np.abs(ours - ref)[real].max() <= 1e-4
    assert abs(_loss(ours, labels, dec_mask) - _loss(ref, labels, dec_mask)) <= 1e-5


def test_config_reading_follows_the_rule(tmp_path, hf_shape):
    make_hf_t5(tmp_path, hf_shape)
    model, params = load_hf_t5(str(tmp_path))
    c = model.config
    expected = {"v1_0": (True, True, "relu", 2), "v1_1_hf5": (True, False, "gated-gelu", 3),
                "v1_1_old": (False, False, "gated-gelu", 1)}[hf_shape]
    assert (c.tie_word_embeddings, c.scale_decoder_outputs, c.feed_forward_proj,
            c.num_layers_of("decoder")) == expected
    assert ("lm_head" in params) == (not c.tie_word_embeddings)


@pytest.mark.slow  # over 3 s on 2 cores
def test_export_then_from_pretrained_gives_identical_logits(tmp_path, hf_shape):
    import transformers

    source = make_hf_t5(tmp_path / "src", hf_shape)
    model, params = load_hf_t5(str(tmp_path / "src"))
    save_hf_t5(str(tmp_path / "out"), model, params)
    reloaded = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    ids, mask, dec, dec_mask, _ = _batch(seed=1)
    ref = _torch_logits(reloaded, ids, mask, dec, dec_mask)
    # The exported folder is the source model, bit for bit, as PyTorch sees it.
    np.testing.assert_array_equal(ref, _torch_logits(source, ids, mask, dec, dec_mask))
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(dec),
                                  attention_mask=jnp.asarray(mask),
                                  decoder_attention_mask=jnp.asarray(dec_mask)))
    real = dec_mask.astype(bool)
    # 1e-5, or 1e-6 of the largest |logit| where that is more: the untied v1.1 heads give
    # logits near 25, where two float32 computations differ by ~1e-5 (PyTorch's own float32
    # is 7e-6 off its float64 there); the v1.0 logits (near 4) meet 1e-5 as they are.
    assert np.abs(ours - ref)[real].max() <= max(1e-5, 1e-6 * np.abs(ref).max())
    # And our own loader reads the export back bitwise, every leaf.
    _, again = load_hf_t5(str(tmp_path / "out"))
    expected = dict(params)
    if hf_shape == "v1_1_hf5":
        # Tied but unscaled: the export writes the head as its own lm_head.weight (older
        # transformers would randomise a missing one), so it reads back untied, = embedding.
        expected["lm_head"] = params["shared"]["embedding"].T
    assert_trees_equal(again, expected)


def test_sharded_index_is_read(tmp_path):
    import json
    from mta_jax.hf import read_safetensors, write_safetensors

    make_hf_t5(tmp_path, "v1_0")
    model, params = load_hf_t5(str(tmp_path))
    tensors = read_safetensors(str(tmp_path / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        write_safetensors(str(tmp_path / fname), {k: np.array(tensors[k]) for k in keys})
    (tmp_path / "model.safetensors").unlink()
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, sharded = load_hf_t5(str(tmp_path))
    assert_trees_equal(sharded, params)


@pytest.mark.slow  # over 3 s on 2 cores
def test_bfloat16_compute_stays_close(tmp_path):
    ref_model = make_hf_t5(tmp_path, "v1_0")
    model, params = load_hf_t5(str(tmp_path), dtype=jnp.bfloat16)
    ids, mask, dec, dec_mask, _ = _batch()
    ref = _torch_logits(ref_model, ids, mask, dec, dec_mask)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(dec),
                                  attention_mask=jnp.asarray(mask)))
    assert ours.dtype == np.float32  # logits are float32 whatever the compute dtype
    assert np.abs(ours - ref)[dec_mask.astype(bool)].max() < 0.1
