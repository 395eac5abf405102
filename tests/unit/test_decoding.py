"""Greedy and beam search, checked against full passes and Hugging Face generate."""
import contextlib
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mta_jax import decoding, load_hf_t5
from mta_jax.models import t5 as t5_lib
from tests.helpers import TORCH_REASON, make_hf_t5

MAX_LENGTH = 8
EOS, PAD, START = 1, 0, 0


@dataclasses.dataclass
class Tiny:
    hf: object  # the torch T5ForConditionalGeneration
    model: t5_lib.T5
    params: dict
    ids: np.ndarray  # int32[6, 7], rows 1 and 4 padded
    mask: np.ndarray  # int32[6, 7]
    logits: object  # jitted (params, ids, mask, decoder_ids [6, MAX_LENGTH], task_ids) -> logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny v1.0 checkpoint whose EOS logit is set so that some sequences end early, some
    late and some never within MAX_LENGTH (a random model almost never says EOS)."""
    torch = pytest.importorskip("torch", reason=TORCH_REASON)

    folder = str(tmp_path_factory.mktemp("t5_v1_0"))
    hf = make_hf_t5(folder, "v1_0")
    model, params = load_hf_t5(folder)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 96, (6, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 5:] = mask[4, 3:] = 0
    ids[mask == 0] = PAD

    # The head is tied to the embedding, so EOS's row alone sets the EOS logit. Its scale is
    # set here rather than left to the initialisation: the smallest of a fine grid under which
    # greedy decoding ends at least two rows, at different lengths, and leaves one running.
    embedding = np.array(params["shared"]["embedding"])
    row = embedding[EOS].copy()
    for scale in np.arange(1.0, 6.01, 0.25):
        embedding[EOS] = scale * row
        params["shared"]["embedding"] = jnp.asarray(embedding)
        tokens = np.asarray(decoding.greedy_decode(model, params, ids, mask,
                                                   max_length=MAX_LENGTH))
        ended, lengths = (tokens == EOS).any(axis=1), _lengths(tokens)
        if ended.sum() >= 2 and not ended.all() and len(set(lengths[ended])) >= 2:
            break
    else:
        raise AssertionError("no scale of EOS's row gives rows with and without EOS")
    with torch.no_grad():
        hf.shared.weight[EOS] = torch.from_numpy(embedding[EOS])

    def logits(params, ids, mask, dec, task_ids=None):
        return model.apply({"params": params}, ids, dec, mask, task_ids=task_ids)

    return Tiny(hf, model, params, ids, mask, jax.jit(logits))


def _after_start(tokens):
    """Decoder inputs for a full pass that scores `tokens`: [b, L] -> [b, L], shifted right."""
    tokens = np.asarray(tokens)
    return np.concatenate([np.full((len(tokens), 1), START, np.int32), tokens[:, :-1]], axis=1)


def _lengths(tokens):
    """Generated length per row: up to and including the first EOS, else all positions."""
    tokens = np.asarray(tokens)
    has_eos = (tokens == EOS).any(axis=1)
    return np.where(has_eos, np.argmax(tokens == EOS, axis=1) + 1, tokens.shape[1])


def _full_model_scores(t: Tiny, tokens, length_penalty, params=None, task_ids=None,
                       logits_fn=None):
    """sum of log p(token) over each row's generated length / length ** length_penalty,
    from one full pass (by default of the fixture's model)."""
    params = t.params if params is None else params
    logits = (logits_fn or t.logits)(params, t.ids, t.mask, _after_start(tokens), task_ids)
    logp = np.asarray(jax.nn.log_softmax(logits))
    token_logp = np.take_along_axis(logp, np.asarray(tokens)[..., None], axis=-1)[..., 0]
    lengths = _lengths(tokens)
    token_logp = np.where(np.arange(tokens.shape[1]) < lengths[:, None], token_logp, 0.0)
    return token_logp.sum(axis=1) / lengths.astype(np.float64) ** length_penalty


def _normalised(tokens, length):
    """Hugging Face output (start token first, shorter, EOS- or pad-filled) -> our layout."""
    tokens = np.asarray(tokens)[:, 1:]
    out = np.full((len(tokens), length), PAD, np.int32)
    out[:, : tokens.shape[1]] = tokens
    after_eos = np.arange(length) >= _lengths(out)[:, None]
    return np.where(after_eos, PAD, out)


@contextlib.contextmanager
def _count_compilations():
    """Counts XLA compilations (jax.monitoring's backend-compile event) inside the block."""
    count = [0]

    def listener(event, duration_secs, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# --------------------------------------------------------------------------- greedy

@pytest.mark.slow  # over 3 s on 2 cores
def test_greedy_is_argmax_of_full_passes_on_the_growing_prefix(tiny):
    tokens = np.asarray(decoding.greedy_decode(tiny.model, tiny.params, tiny.ids, tiny.mask,
                                               max_length=MAX_LENGTH))
    assert tokens.shape == (6, MAX_LENGTH) and tokens.dtype == np.int32
    ended = (tokens == EOS).any(axis=1)
    assert ended.any() and not ended.all(), "the fixture should give rows with and without EOS"

    expected = np.full_like(tokens, PAD)
    for t in range(MAX_LENGTH):
        # The decoder is causal, so position t of a pass over [start, prefix, pad...] sees only
        # the prefix: one compiled shape serves every prefix length.
        logits = tiny.logits(tiny.params, tiny.ids, tiny.mask, _after_start(expected), None)
        expected[:, t] = np.argmax(np.asarray(logits)[:, t], axis=-1)
    expected = np.where(np.arange(MAX_LENGTH) >= _lengths(expected)[:, None], PAD, expected)
    np.testing.assert_array_equal(tokens, expected)


def test_greedy_matches_hugging_face_generate(tiny):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)

    tokens = decoding.greedy_decode(tiny.model, tiny.params, tiny.ids, tiny.mask,
                                    max_length=MAX_LENGTH)
    with torch.no_grad():
        hf = tiny.hf.generate(input_ids=torch.tensor(tiny.ids, dtype=torch.long),
                              attention_mask=torch.tensor(tiny.mask, dtype=torch.long),
                              do_sample=False, num_beams=1, max_new_tokens=MAX_LENGTH)
    np.testing.assert_array_equal(tokens, _normalised(hf.numpy(), MAX_LENGTH))


# --------------------------------------------------------------------------- beam search

def test_beam_search_matches_hugging_face_generate(tiny):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)

    tokens, scores = decoding.beam_search(tiny.model, tiny.params, tiny.ids, tiny.mask,
                                          max_length=MAX_LENGTH, beam_size=4, length_penalty=0.6)
    with torch.no_grad():
        hf = tiny.hf.generate(input_ids=torch.tensor(tiny.ids, dtype=torch.long),
                              attention_mask=torch.tensor(tiny.mask, dtype=torch.long),
                              do_sample=False, num_beams=4, length_penalty=0.6,
                              early_stopping=False, max_new_tokens=MAX_LENGTH,
                              output_scores=True, return_dict_in_generate=True)
    np.testing.assert_array_equal(tokens, _normalised(hf.sequences.numpy(), MAX_LENGTH))
    np.testing.assert_allclose(scores, hf.sequences_scores.numpy(), atol=1e-5, rtol=0)
    # The returned score is the documented one, recomputed by the full model.
    np.testing.assert_allclose(scores, _full_model_scores(tiny, tokens, 0.6),
                               atol=1e-5, rtol=0)


def test_beam_search_of_width_one_is_greedy(tiny):
    greedy = decoding.greedy_decode(tiny.model, tiny.params, tiny.ids, tiny.mask,
                                    max_length=MAX_LENGTH)
    tokens, scores = decoding.beam_search(tiny.model, tiny.params, tiny.ids, tiny.mask,
                                          max_length=MAX_LENGTH, beam_size=1, length_penalty=0.6)
    np.testing.assert_array_equal(tokens, greedy)
    np.testing.assert_allclose(scores, _full_model_scores(tiny, greedy, 0.6),
                               atol=1e-5, rtol=0)


def test_beam_search_beats_greedy_where_greedy_is_short_sighted(tiny):
    greedy = decoding.greedy_decode(tiny.model, tiny.params, tiny.ids, tiny.mask,
                                    max_length=MAX_LENGTH)
    tokens, scores = decoding.beam_search(tiny.model, tiny.params, tiny.ids, tiny.mask,
                                          max_length=MAX_LENGTH, beam_size=4, length_penalty=0.6)
    greedy_scores = _full_model_scores(tiny, greedy, 0.6)
    beam_scores = _full_model_scores(tiny, tokens, 0.6)
    np.testing.assert_allclose(scores, beam_scores, atol=1e-5, rtol=0)
    assert np.all(beam_scores >= greedy_scores - 1e-6), (beam_scores, greedy_scores)
    better = beam_scores > greedy_scores + 1e-3
    assert better.any(), "this input batch was chosen to have a row where greedy is suboptimal"
    assert np.all(np.any(np.asarray(tokens) != greedy, axis=1)[better])


# --------------------------------------------------------------------------- task ids

class _TaskMemory(nn.Module):
    """A plugged FFN with both kinds of state a real plug may have: it routes on task_ids,
    and keeps a per-sequence cache entry (the running mean of its inputs) that beams must
    carry along when they are reordered."""

    num_tasks: int

    @nn.compact
    def __call__(self, x, ctx: t5_lib.FfnContext, *, deterministic):  # x: [b, l, embed]
        table = self.param("task_embedding", nn.initializers.zeros, (self.num_tasks, x.shape[-1]))
        if ctx.decode:
            total = self.variable("cache", "running_sum", jnp.zeros, (x.shape[0], x.shape[-1]))
            if ctx.decode_index is None:  # creating the cache: the output is never used
                return x
            total.value = total.value + x[:, 0]
            mean = (total.value / (ctx.decode_index + 1))[:, None]  # [b, 1, embed]
        else:
            mean = jnp.cumsum(x, axis=1) / jnp.arange(1, x.shape[1] + 1)[:, None]
        return table[ctx.task_ids][:, None] + mean


@dataclasses.dataclass(frozen=True)
class _TaskMemoryPlug(t5_lib.FfnPlug):
    """Added to the dense FFN of the decoder's first block."""

    encoder_layers: t5_lib.LayerSpec = "none"
    decoder_layers: t5_lib.LayerSpec = (0,)
    replaces_dense = False
    num_tasks: int = 2

    def make(self, config):
        return _TaskMemory(self.num_tasks, name="task_memory")


@pytest.mark.slow  # over 3 s on 2 cores
def test_beam_search_routes_on_task_ids_and_reorders_plug_state(tiny):
    model = t5_lib.T5(tiny.model.config.replace(ffn_plug=_TaskMemoryPlug()))
    params = jax.tree.map(lambda x: x, tiny.params)
    task_table = 3.0 * np.random.default_rng(1).standard_normal((2, model.config.d_model))
    params["decoder"]["layers_0"]["ffn"]["task_memory"] = {
        "task_embedding": jnp.asarray(task_table, jnp.float32)}
    # Two runs with swapped task assignments decode every source under both tasks.
    task_a = np.array([0, 1, 0, 1, 0, 1], np.int32)
    task_b = 1 - task_a

    def logits(params, ids, mask, dec, task_ids):
        return model.apply({"params": params}, ids, dec, mask, task_ids=task_ids)

    logits = jax.jit(logits)
    runs = []
    for task_ids in (task_a, task_b):
        tokens, scores = decoding.beam_search(model, params, tiny.ids, tiny.mask,
                                              task_ids=task_ids, max_length=MAX_LENGTH)
        # Scores agree with a full pass only if every cached step saw the right task and
        # the plug's running sums followed their beams.
        np.testing.assert_allclose(
            scores, _full_model_scores(tiny, tokens, 0.6, params, task_ids, logits),
            atol=1e-5, rtol=0)
        runs.append(np.asarray(tokens))
    assert np.any(runs[0] != runs[1]), "the task must change what is decoded"


# --------------------------------------------------------------------------- compilation

def test_decoders_compile_once_per_shape(tiny):
    other_ids = np.where(tiny.mask == 1, (tiny.ids + 5) % 96, PAD).astype(np.int32)
    decode = decoding.make_decoder(tiny.model, method="greedy", max_length=MAX_LENGTH)
    with _count_compilations() as compiles:
        first = decode(tiny.params, tiny.ids, tiny.mask, None)
    assert compiles[0] >= 1, "the counter must see the first compilation"
    decoding.beam_search(tiny.model, tiny.params, tiny.ids, tiny.mask, max_length=MAX_LENGTH)
    with _count_compilations() as compiles:
        second = decode(tiny.params, other_ids, tiny.mask, None)
        decoding.beam_search(tiny.model, tiny.params, other_ids, tiny.mask,
                             max_length=MAX_LENGTH)
    assert compiles[0] == 0
    assert np.any(np.asarray(first) != np.asarray(second)), "new inputs, new tokens"


def test_decoder_settings_are_checked():
    model = t5_lib.T5(t5_lib.T5Config())
    with pytest.raises(ValueError, match="method"):
        decoding.make_decoder(model, method="sample", max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        decoding.make_decoder(model, method="greedy", max_length=0)
    with pytest.raises(ValueError, match="beam_size"):
        decoding.make_decoder(model, method="beam", max_length=8, beam_size=0)


# --------------------------------------------------------------------------- texts

def test_decode_texts_cuts_at_eos_and_skips_special_tokens():
    from transformers import ByT5Tokenizer

    tok = ByT5Tokenizer()
    byte = lambda s: [ord(ch) + 3 for ch in s]  # ByT5: pad 0, EOS 1, unk 2, then bytes
    tokens = np.array([byte("hi") + [EOS] + byte("xx") + [PAD],
                       byte("no eos")], np.int32)
    assert decoding.decode_texts(tokens, tok) == ["hi", "no eos"]
