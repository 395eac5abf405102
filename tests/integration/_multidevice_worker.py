"""Run by test_multidevice.py in a subprocess with 8 host CPU devices; prints one JSON line.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
        python tests/integration/_multidevice_worker.py [checkpoint_dir]

A tiny T5 with MTA trains 5 Adam steps on a fixed batch under several meshes, with the
shardings of `mta_jax.sharding` passed to jax.jit; it reports the losses, the specs some
parameters ended up with, the errors of meshes that cannot work and, given a folder, a
checkpoint saved under one mesh and restored under another.
"""
import json
import os
import sys
import time

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", ""), \
    "set XLA_FLAGS before jax is imported"

import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from mta_jax import optim, step as step_lib  # noqa: E402
from mta_jax import sharding as sh  # noqa: E402
from mta_jax.models import t5 as t5_lib  # noqa: E402
from mta_jax.models.mta import MTAConfig  # noqa: E402

BATCH, SRC, TGT, STEPS = 8, 12, 8, 5
MESHES = {
    "single": dict(data=1, fsdp=1, tensor=1),
    "data8": dict(data=8, fsdp=1, tensor=1),
    "data4_tensor2": dict(data=4, fsdp=1, tensor=2),
    "fsdp2_data4": dict(data=4, fsdp=2, tensor=1),
}
# Leaves whose final specs the test looks at.
WATCH = ("encoder/layers_0/ffn/mlp/wi", "encoder/layers_1/ffn/mta/adapters/wi", "shared/embedding",
         "encoder/layers_0/self_attention/query")

model = t5_lib.T5(t5_lib.T5Config(
    vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
    ffn_plug=MTAConfig(num_adapters=5, encoder_layers="last", decoder_layers="last")))
tx = optax.adam(1e-3)

rng = np.random.default_rng(0)
batch_np = {
    "input_ids": rng.integers(2, 128, (BATCH, SRC)).astype(np.int32),
    "attention_mask": (np.arange(SRC)[None] < rng.integers(4, SRC + 1, (BATCH, 1))).astype(np.int32),
    "decoder_input_ids": rng.integers(2, 128, (BATCH, TGT)).astype(np.int32),
    "labels": rng.integers(2, 128, (BATCH, TGT)).astype(np.int32),
    "task_ids": rng.integers(0, 5, (BATCH,)).astype(np.int32),
}
batch_np["decoder_attention_mask"] = np.ones_like(batch_np["labels"])


# Under jit on one device: eager initialisation rounds differently (by an ulp) from any jit.
HOST_PARAMS = jax.device_get(
    jax.jit(lambda: nn.unbox(t5_lib.init_params(model, jax.random.key(0))))())


# The library's own train step (all parameters trainable), as training compiles it.
_LIBRARY_STEP = step_lib.make_train_step(model, tx, optim.param_labels(HOST_PARAMS, ".*"))


def train_step(state, batch):
    params, opt_state = state
    params, opt_state, metrics = _LIBRARY_STEP(params, opt_state, batch, jax.random.key(1))
    return (params, opt_state), metrics["loss"]


def setup(mesh_cfg, devices=None):
    """mesh, shardings and the jitted init / step for one mesh (errors before compiling)."""
    mesh = sh.make_mesh(mesh_cfg, devices)
    boxed = jax.eval_shape(lambda: t5_lib.init_params(model, jax.random.key(0)))
    p_sh = sh.param_shardings(boxed, mesh, sh.logical_rules(mesh_cfg))
    abstract = nn.unbox(boxed)
    sh.check_param_divisibility(abstract, p_sh, mesh)
    sh.check_batch_size(BATCH, mesh)
    o_sh = sh.opt_state_shardings(jax.eval_shape(tx.init, abstract), p_sh, mesh)
    b_sh = jax.tree.map(lambda _: sh.batch_sharding(mesh), batch_np)
    def init():
        params = jax.device_put(HOST_PARAMS, p_sh)
        return params, jax.jit(tx.init, out_shardings=o_sh)(params)

    step = jax.jit(train_step, in_shardings=((p_sh, o_sh), b_sh),
                   out_shardings=((p_sh, o_sh), sh.replicated(mesh)), donate_argnums=0)
    return mesh, abstract, p_sh, o_sh, init, step


def spec_of(x):
    return [list(e) if isinstance(e, tuple) else e for e in x.sharding.spec]


def layout_of(x):
    """The sharding spec and the shape of the block each device holds."""
    return {"spec": spec_of(x), "shard_shape": list(x.sharding.shard_shape(x.shape))}


def jit_init_matches_host(mesh_cfg):
    """Initialising under jit straight into the shardings gives the host's values."""
    mesh, abstract, p_sh, _, _, _ = setup(mesh_cfg)
    with sh.mesh_context(mesh, sh.logical_rules(mesh_cfg)):
        params = jax.jit(lambda: nn.unbox(t5_lib.init_params(model, jax.random.key(0))),
                         out_shardings=p_sh)()
    same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)), params, HOST_PARAMS)
    placed = jax.tree.map(lambda x, s: x.sharding == s, params, p_sh)
    return all(jax.tree.leaves(same)) and all(jax.tree.leaves(placed))


def error_of(fn):
    try:
        fn()
    except sh.ShardingError as e:
        return str(e)
    return None


def main(checkpoint_dir=None):
    out = {"device_count": jax.device_count(), "losses": {}, "layouts": {}, "describe": {},
           "batch_spec": {}}
    states = {}
    for name, cfg in MESHES.items():
        devices = jax.devices()[:1] if name == "single" else None
        mesh, abstract, p_sh, o_sh, init, step = setup(cfg, devices)
        t0 = time.time()
        with sh.mesh_context(mesh):
            state = init()
            batch = sh.shard_batch(batch_np, mesh)
            losses = []
            for _ in range(STEPS):
                state, loss = step(state, batch)
                losses.append(float(loss))
        print(name, time.time() - t0, file=sys.stderr)
        flat = flax.traverse_util.flatten_dict(state[0], sep="/")
        mu = flax.traverse_util.flatten_dict(state[1][0].mu, sep="/")
        out["losses"][name] = losses
        out["describe"][name] = sh.describe(mesh)
        out["batch_spec"][name] = spec_of(batch["input_ids"])
        out["layouts"][name] = {k: layout_of(flat[k]) for k in WATCH}
        out["layouts"][name].update({"mu:" + k: layout_of(mu[k]) for k in WATCH})
        out["layouts"][name]["count"] = layout_of(state[1][0].count)
        states[name] = (state, abstract, p_sh, o_sh, step, mesh)

    out["errors"] = {
        "product": error_of(lambda: sh.make_mesh(dict(data=3, fsdp=1, tensor=1))),
        "two_free": error_of(lambda: sh.make_mesh(dict(data=-1, fsdp=-1, tensor=1))),
        "indivisible_free": error_of(lambda: sh.make_mesh(dict(data=-1, fsdp=3, tensor=1))),
        "param": error_of(lambda: setup(dict(data=1, fsdp=1, tensor=8))),
        "batch": error_of(lambda: sh.check_batch_size(
            6, sh.make_mesh(dict(data=2, fsdp=2, tensor=2)))),
    }

    out["jit_init_matches_host"] = jit_init_matches_host(MESHES["data4_tensor2"])

    if checkpoint_dir:
        from mta_jax.checkpoint import Checkpointer

        (params, opt_state), _, _, _, step_a, mesh_a = states["data4_tensor2"]
        _, abstract, p_sh, o_sh, step_b, mesh_b = states["fsdp2_data4"]
        with Checkpointer(checkpoint_dir, async_save=False) as ckpt:
            ckpt.save(STEPS, params=params, opt_state=opt_state, data_state={})
            restored = ckpt.restore(
                params_target=sh.with_shardings(abstract, p_sh),
                opt_state_target=sh.with_shardings(jax.eval_shape(tx.init, abstract), o_sh))
        same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                            (params, opt_state), (restored.params, restored.opt_state))
        flat = flax.traverse_util.flatten_dict(restored.params, sep="/")
        out["checkpoint"] = {
            "step": restored.step,
            "all_equal": all(jax.tree.leaves(same)),
            "layouts": {k: layout_of(flat[k]) for k in WATCH},
            "target_matches": all(jax.tree.leaves(jax.tree.map(
                lambda x, s: x.sharding == s, restored.params, p_sh))),
        }
        # The next step from the restored state, on the new mesh, against the original mesh.
        with sh.mesh_context(mesh_b):
            _, loss_b = step_b((restored.params, restored.opt_state), sh.shard_batch(batch_np, mesh_b))
        with sh.mesh_context(mesh_a):
            _, loss_a = step_a((params, opt_state), sh.shard_batch(batch_np, mesh_a))
        out["checkpoint"]["next_loss"] = {"original_mesh": float(loss_a), "restored_mesh": float(loss_b)}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
