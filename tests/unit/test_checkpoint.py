"""Checkpoint save/restore: bitwise round trips, keep-N and keep-best, corrupt steps, errors."""
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from mta_jax import checkpoint as ckpt


def _params(seed=0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"encoder": {"kernel": jax.random.normal(k1, (4, 8), jnp.float32)},
            "mta": {"adapters": jax.random.normal(k2, (3, 8), jnp.float32).astype(jnp.bfloat16),
                    "selector": jnp.arange(10, dtype=jnp.int32)}}


def _optimizer():
    # Stage-two shape: frozen leaves get set_to_zero (EmptyState), the rest Adam.
    labels = {"encoder": {"kernel": "frozen"}, "mta": {"adapters": "train", "selector": "frozen"}}
    return optax.multi_transform({"train": optax.adam(1e-2), "frozen": optax.set_to_zero()}, labels)


def _trained_state(steps=3):
    params, tx = _params(), _optimizer()
    opt_state = tx.init(params)
    for _ in range(steps):
        grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params, opt_state


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.atleast_1d(np.asarray(x)).view(np.uint8),
                                      np.atleast_1d(np.asarray(y)).view(np.uint8))


def _save(c, step, params, opt_state, shift=False, **kw):
    """Saves `params` (plus `step` where `shift`, to tell steps apart) and a data state."""
    if shift:
        params = jax.tree.map(lambda p: p + step, params)
    return c.save(step, params=params, opt_state=opt_state, data_state={"epoch": 0, "position": step * 4}, **kw)


def test_roundtrip_is_bitwise(tmp_path):
    params, opt_state = _trained_state()
    with ckpt.Checkpointer(tmp_path / "stage1", max_to_keep=2) as c:
        saved = c.save(7, params=params, opt_state=opt_state,
                       data_state={"epoch": 1, "position": np.int64(123), "seed": 42},
                       extra={"best_score": np.float32(0.5)})
        assert saved
        restored = c.restore(params_target=_abstract(params), opt_state_target=_abstract(opt_state))
        concrete = c.restore(7, params_target=params, opt_state_target=opt_state)  # arrays as targets
    _assert_bitwise_equal(concrete.params, params)
    _assert_bitwise_equal(concrete.opt_state, opt_state)
    assert restored.step == 7
    _assert_bitwise_equal(restored.params, params)
    _assert_bitwise_equal(restored.opt_state, opt_state)
    # optax's namedtuples survive (the target's structure), so the optimizer can use it.
    assert type(restored.opt_state) is type(opt_state)
    assert restored.data_state == {"epoch": 1, "position": 123, "seed": 42}
    assert restored.extra == {"best_score": 0.5}
    updates, _ = _optimizer().update(jax.tree.map(jnp.ones_like, params), restored.opt_state, restored.params)
    assert float(jnp.abs(updates["encoder"]["kernel"]).max()) == 0.0  # frozen stays frozen


def test_keep_n_removes_old_steps(tmp_path):
    params, opt_state = _trained_state(1)
    with ckpt.Checkpointer(tmp_path, max_to_keep=2) as c:
        for step in (10, 20, 30, 40):
            assert _save(c, step, params, opt_state)
        assert not _save(c, 40, params, opt_state)  # already there: nothing written
        c.wait()
        assert c.all_steps() == [30, 40]
        assert c.latest_step() == 40
        assert c.best_step() is None  # no metric to rank by
    assert sorted(d for d in os.listdir(tmp_path) if d.isdigit()) == ["30", "40"]


def test_keep_best_in_addition_to_latest(tmp_path):
    params, opt_state = _trained_state(1)
    with ckpt.Checkpointer(tmp_path, max_to_keep=2, keep_best_metric="score") as c:
        _save(c, 1, params, opt_state, metrics={"score": 0.3})
        _save(c, 2, params, opt_state, metrics={"score": jnp.float32(0.9)})
        _save(c, 3, params, opt_state)  # between evaluations: no metrics
        _save(c, 4, params, opt_state, metrics={"score": 0.1})
        _save(c, 5, params, opt_state, metrics={"score": 0.2})
        c.wait()
        assert c.all_steps() == [2, 4, 5]
        assert c.best_step() == 2
        with pytest.raises(ValueError, match="'score'.*got keys \\['loss'\\]"):
            _save(c, 6, params, opt_state, metrics={"loss": 1.0})
    # A resumed run reads the metrics back and still protects the best step.
    with ckpt.Checkpointer(tmp_path, max_to_keep=2, keep_best_metric="score") as c:
        assert c.best_step() == 2
        _save(c, 6, params, opt_state, metrics={"score": 0.05})
        _save(c, 7, params, opt_state, metrics={"score": 0.95})
        c.wait()
        assert c.all_steps() == [6, 7]
        assert c.best_step() == 7


@pytest.mark.parametrize("damage", ["truncate_params", "remove_opt_state"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog, damage):
    params, opt_state = _trained_state(1)
    with ckpt.Checkpointer(tmp_path, max_to_keep=3, async_save=False) as c:
        _save(c, 1, params, opt_state, shift=True)
        _save(c, 2, params, opt_state, shift=True)
    latest = tmp_path / "2"
    # A save killed mid-write leaves orbax's temporary folder, which is never listed.
    shutil.copytree(latest, tmp_path / "3.orbax-checkpoint-tmp-1")
    if damage == "truncate_params":
        for root, _, files in os.walk(latest / "params"):
            for name in files:
                open(os.path.join(root, name), "w").close()
    else:
        for root, _, files in os.walk(latest / "opt_state", topdown=False):
            for name in files:
                os.remove(os.path.join(root, name))
            os.rmdir(root)
    with ckpt.Checkpointer(tmp_path) as c, caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        restored = c.restore(params_target=_abstract(params), opt_state_target=_abstract(opt_state))
        assert restored.step == 1
        _assert_bitwise_equal(restored.params, jax.tree.map(lambda p: p + 1, params))
        assert restored.data_state == {"epoch": 0, "position": 4}
        warnings = [r.getMessage() for r in caplog.records if r.name == ckpt.__name__]
        assert any(str(latest) in w and "falling back to step 1" in w for w in warnings), warnings
        # Asked for by number, a damaged step is an error, not a silent fallback.
        with pytest.raises(ckpt.CheckpointError, match=f"{latest}"):
            c.restore(2, params_target=_abstract(params), opt_state_target=_abstract(opt_state))


def test_no_readable_checkpoint_names_the_directory(tmp_path):
    empty = tmp_path / "empty_stage"
    with ckpt.Checkpointer(empty) as c:
        assert c.latest_step() is None and c.all_steps() == []
        with pytest.raises(ckpt.CheckpointError, match=f"no checkpoint in {empty}"):
            c.restore(params_target={}, opt_state_target={})
    with pytest.raises(ValueError, match=f"{tmp_path / 'missing'} does not exist"):
        ckpt.restore_params_from(tmp_path / "missing")

    params, opt_state = _trained_state(1)
    with ckpt.Checkpointer(tmp_path / "one", async_save=False) as c:
        _save(c, 5, params, opt_state)
        with pytest.raises(ckpt.CheckpointError, match=r"step 4 .*steps there: \[5\]"):
            c.restore_params(4)
    for root, _, files in os.walk(tmp_path / "one" / "5" / "params"):
        for name in files:
            open(os.path.join(root, name), "w").close()
    with pytest.raises(ckpt.CheckpointError, match=f"no readable checkpoint in {tmp_path / 'one'}: step 5"):
        ckpt.restore_params_from(tmp_path / "one", params_target=_abstract(params))


def test_restore_into_other_dtype_and_sharding(tmp_path):
    params, opt_state = _trained_state(1)
    with ckpt.Checkpointer(tmp_path) as c:
        _save(c, 3, params, opt_state)
        devices = np.array(jax.devices())
        mesh = jax.sharding.Mesh(devices, ("data",))
        row_sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        # Every leaf becomes float32; the 1-D selector (10 rows) stays replicated.
        target = jax.tree.map(
            lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32,
                                           sharding=row_sharded if p.ndim == 2 and p.shape[0] % len(devices) == 0
                                           else replicated), params)
        step, restored = c.restore_params(params_target=target)
    assert step == 3
    for got, want, spec in zip(jax.tree.leaves(restored), jax.tree.leaves(params), jax.tree.leaves(target)):
        assert got.dtype == jnp.float32
        assert got.sharding == spec.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want).astype(np.float32))


def test_restore_params_without_target_and_with_plain_orbax(tmp_path):
    params, opt_state = _trained_state(1)
    with ckpt.Checkpointer(tmp_path / "stage2") as c:
        _save(c, 1, params, opt_state, shift=True)
        _save(c, 2, params, opt_state, shift=True)
    step, restored = ckpt.restore_params_from(tmp_path / "stage2")
    assert step == 2
    _assert_bitwise_equal(restored, jax.tree.map(lambda p: p + 2, params))
    assert all(x.sharding.device_set == {jax.local_devices()[0]} for x in jax.tree.leaves(restored))
    step, restored = ckpt.restore_params_from(tmp_path / "stage2", step=1)
    assert step == 1
    _assert_bitwise_equal(restored, jax.tree.map(lambda p: p + 1, params))

    # The recipe in the module docstring.
    manager = ocp.CheckpointManager(tmp_path / "stage2")
    latest = manager.latest_step()
    plain = manager.restore(latest, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(params)))).params
    manager.close()
    _assert_bitwise_equal(plain, jax.tree.map(lambda p: p + 2, params))
    direct = ocp.StandardCheckpointer().restore(tmp_path / "stage2" / str(latest) / "params", _abstract(params))
    _assert_bitwise_equal(direct, plain)


def test_async_save_survives_donation(tmp_path):
    params, opt_state = _trained_state(1)
    step_fn = jax.jit(lambda p: jax.tree.map(lambda x: x * 2, p), donate_argnums=0)
    expected, target = jax.tree.map(lambda x: np.array(x, copy=True), params), _abstract(params)
    with ckpt.Checkpointer(tmp_path, async_save=True) as c:
        c.save(1, params=params, opt_state=opt_state, data_state={})
        step_fn(params)  # the training step donates the buffers right after save returns
        _, restored = c.restore_params(params_target=target)
    _assert_bitwise_equal(restored, expected)


def test_save_rejects_non_json_state(tmp_path):
    params, opt_state = _trained_state(1)
    with ckpt.Checkpointer(tmp_path) as c:
        with pytest.raises(ValueError, match="'data_state' must be JSON-serialisable"):
            c.save(1, params=params, opt_state=opt_state, data_state={"rng": object()})
        assert c.all_steps() == []
