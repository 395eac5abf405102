"""The train step: freezing from the labels alone, no frozen weight gradient in the compiled
program, gradient accumulation equal to the full batch."""
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.default import stage_config
from mta_jax import optim, step as step_lib
from mta_jax.models import mta as M
from mta_jax.models.t5 import T5
from tests.helpers import TINY_T5, assert_trees_close, init_params

CFG = TINY_T5.replace(num_layers=1, feed_forward_proj="relu", tie_word_embeddings=True,
                      scale_decoder_outputs=True,
                      ffn_plug=M.MTAConfig(encoder_layers="last", decoder_layers="last", top_k=2,
                                           num_shared_adapters=1))


@pytest.fixture(scope="module")
def setup():
    model = T5(CFG)
    params = jax.tree.map(jnp.asarray, init_params(model))
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(2, 64, (4, 7)), "attention_mask": np.ones((4, 7)),
             "decoder_input_ids": rng.integers(2, 64, (4, 5)), "labels": rng.integers(2, 64, (4, 5)),
             "decoder_attention_mask": np.ones((4, 5)), "task_ids": np.array([0, 1, 3, 3])}
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
    return model, params, batch


def _stage(trainable, **changes):
    s = stage_config(num_train_steps=10, learning_rate=1e-2, trainable=trainable)
    for k, v in changes.items():
        s[k] = v
    return s


def _step(model, params, trainable, stage=None, **kw):
    labels = optim.param_labels(params, trainable)
    tx, _ = optim.make_optimizer(stage or _stage(trainable), 10, labels)
    return jax.jit(step_lib.make_train_step(model, tx, labels, **kw)), tx.init(params), labels


@pytest.mark.slow  # over 3 s on 2 cores
def test_stage_two_step_changes_only_trainable_leaves(setup):
    model, params, batch = setup
    step, opt_state, labels = _step(model, params, "mta")
    new, _, metrics = step(params, opt_state, batch, jax.random.PRNGKey(0))
    flat_old, flat_new = (flax.traverse_util.flatten_dict(p) for p in (params, new))
    flat_labels = flax.traverse_util.flatten_dict(labels)
    changed = {k for k, v in flat_old.items()
               if not np.array_equal(np.asarray(flat_new[k]), np.asarray(v))}
    assert changed and all(flat_labels[k] == optim.TRAINABLE for k in changed)
    assert ("decoder", "layers_0", "ffn", "mta", "gate_out", "kernel") in changed
    assert np.isfinite(float(metrics["loss"]))


def _dots(fn, *args) -> int:
    """dot instructions in the optimised, compiled program of fn(*args) (fusions included)."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return len(re.findall(r"\bdot\(", text))


@pytest.mark.slow  # over 3 s on 2 cores
def test_compiled_stage_two_step_has_no_frozen_weight_gradient(setup):
    model, params, batch = setup
    rng = jax.random.PRNGKey(0)
    step2, s2, labels = _step(model, params, "mta")
    step1, s1, _ = _step(model, params, ".*")
    loss_fn = step_lib.make_loss_fn(model)
    flat = flax.traverse_util.flatten_dict(params)
    flat_labels = flax.traverse_util.flatten_dict(labels)
    frozen = {k: v for k, v in flat.items() if flat_labels[k] == optim.FROZEN}

    def minimal(trainable, batch):
        """The least a stage-two step must compute: the gradient of the trainable leaves,
        the frozen ones closed over as constants."""
        def loss(t):
            merged = flax.traverse_util.unflatten_dict({**frozen, **t})
            return loss_fn(merged, batch, rng, 20.0)[0]
        return jax.grad(loss)(trainable)

    trainable = {k: v for k, v in flat.items() if k not in frozen}
    ours = _dots(lambda p, o, b: step2(p, o, b, rng), params, s2, batch)
    least = _dots(minimal, trainable, batch)
    everything = _dots(lambda p, o, b: step1(p, o, b, rng), params, s1, batch)
    forward = _dots(lambda p, b: loss_fn(p, b, rng, 20.0)[0], params, batch)
    # Stage two runs exactly the matmuls of the minimal gradient (its optimizer adds none);
    # a step that also took the frozen backbone's weight gradients runs many more.
    assert ours == least, (ours, least)
    assert everything > ours + 10 and ours > forward, (everything, ours, forward)


def _keep_gradient(labels):
    """An optimizer whose state is the last gradient it saw and whose updates are zero."""
    keep = optax.GradientTransformation(
        lambda p: jax.tree.map(jnp.zeros_like, p),
        lambda g, state, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    return optax.multi_transform({optim.TRAINABLE: keep, optim.FROZEN: optax.set_to_zero()},
                                 labels)


@pytest.mark.slow  # over 3 s on 2 cores
@pytest.mark.parametrize("trainable", [".*", "mta"])
def test_gradient_accumulation_equals_the_full_batch(setup, trainable):
    model, params, batch = setup
    labels = optim.param_labels(params, trainable)
    tx = _keep_gradient(labels)
    state = tx.init(params)
    rng = jax.random.PRNGKey(0)
    full = jax.jit(step_lib.make_train_step(model, tx, labels))
    accum = jax.jit(step_lib.make_train_step(model, tx, labels, grad_accum_steps=2))
    _, g_full, m_full = full(params, state, batch, rng)
    _, g_acc, m_acc = accum(params, state, batch, rng)
    assert float(m_acc["loss"]) == pytest.approx(float(m_full["loss"]), rel=1e-6)
    assert float(m_acc["grad_norm"]) == pytest.approx(float(m_full["grad_norm"]), rel=1e-6)
    leaves_full, leaves_acc = jax.tree.leaves(g_full), jax.tree.leaves(g_acc)
    assert len(leaves_full) == len(leaves_acc) > 0
    scale = max(float(jnp.max(jnp.abs(g))) for g in leaves_full)
    for a, b in zip(leaves_full, leaves_acc):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6 * scale)


@pytest.mark.slow  # over 3 s on 2 cores
def test_remat_gives_the_loss_and_gradients_of_no_remat(setup):
    model, params, batch = setup
    remat = T5(model.config.replace(remat=True, dropout_rate=0.5))
    plain = T5(model.config.replace(dropout_rate=0.5))
    rng = jax.random.PRNGKey(1)
    grad_fn = lambda m: jax.value_and_grad(
        lambda p, r: step_lib.make_loss_fn(m)(p, batch, r, 20.0)[0])
    # Remat really recomputes the blocks: the backward pass holds checkpointed computations.
    jaxpr = lambda m: str(jax.make_jaxpr(grad_fn(m))(params, rng))
    assert "remat" in jaxpr(remat) and "remat" not in jaxpr(plain)
    l_plain, g_plain = jax.jit(grad_fn(plain))(params, rng)
    remat_step = jax.jit(grad_fn(remat))
    l_remat, g_remat = remat_step(params, rng)
    # With dropout on, the recomputation draws the same masks: equal loss, equal gradients.
    assert float(l_remat) == pytest.approx(float(l_plain), rel=1e-6)
    assert_trees_close(g_remat, g_plain, rtol=1e-5, atol=1e-6)
    # ... and dropout is on: another key, another loss.
    assert float(remat_step(params, jax.random.PRNGKey(2))[0]) != float(l_remat)


@pytest.mark.slow  # over 3 s on 2 cores
def test_dropout_keys_of_each_impl_drive_the_step(setup):
    """train.rng_impl: the default typed threefry key draws the same masks as the raw key
    training used before; rbg draws others, the same ones for the same key."""
    _, params, batch = setup
    model = T5(CFG.replace(dropout_rate=0.5))
    step, opt_state, _ = _step(model, params, ".*")
    loss = lambda key: float(step(params, opt_state, batch, key)[2]["loss"])
    raw = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(42), 1), 3)
    fry = jax.random.fold_in(step_lib.dropout_key(42, 1), 3)
    rbg = jax.random.fold_in(step_lib.dropout_key(42, 1, "rbg"), 3)
    assert loss(fry) == loss(raw)
    assert np.isfinite(loss(rbg)) and loss(rbg) == loss(rbg) != loss(fry)


@pytest.mark.slow  # over 3 s on 2 cores
@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_dropout_masks_tied_to_their_block_change_no_number(setup, impl):
    """T5Config.tie_dropout_masks (build sets it under tensor parallelism) orders the draws
    and nothing else: the same masks, so the same loss and the same updated parameters, bit
    for bit, through attention, FFN, MTA task and shared adapter dropouts."""
    _, params, batch = setup
    key = jax.random.fold_in(step_lib.dropout_key(42, 0, impl), 3)

    def run(tie):
        model = T5(CFG.replace(dropout_rate=0.5, tie_dropout_masks=tie))
        step, opt_state, _ = _step(model, params, ".*")
        barriers = str(jax.make_jaxpr(step)(params, opt_state, batch, key)).count(
            "optimization_barrier")
        new, _, metrics = step(params, opt_state, batch, key)
        return barriers, float(metrics["loss"]), new

    (tied_barriers, tied_loss, tied), (plain_barriers, plain_loss, plain) = run(True), run(False)
    # One block a stack, MTA in each: the encoder's 2 residual drops, its attention weights,
    # the task adapters and the shared adapter; the decoder's 3, 2 and the same 2.
    assert (tied_barriers, plain_barriers) == (5 + 7, 0)
    assert tied_loss == plain_loss
    jax.tree.map(np.testing.assert_array_equal, tied, plain)
