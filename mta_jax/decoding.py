"""Greedy and beam search for `models.t5.T5`, one decoder position per step through its cache.

Both searches are one jitted program: encode once, create the key/value cache for
`max_length` positions, then a `lax.while_loop` that feeds one position per iteration and
stops as soon as every sequence of the batch is finished. `task_ids` reach every model call,
so MTA blocks route exactly as in training. The first input is the model's
`decoder_start_token_id` (pad), whatever start training fed (config.data.train_decoder_start).

Beam search follows Hugging Face `generate` (transformers 5, `early_stopping=False`), so that
the authors' setting (beam 4, length penalty 0.6) means the same thing here:
  * a hypothesis' score is  sum of token log-probabilities / length ** length_penalty,
    where length counts the generated tokens, EOS included (the start token is not);
  * each step keeps the 2 * beam best continuations; the best `beam` that did not end stay
    live, and those among the first `beam` that ended (EOS, or max_length reached) compete
    for the `beam` finished slots;
  * an example stops improving once its best live hypothesis, scored at the current length,
    is no better than its worst finished one.
(t5x instead divides by the GNMT penalty ((5 + length) / 6) ** alpha; not used here.)
`max_length` counts generated tokens only; `generate(max_length=...)` counts the start token
too, so the authors' 128 is 127 here.

Output tokens are the generated positions only (no start token): EOS included, pad after.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mta_jax.models.t5 import T5

Array = jax.Array

# An impossible log-probability. Finite (not -inf) so that sums, divisions and comparisons
# with it stay well defined.
_NEG = -1.0e9

# Cache entries that hold the encoder's keys/values. They are identical for every beam of an
# example, so reordering beams (always within one example) leaves them unchanged; skipping
# them avoids moving the largest part of the cache at every step.
_SAME_FOR_ALL_BEAMS = ("cross_kv",)


# --------------------------------------------------------------------------- model calls

def _encode(model: T5, params, input_ids, attention_mask, task_ids) -> tuple[Array, list]:
    """input_ids: int32[n, s] -> (encoded [n, s, embed], the encoder blocks' routing weights)."""
    encoded, state = model.apply({"params": params}, input_ids, attention_mask,
                                 task_ids=task_ids, method=model.encode, mutable=["router"])
    return encoded, _adapter_weights(state)


def _create_cache(model: T5, params, encoded, attention_mask, task_ids, max_length: int):
    """encoded: [n, s, embed] -> (a cache with room for `max_length` decoder positions, the
    decoder blocks' routing weights: they read task ids and the encoder, not the tokens)."""
    dummy = jnp.zeros((encoded.shape[0], max_length), jnp.int32)
    _, variables = model.apply({"params": params}, encoded, attention_mask, dummy,
                               task_ids=task_ids, decode=True, method=model.decode,
                               mutable=["cache", "router"])
    return variables["cache"], _adapter_weights(variables)


def _adapter_weights(variables) -> list[Array]:
    """Every [n, E] `adapter_weights` a routed block sowed into the 'router' collection."""
    flat = jax.tree_util.tree_flatten_with_path(variables.get("router", {}))[0]
    return [leaf for path, leaf in flat if "adapter_weights" in jax.tree_util.keystr(path)]


def _mean_routing(encoder: list, decoder: list, beam_size: int = 1) -> Optional[Array]:
    """The mean routing weights [b, E] over the routed blocks (None: no block routes).
    Decoder weights come per beam ([b * beam_size, E]); every beam of an example has its."""
    weights = encoder + [w[::beam_size] for w in decoder]
    return jnp.mean(jnp.stack(weights), axis=0) if weights else None


def _step(model: T5, params, cache, encoded, attention_mask, task_ids, tokens):
    """tokens: int32[n], the previous position -> (float32 logits [n, vocab], new cache)."""
    logits, variables = model.apply({"params": params, "cache": cache}, encoded, attention_mask,
                                    tokens[:, None], task_ids=task_ids, decode=True,
                                    method=model.decode, mutable=["cache"])
    return logits[:, 0], variables["cache"]


def _beam_reordered_leaves(cache, model: T5, params, encoded, attention_mask, task_ids,
                           max_length: int):
    """A bool pytree shaped like `cache` (batch n): True where a leaf must follow its beam.

    A leaf follows its beam when its leading axis is the batch. That is read off by creating
    the cache abstractly for n + 1 rows: a leading dim that tracks the batch is the batch,
    while one that merely equals n (e.g. an index over max_length positions) is not.
    """
    n = encoded.shape[0]

    def one_more_row(x):
        return None if x is None else jax.ShapeDtypeStruct((n + 1,) + x.shape[1:], x.dtype)

    create = lambda e, m, t: _create_cache(model, params, e, m, t, max_length)[0]
    bigger = jax.eval_shape(create, one_more_row(encoded), one_more_row(attention_mask),
                            one_more_row(task_ids))

    def follows(path, leaf, bigger_leaf):
        if any(getattr(key, "key", None) in _SAME_FOR_ALL_BEAMS for key in path):
            return False
        return leaf.ndim > 0 and leaf.shape[0] == n and bigger_leaf.shape[0] == n + 1

    return jax.tree_util.tree_map_with_path(follows, cache, bigger)


def _prepare(input_ids, attention_mask, task_ids):
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    if task_ids is not None:
        task_ids = jnp.asarray(task_ids, jnp.int32)
    return input_ids, jnp.asarray(attention_mask, jnp.int32), task_ids


# --------------------------------------------------------------------------- greedy

def _greedy(model: T5, params, input_ids, attention_mask, task_ids=None, *,
            max_length: int) -> tuple[Array, Optional[Array]]:
    """input_ids: int32[b, s] -> (int32[b, max_length], routing weights [b, E] | None)."""
    c = model.config
    input_ids, attention_mask, task_ids = _prepare(input_ids, attention_mask, task_ids)
    b = input_ids.shape[0]
    encoded, enc_routing = _encode(model, params, input_ids, attention_mask, task_ids)
    cache, dec_routing = _create_cache(model, params, encoded, attention_mask, task_ids,
                                       max_length)

    # (position to write, previous token [b], tokens [b, max_length], done [b], cache)
    def keep_going(state):
        i, _, _, done, _ = state
        return (i < max_length) & ~jnp.all(done)

    def one_position(state):
        i, prev, tokens, done, cache = state
        logits, cache = _step(model, params, cache, encoded, attention_mask, task_ids, prev)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        token = jnp.where(done, c.pad_token_id, token)  # a finished row only pads
        return i + 1, token, tokens.at[:, i].set(token), done | (token == c.eos_token_id), cache

    init = (jnp.array(0, jnp.int32), jnp.full((b,), c.decoder_start_token_id, jnp.int32),
            jnp.full((b, max_length), c.pad_token_id, jnp.int32), jnp.zeros((b,), bool), cache)
    return lax.while_loop(keep_going, one_position, init)[2], _mean_routing(enc_routing,
                                                                             dec_routing)


# --------------------------------------------------------------------------- beam search

class _Beams(NamedTuple):
    step: Array  # int32 scalar: the position decoded next
    live: Array  # int32[b, k, L]: live hypotheses, pad from `step` on
    live_logp: Array  # float32[b, k]: their summed log-probabilities, best first
    done: Array  # int32[b, k, L]: the best finished hypotheses
    done_scores: Array  # float32[b, k]: their length-normalised scores, best first
    done_filled: Array  # bool[b, k]: the slot holds a finished hypothesis
    improvable: Array  # bool[b]: a live hypothesis may still beat the worst finished one
    all_ended: Array  # bool scalar: every candidate of the last step ended
    cache: Any  # the model's cache, batch b * k (example-major)


def _beam_search(model: T5, params, input_ids, attention_mask, task_ids=None, *,
                 max_length: int, beam_size: int,
                 length_penalty: float) -> tuple[Array, Array, Optional[Array]]:
    """input_ids: int32[b, s] -> (tokens int32[b, max_length], scores float32[b],
    routing weights [b, E] | None)."""
    c = model.config
    k, L, alpha = beam_size, max_length, length_penalty
    assert c.vocab_size >= 2 * k, "a step keeps 2 * beam_size candidates out of the vocabulary"
    input_ids, attention_mask, task_ids = _prepare(input_ids, attention_mask, task_ids)
    b = input_ids.shape[0]
    n = b * k

    # Every beam of an example sees the same encoder output: encode b rows, then repeat.
    encoded, enc_routing = _encode(model, params, input_ids, attention_mask, task_ids)
    repeat = lambda x: None if x is None else jnp.repeat(x, k, axis=0)  # [b, ...] -> [b*k, ...]
    encoded, attention_mask, task_ids = repeat(encoded), repeat(attention_mask), repeat(task_ids)
    cache, dec_routing = _create_cache(model, params, encoded, attention_mask, task_ids, L)
    reordered = _beam_reordered_leaves(cache, model, params, encoded, attention_mask, task_ids,
                                       L)

    def keep_going(s: _Beams):
        return (s.step < L) & jnp.any(s.improvable) & ~s.all_ended

    def one_position(s: _Beams) -> _Beams:
        i = s.step
        prev = jnp.where(i == 0, c.decoder_start_token_id, s.live[:, :, jnp.maximum(i - 1, 0)])
        logits, cache = _step(model, params, s.cache, encoded, attention_mask, task_ids,
                              prev.reshape(n))
        vocab = logits.shape[-1]
        logp = jax.nn.log_softmax(logits).reshape(b, k, vocab) + s.live_logp[:, :, None]

        # 2k candidates: even if k of them end here, k remain to continue.
        cand_logp, flat = lax.top_k(logp.reshape(b, k * vocab), 2 * k)  # [b, 2k]
        parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        cand = jnp.take_along_axis(s.live, parent[:, :, None], axis=1)  # [b, 2k, L]
        cand = cand.at[:, :, i].set(token)
        ended = (token == c.eos_token_id) | (i + 1 == L)  # [b, 2k]

        live_logp, pick = lax.top_k(jnp.where(ended, _NEG, cand_logp), k)  # [b, k]
        live = jnp.take_along_axis(cand, pick[:, :, None], axis=1)
        live_parent = jnp.take_along_axis(parent, pick, axis=1)

        # Only the first k candidates may finish (as in Hugging Face); the others are backups
        # for the live set. An example that cannot improve takes no new finished hypotheses.
        length = (i + 1).astype(jnp.float32)
        may_finish = ended & (jnp.arange(2 * k) < k)[None, :] & s.improvable[:, None]
        cand_scores = jnp.where(may_finish, cand_logp / length ** alpha, _NEG)
        done_scores, best = lax.top_k(jnp.concatenate([s.done_scores, cand_scores], 1), k)
        done = jnp.take_along_axis(jnp.concatenate([s.done, cand], 1), best[:, :, None], axis=1)
        done_filled = jnp.take_along_axis(
            jnp.concatenate([s.done_filled, may_finish], 1), best, axis=1)

        # Each live beam continues from its parent's cache: row e*k + j of the new cache is
        # row e*k + parent of the old one.
        rows = (jnp.arange(b)[:, None] * k + live_parent).reshape(n)
        cache = jax.tree.map(lambda x, r: jnp.take(x, rows, axis=0) if r else x, cache, reordered)

        # Hugging Face's early_stopping=False heuristic: the best live hypothesis scored at
        # the current length against the worst finished one (an empty slot is worst of all).
        best_live = live_logp[:, 0] / length ** alpha
        worst_done = jnp.where(done_filled, jnp.min(done_scores, axis=1, keepdims=True), _NEG)
        improvable = s.improvable & jnp.any(best_live[:, None] > worst_done, axis=1)

        return _Beams(i + 1, live, live_logp, done, done_scores, done_filled, improvable,
                      jnp.all(ended), cache)

    pad = jnp.full((b, k, L), c.pad_token_id, jnp.int32)
    # Only beam 0 starts live, so that the first step does not pick k copies of one token.
    live_logp = jnp.where(jnp.arange(k) == 0, 0.0, _NEG).astype(jnp.float32)
    live_logp = jnp.broadcast_to(live_logp, (b, k))
    init = _Beams(jnp.array(0, jnp.int32), pad, live_logp, pad,
                  jnp.full((b, k), _NEG, jnp.float32), jnp.zeros((b, k), bool),
                  jnp.ones((b,), bool), jnp.array(False), cache)
    final = lax.while_loop(keep_going, one_position, init)
    # The last step ends every candidate, so slot 0 always holds a finished hypothesis.
    return final.done[:, 0], final.done_scores[:, 0], _mean_routing(enc_routing, dec_routing, k)


# --------------------------------------------------------------------------- public API

def _check_settings(max_length: int, beam_size: int) -> None:
    if max_length < 1:
        raise ValueError(f"decoding max_length must be >= 1, got {max_length}")
    if beam_size < 1:
        raise ValueError(f"decoding beam_size must be >= 1, got {beam_size}")


# The model and the search settings are static: one compilation per (settings, shapes).
_greedy_jit = jax.jit(_greedy, static_argnames=("model", "max_length"))
_beam_jit = jax.jit(_beam_search,
                    static_argnames=("model", "max_length", "beam_size", "length_penalty"))


def greedy_decode(model: T5, params, input_ids, attention_mask=None, *,
                  task_ids: Optional[Array] = None, max_length: int) -> Array:
    """Greedy decoding. input_ids, attention_mask: int32[b, s]; task_ids: int32[b] | None.

    Returns int32[b, max_length]: the tokens after the start token, EOS included, pad after.
    The model is a static argument (hashed); use `make_decoder` if its config is not hashable.
    """
    _check_settings(max_length, 1)
    return _greedy_jit(model, params, input_ids, attention_mask, task_ids, max_length=max_length)[0]


def beam_search(model: T5, params, input_ids, attention_mask=None, *,
                task_ids: Optional[Array] = None, max_length: int, beam_size: int = 4,
                length_penalty: float = 0.6) -> tuple[Array, Array]:
    """Beam search with Hugging Face's length penalty (see the module docstring).

    Returns (tokens int32[b, max_length], scores float32[b]): the best finished hypothesis
    (EOS included, pad after) and its score, sum log-prob / length ** length_penalty.
    """
    _check_settings(max_length, beam_size)
    return _beam_jit(model, params, input_ids, attention_mask, task_ids, max_length=max_length,
                     beam_size=beam_size, length_penalty=float(length_penalty))[:2]


def make_decoder(model: T5, *, method: str = "beam", max_length: int, beam_size: int = 4,
                 length_penalty: float = 0.6, routing: bool = False) -> Callable[..., Any]:
    """A jitted (params, input_ids, attention_mask, task_ids=None) -> tokens int32[b, max_length].

    routing=True: -> (tokens, routing weights [b, E]): each example's mean adapter (or expert)
    weights over the routed blocks, as sown by the encoder pass and the decoder's cache
    creation (None for a model without routing). They cost nothing extra: the search computes
    them anyway.

    Everything but the arrays is closed over, so the function compiles once per input shape
    and is reused by every evaluation.
    """
    _check_settings(max_length, beam_size)
    if method == "greedy":
        search = functools.partial(_greedy, model, max_length=max_length)
        pick = lambda out: out if routing else out[0]
    elif method == "beam":
        search = functools.partial(_beam_search, model, max_length=max_length,
                                   beam_size=beam_size, length_penalty=float(length_penalty))
        pick = lambda out: (out[0], out[2]) if routing else out[0]
    else:
        raise ValueError(f"decoding method must be 'beam' or 'greedy', got {method!r}")
    return jax.jit(lambda *args, **kwargs: pick(search(*args, **kwargs)))


def decode_texts(tokens, tokenizer, eos_token_id: Optional[int] = None) -> list[str]:
    """tokens: int[b, length] from a search -> b strings, each cut at its first EOS and
    decoded without special tokens (pad, EOS) nor ids the tokenizer lacks: the embedding may
    have more rows than it has ids (T5's 32128 for 32100; a vocabulary rounded up to 128)."""
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    texts = []
    for row in np.asarray(tokens):
        ends = np.flatnonzero(row == eos)
        row = row[: ends[0]] if ends.size else row
        row = row[row < len(tokenizer)]
        texts.append(tokenizer.decode(row.tolist(), skip_special_tokens=True))
    return texts
