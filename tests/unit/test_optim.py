"""Optimizers, schedules and the stage-two labels."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import stage_config
from mta_jax import optim
from mta_jax.models import mta as M
from mta_jax.models.t5 import T5
from tests.helpers import TINY_T5, init_params

PLUG = M.MTAConfig(encoder_layers="last", decoder_layers="last", top_k=2, num_shared_adapters=1)


@pytest.fixture(scope="module")
def params():
    return init_params(T5(TINY_T5.replace(num_layers=1, ffn_plug=PLUG)))


def _stage(trainable, **changes):
    s = stage_config(num_train_steps=10, learning_rate=1e-2, trainable=trainable)
    for k, v in changes.items():
        s[k] = v
    return s


@pytest.mark.slow  # over 3 s on 2 cores
def test_labels_follow_the_regex(params):
    labels = flax.traverse_util.flatten_dict(optim.param_labels(params, "mta"))
    assert all((v == optim.TRAINABLE) == any("mta" in p for p in k) for k, v in labels.items())
    counts = optim.count_params(params, optim.param_labels(params, "mta"))
    assert counts["trainable"] > 0 and counts["frozen"] > 0
    total = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert counts["trainable"] + counts["frozen"] == total


def test_frozen_leaves_hold_no_adam_state(params):
    labels = optim.param_labels(params, "mta")
    tx, _ = optim.make_optimizer(_stage("mta"), 10, labels)
    state = tx.init(params)
    trainable = optim.count_params(params, labels)["trainable"]
    moments = sum(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim > 0)
    assert moments == 2 * trainable
    assert abs(optim.tree_bytes(state) / (2 * 4 * trainable) - 1.0) < 0.01


@pytest.mark.parametrize("kind, expected", [
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0]),
    ("linear", [0.0, 0.5, 1.0, 2 / 3, 1 / 3]),
])
def test_schedules_with_warmup(kind, expected):
    s = _stage(".*", schedule=kind, warmup_steps=2, learning_rate=1.0)
    schedule = optim.make_schedule(s, num_steps=5)
    np.testing.assert_allclose([float(schedule(i)) for i in range(5)], expected, atol=1e-6)


def test_unknown_optimizer_and_schedule_are_named():
    with pytest.raises(ValueError, match="optimizer must be adamw | adafactor"):
        optim.make_optimizer(_stage(".*", optimizer="sgd"), 10)
    with pytest.raises(ValueError, match="schedule must be"):
        optim.make_schedule(_stage(".*", schedule="step"), 10)


def _updates(params, stage, grads):
    """The first update of the stage's optimizer (frozen leaves: 'mta' regex) for `grads`."""
    labels = optim.param_labels(params, "mta")
    tx, _ = optim.make_optimizer(stage, 10, labels)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    flat = flax.traverse_util.flatten_dict
    return flat(updates), flat(params), flat(grads), flat(labels)


def _grads(params, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), jnp.float32),
                        params)


def test_weight_decay_is_decoupled_and_skips_frozen_leaves(params):
    zero = jax.tree.map(jnp.zeros_like, params)
    # AdamW: a zero gradient still moves each trainable weight by -lr * decay * weight.
    updates, flat, _, labels = _updates(params, _stage("mta", learning_rate=0.01, weight_decay=0.1),
                                        zero)
    for k, u in updates.items():
        want = -0.01 * 0.1 * np.asarray(flat[k]) if labels[k] == optim.TRAINABLE else 0.0
        np.testing.assert_allclose(u, want, rtol=1e-6, atol=1e-12, err_msg=str(k))
    # Adafactor (optax): the decay is added after the learning rate, -decay * weight a step.
    updates, flat, _, labels = _updates(
        params, _stage("mta", optimizer="adafactor", learning_rate=0.01, weight_decay=0.1), zero)
    for k, u in updates.items():
        want = -0.1 * np.asarray(flat[k]) if labels[k] == optim.TRAINABLE else 0.0
        np.testing.assert_allclose(u, want, rtol=1e-6, atol=1e-12, err_msg=str(k))


def test_gradients_are_clipped_to_the_global_norm_of_the_trainable_leaves(params):
    grads = _grads(params, scale=10.0)
    labels = flax.traverse_util.flatten_dict(optim.param_labels(params, "mta"))
    flat_g = flax.traverse_util.flatten_dict(grads)
    norm = np.sqrt(sum(np.sum(np.square(g)) for k, g in flat_g.items()
                       if labels[k] == optim.TRAINABLE))
    # Adam's first step with a large eps is linear in the gradient: -lr * g / (|g| + eps).
    eps, lr, clip = 1e3, 0.5, 1.0
    for clip_norm, factor in ((clip, clip / norm), (0.0, 1.0)):
        updates, _, _, _ = _updates(
            params, _stage("mta", learning_rate=lr, eps=eps, grad_clip_norm=clip_norm), grads)
        for k, u in updates.items():
            g = factor * np.asarray(flat_g[k])
            want = -lr * g / (np.abs(g) + eps) if labels[k] == optim.TRAINABLE else 0.0
            np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-12, err_msg=str(k))
    assert norm > 10 * clip  # so that clipping changed the update


def test_adafactor_first_step_is_the_sign_scaled_by_the_weight_rms(params):
    # Step one of Adafactor (decay 0 at step 1): g / sqrt(g^2 + eps) = sign(g), block RMS 1,
    # times lr and the leaf's RMS (at least 1e-3). Frozen leaves do not move.
    updates, flat, flat_g, labels = _updates(
        params, _stage("mta", optimizer="adafactor", learning_rate=0.01), _grads(params, seed=1))
    for k, u in updates.items():
        p = np.asarray(flat[k])
        rms = max(np.sqrt(np.mean(np.square(p))), 1e-3)
        want = -0.01 * rms * np.sign(flat_g[k]) if labels[k] == optim.TRAINABLE else 0.0
        np.testing.assert_allclose(u, want, rtol=1e-4, atol=1e-12, err_msg=str(k))
