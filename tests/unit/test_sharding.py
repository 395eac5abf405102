"""mta_jax.sharding on one device: rules, shardings per leaf, and the errors a user can cause.

The same code on 8 devices (real splits, losses equal to one device) is tested in
tests/integration/test_multidevice.py.
"""
import types

import flax
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mta_jax import sharding as sh
from mta_jax.models import t5 as t5_lib
from mta_jax.models.mta import MTAConfig


def tiny_model(**mta):
    return t5_lib.T5(t5_lib.T5Config(
        vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
        ffn_plug=MTAConfig(encoder_layers="last", decoder_layers="last", **mta)))


@pytest.fixture(scope="module")
def boxed():
    return jax.eval_shape(lambda: t5_lib.init_params(tiny_model(), jax.random.key(0)))


@pytest.fixture(scope="module")
def mesh():
    return sh.make_mesh(sh.default_mesh_config())


def fake_mesh(**sizes):
    """Only `.shape` is read by the checks; lets one device test a 4-way data split."""
    return types.SimpleNamespace(shape={a: sizes.get(a, 1) for a in sh.MESH_AXES})


# ----------------------------------------------------------------------------- config, mesh


def test_default_mesh_config():
    cfg = sh.default_mesh_config()
    assert (cfg.data, cfg.fsdp, cfg.tensor, cfg.rules) == (-1, 1, 1, None)
    assert sh.MESH_AXES == ("data", "fsdp", "tensor")


@pytest.mark.parametrize("sizes, devices, expected", [
    (dict(data=-1), 8, (8, 1, 1)),
    (dict(data=-1, tensor=2), 8, (4, 1, 2)),
    (dict(data=4, fsdp=-1), 8, (4, 2, 1)),
    (dict(data=2, fsdp=2, tensor=2), 8, (2, 2, 2)),
    (dict(data=-1), 1, (1, 1, 1)),
])
def test_mesh_shape_resolves_minus_one(sizes, devices, expected):
    assert sh.mesh_shape({"fsdp": 1, "tensor": 1, **sizes}, devices) == expected


@pytest.mark.parametrize("sizes, devices, words", [
    (dict(data=3, fsdp=1, tensor=1), 8, ["data=3", "product 3", "number of devices 8"]),
    (dict(data=-1, fsdp=-1, tensor=1), 8, ["only one axis may be -1", "got 2", "data, fsdp"]),
    (dict(data=-1, fsdp=3, tensor=1), 8, ["8 devices", "other axes (3)", "mesh.data=-1"]),
    (dict(data=0, fsdp=1, tensor=1), 8, ["mesh.data=0", "positive integer or -1"]),
])
def test_bad_mesh_names_the_numbers(sizes, devices, words):
    with pytest.raises(sh.ShardingError) as e:
        sh.mesh_shape(sizes, devices)
    for w in words:
        assert w in str(e.value)


def test_make_mesh_on_one_device(mesh):
    assert mesh.axis_names == sh.MESH_AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert sh.describe(mesh) == "mesh data=1 x fsdp=1 x tensor=1 over 1 cpu device"
    with pytest.raises(sh.ShardingError, match="product 2 must equal the number of devices 1"):
        sh.make_mesh(dict(data=2, fsdp=1, tensor=1))


def test_mesh_context_sets_mesh_and_rules(mesh):
    rules = sh.logical_rules()
    with sh.mesh_context(mesh, rules):
        assert tuple(jax.sharding.get_abstract_mesh().axis_names) == sh.MESH_AXES
        assert nn.logical_to_mesh_axes(("embed", "mlp")) == P("fsdp", "tensor")
    assert jax.sharding.get_abstract_mesh().empty


# -------------------------------------------------------------------------------- rules


def test_rules_map_logical_names_as_documented():
    rules = sh.logical_rules()
    expected = {
        "batch": ("data", "fsdp"), "length": None, "embed": "fsdp", "mlp": "tensor",
        "heads": "tensor", "kv": None, "vocab": "tensor", "relpos_buckets": None,
        "adapter": None, "adapter_mlp": "tensor", "task": None, "gate_in": None,
        "gate_hidden": None, "gate_out": None,
    }
    assert dict(rules) == expected
    # Activations: batch takes (data, fsdp), so embed cannot take fsdp again.
    assert nn.logical_to_mesh_axes(("batch", "length", "embed"), rules) == P(("data", "fsdp"), None, None)
    assert nn.logical_to_mesh_axes(("adapter", "embed", "mlp"), rules) == P(None, "fsdp", "tensor")


def test_rule_overrides_come_first():
    cfg = sh.default_mesh_config()
    cfg.rules = (("vocab", None), ("adapter", ["tensor"]))
    rules = sh.logical_rules(cfg)
    assert rules[:2] == (("vocab", None), ("adapter", ("tensor",)))
    assert nn.logical_to_mesh_axes(("vocab", "embed"), rules) == P(None, "fsdp")


@pytest.mark.parametrize("rule, words", [
    (("vocab", "model"), ["mesh.rules[0]", "'model'", "not one of"]),
    (("vocab",), ["mesh.rules[0]", "must be a pair"]),
])
def test_bad_rule_override(rule, words):
    with pytest.raises(sh.ShardingError) as e:
        sh.logical_rules({"rules": (rule,)})
    for w in words:
        assert w in str(e.value)


# ------------------------------------------------------------------------ param shardings


def test_param_shardings_one_per_leaf(boxed, mesh):
    shardings = sh.param_shardings(boxed, mesh, sh.logical_rules())
    unboxed = nn.unbox(boxed)
    assert jax.tree.structure(shardings) == jax.tree.structure(unboxed)
    leaves = jax.tree.leaves(shardings)
    assert len(leaves) == len(jax.tree.leaves(unboxed)) and all(isinstance(s, NamedSharding) for s in leaves)
    flat = flax.traverse_util.flatten_dict(shardings, sep="/")
    assert flat["shared/embedding"].spec == P("tensor", "fsdp")
    assert flat["encoder/layers_0/ffn/mlp/wi"].spec == P("fsdp", "tensor")
    assert flat["encoder/layers_1/ffn/mta/adapters/wi"].spec == P(None, "fsdp", "tensor")
    assert flat["decoder/layers_1/ffn/mta/adapters/wo"].spec == P(None, "tensor", "fsdp")
    assert flat["decoder/layers_0/self_attention/out"].spec == P("tensor", None, "fsdp")
    assert flat["encoder/relpos_bias/rel_embedding"].spec == P(None, "tensor")
    assert flat["encoder/layers_1/ffn/mta/selector/logits"].spec == P(None, None)
    sh.check_param_divisibility(unboxed, shardings, mesh)


def test_stage_two_gate_and_unboxed_leaves_replicated(mesh):
    model = tiny_model(top_k=2, num_shared_adapters=1, gate_hidden_dim=16)
    boxed = jax.eval_shape(lambda: t5_lib.init_params(model, jax.random.key(0)))
    flat = flax.traverse_util.flatten_dict(
        sh.param_shardings(boxed, mesh, sh.logical_rules()), sep="/")
    gate = {k: v.spec for k, v in flat.items() if "gate_" in k}
    assert gate and all(spec in (P(None, None), P()) for spec in gate.values()), gate
    assert flat["encoder/layers_1/ffn/mta/shared_adapters/wi"].spec == P(None, "fsdp", "tensor")


def test_unknown_logical_axis_is_an_error(boxed, mesh):
    rules = tuple(r for r in sh.logical_rules() if r[0] != "relpos_buckets")
    with pytest.raises(sh.ShardingError, match=r"decoder/relpos_bias/rel_embedding .*'relpos_buckets'"):
        sh.param_shardings(boxed, mesh, rules)


def test_divisibility_error_names_param_path(boxed, mesh):
    shardings = sh.param_shardings(boxed, mesh, sh.logical_rules())
    with pytest.raises(sh.ShardingError) as e:
        sh.check_param_divisibility(nn.unbox(boxed), shardings, fake_mesh(tensor=3))
    msg = str(e.value)
    assert "parameter decoder/layers_0/encoder_decoder_attention/key has size 4 on dim 1" in msg
    assert "mesh axis size 3 (mesh tensor=3)" in msg and "more)" in msg
    with pytest.raises(sh.ShardingError, match=r"parameter decoder/final_layer_norm/scale has size 32 "
                                                r"on dim 0 .* size 3 \(mesh fsdp=3\)"):
        sh.check_param_divisibility(nn.unbox(boxed), shardings, fake_mesh(fsdp=3))


# --------------------------------------------------------------------- optimizer state


def _opt_shardings(tx, boxed, mesh):
    params = nn.unbox(boxed)
    p_sh = sh.param_shardings(boxed, mesh, sh.logical_rules())
    state = jax.eval_shape(tx.init, params)
    o_sh = sh.opt_state_shardings(state, p_sh, mesh)
    assert jax.tree.structure(o_sh) == jax.tree.structure(state)
    paths = {jax.tree_util.keystr(k): s.spec for k, s in jax.tree_util.tree_flatten_with_path(o_sh)[0]}
    return paths


def test_adam_moments_mirror_params(boxed, mesh):
    paths = _opt_shardings(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), boxed, mesh)
    assert paths["[1][0].count"] == P()
    wi = "['encoder']['layers_0']['ffn']['mlp']['wi']"
    assert paths[f"[1][0].mu{wi}"] == P("fsdp", "tensor") == paths[f"[1][0].nu{wi}"]


def test_partitioned_frozen_and_factored_states(boxed, mesh):
    labels = jax.tree_util.tree_map_with_path(
        lambda p, _: "train" if "mta" in jax.tree_util.keystr(p) else "frozen", nn.unbox(boxed))
    tx = optax.multi_transform({"train": optax.adam(1e-3), "frozen": optax.set_to_zero()}, labels)
    paths = _opt_shardings(tx, boxed, mesh)
    mu = [s for k, s in paths.items() if ".mu[" in k]
    assert mu and all("mta" in k for k in paths if ".mu[" in k)
    assert paths[".inner_states['train'].inner_state[0].mu['encoder']['layers_1']['ffn']['mta']"
                 "['adapters']['wi']"] == P(None, "fsdp", "tensor")
    # Adafactor's factored row statistics lose a dim: replicated, not the param's spec.
    paths = _opt_shardings(optax.adafactor(1e-3, min_dim_size_to_factor=2), boxed, mesh)
    assert paths["[0].v_row['encoder']['layers_0']['ffn']['mlp']['wi']"] == P()


# ------------------------------------------------------------------------------- batches


def test_batch_and_replicated_shardings(mesh):
    assert sh.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert sh.replicated(mesh).spec == P()


def test_batch_size_error_names_the_numbers():
    with pytest.raises(sh.ShardingError) as e:
        sh.check_batch_size(6, fake_mesh(data=2, fsdp=2, tensor=2))
    assert str(e.value) == ("train.batch_size=6 is not divisible by the data-parallel size 4 "
                            "(mesh data=2 x fsdp=2)")
    sh.check_batch_size(8, fake_mesh(data=2, fsdp=2, tensor=2))


def test_shard_batch_single_process(mesh):
    local = {"inputs": np.arange(12, dtype=np.int32).reshape(4, 3),
             "task_ids": np.array([0, 1, 2, 3], np.int32)}
    out = sh.shard_batch(local, mesh)
    for k, v in local.items():
        assert isinstance(out[k], jax.Array) and out[k].sharding == sh.batch_sharding(mesh)
        np.testing.assert_array_equal(np.asarray(out[k]), v)
    with pytest.raises(sh.ShardingError, match="same leading"):
        sh.shard_batch({"a": np.zeros((4, 2)), "b": np.zeros((3,))}, mesh)


# --------------------------------------------------------------------------- multi-host

_ENV = ("MTA_JAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
        "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "OMPI_MCA_orte_hnp_uri",
        "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")


@pytest.fixture
def dist(monkeypatch):
    for var in _ENV:
        monkeypatch.delenv(var, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False, raising=False)
    return monkeypatch, calls


@pytest.mark.parametrize("env", [
    {}, {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"},
    {"TPU_WORKER_HOSTNAMES": "localhost"}, {"JAX_NUM_PROCESSES": "1"},
    {"MTA_JAX_DISTRIBUTED": "0", "JAX_COORDINATOR_ADDRESS": "h:1234"},
])
def test_distributed_noop_single_process(dist, env):
    monkeypatch, calls = dist
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert sh.maybe_initialize_distributed() is False and calls == []


@pytest.mark.parametrize("env, kwargs", [
    ({"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     {"num_processes": 2, "process_id": 1}),
    ({"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}, {}),
    ({"MTA_JAX_DISTRIBUTED": "1"}, {}),
])
def test_distributed_initialised_when_configured(dist, env, kwargs):
    monkeypatch, calls = dist
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert sh.maybe_initialize_distributed() is True and calls == [kwargs]


def test_distributed_without_coordinator_is_named(dist):
    monkeypatch, calls = dist
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    with pytest.raises(sh.ShardingError, match="JAX_NUM_PROCESSES=4 needs JAX_COORDINATOR_ADDRESS"):
        sh.maybe_initialize_distributed()
    assert calls == []
