"""Optimizers, schedules, stage-two labels and the train step's freezing."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.default import stage_config
from mta_jax import optim, train
from mta_jax.models import mta as M
from mta_jax.models.t5 import T5, T5Config, init_params

CFG = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=2,
               dropout_rate=0.0, ffn_plug=M.MTAConfig(encoder_layers="last", decoder_layers="last",
                                                      top_k=2, num_shared_adapters=1))


@pytest.fixture(scope="module")
def setup():
    model = T5(CFG)
    params = flax.linen.unbox(jax.jit(lambda: init_params(model, jax.random.PRNGKey(0), batch=4))())
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


def test_labels_follow_the_regex(setup):
    _, params, _ = setup
    labels = flax.traverse_util.flatten_dict(optim.param_labels(params, "mta"))
    assert all((v == optim.TRAINABLE) == any("mta" in p for p in k) for k, v in labels.items())
    counts = optim.count_params(params, optim.param_labels(params, "mta"))
    assert counts["trainable"] > 0 and counts["frozen"] > 0
    total = sum(x.size for x in jax.tree_util.tree_leaves(params))
    assert counts["trainable"] + counts["frozen"] == total


def test_frozen_leaves_hold_no_adam_state(setup):
    _, params, _ = setup
    labels = optim.param_labels(params, "mta")
    tx, _ = optim.make_optimizer(_stage("mta"), 10, labels)
    state = tx.init(params)
    trainable = optim.count_params(params, labels)["trainable"]
    moments = sum(x.size for x in jax.tree_util.tree_leaves(state) if x.ndim > 0)
    assert moments == 2 * trainable
    assert abs(optim.tree_bytes(state) / (2 * 4 * trainable) - 1.0) < 0.01


def _step(model, params, labels, stage, **kw):
    tx, _ = optim.make_optimizer(stage, 10, labels)
    step = jax.jit(train.make_train_step(model, tx, optim.trainable_keys(labels), **kw))
    return step, tx.init(params)


def test_stage_two_step_changes_only_trainable_leaves(setup):
    model, params, batch = setup
    labels = optim.param_labels(params, "mta")
    step, opt_state = _step(model, params, labels, _stage("mta"))
    new, _, metrics = step(params, opt_state, batch, jax.random.PRNGKey(0))
    flat_old, flat_new = (flax.traverse_util.flatten_dict(p) for p in (params, new))
    flat_labels = flax.traverse_util.flatten_dict(labels)
    for k, v in flat_old.items():
        same = np.array_equal(np.asarray(flat_new[k]), np.asarray(v))
        if flat_labels[k] == optim.FROZEN:
            assert same, k
    assert not np.array_equal(
        np.asarray(flat_new[("decoder", "layers_0", "ffn", "mta", "gate_out", "kernel")]),
        np.asarray(flat_old[("decoder", "layers_0", "ffn", "mta", "gate_out", "kernel")]))
    assert np.isfinite(float(metrics["loss"]))


def _dot_count(step, params, opt_state, batch):
    jaxpr = jax.make_jaxpr(step)(params, opt_state, batch, jax.random.PRNGKey(0))
    return str(jaxpr).count("dot_general")


def test_no_gradient_is_computed_for_the_frozen_backbone(setup):
    model, params, batch = setup
    all_labels = optim.param_labels(params, ".*")
    mta_labels = optim.param_labels(params, "mta")
    step1, s1 = _step(model, params, all_labels, _stage(".*"))
    step2, s2 = _step(model, params, mta_labels, _stage("mta"))
    # Stage two's backward pass skips the weight gradients of every frozen matmul.
    assert _dot_count(step2, params, s2, batch) < _dot_count(step1, params, s1, batch)


def test_gradient_accumulation_equals_the_full_batch(setup):
    model, params, batch = setup
    labels = optim.param_labels(params, ".*")
    # Adam's eps = 1 makes the first update ~ lr * gradient, so the parameters compare the
    # accumulated gradients themselves; with eps = 1e-8 a near-zero gradient's update is
    # lr * g / (|g| + eps), and float32 rounding of g moved such a leaf by 2e-6 (jax 0.12).
    stage = _stage(".*", eps=1.0)
    full, state = _step(model, params, labels, stage)
    accum, _ = _step(model, params, labels, stage, grad_accum_steps=2)
    p_full, _, m_full = full(params, state, batch, jax.random.PRNGKey(0))
    p_acc, _, m_acc = accum(params, state, batch, jax.random.PRNGKey(0))
    assert float(m_acc["loss"]) == pytest.approx(float(m_full["loss"]), rel=1e-5)
    assert float(m_acc["grad_norm"]) == pytest.approx(float(m_full["grad_norm"]), rel=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(p_full), jax.tree_util.tree_leaves(p_acc)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-7)


@pytest.mark.parametrize("kind, expected", [
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0]),
    ("linear", [0.0, 0.5, 1.0, 2 / 3, 1 / 3]),
])
def test_schedules_with_warmup(kind, expected):
    s = _stage(".*", schedule=kind, warmup_steps=2, learning_rate=1.0)
    schedule = optim.make_schedule(s, num_steps=5)
    np.testing.assert_allclose([float(schedule(i)) for i in range(5)], expected, atol=1e-6)


def test_adafactor_clipping_and_weight_decay_build_and_step(setup):
    model, params, batch = setup
    labels = optim.param_labels(params, ".*")
    stage = _stage(".*", optimizer="adafactor", grad_clip_norm=1.0, weight_decay=0.01)
    step, state = _step(model, params, labels, stage)
    new, _, metrics = step(params, state, batch, jax.random.PRNGKey(0))
    assert np.isfinite(float(metrics["grad_norm"]))
    assert not np.array_equal(np.asarray(new["shared"]["embedding"]), np.asarray(params["shared"]["embedding"]))


def test_unknown_optimizer_and_schedule_are_named():
    with pytest.raises(ValueError, match="optimizer must be adamw | adafactor"):
        optim.make_optimizer(_stage(".*", optimizer="sgd"), 10)
    with pytest.raises(ValueError, match="schedule must be"):
        optim.make_schedule(_stage(".*", schedule="step"), 10)
