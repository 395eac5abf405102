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
