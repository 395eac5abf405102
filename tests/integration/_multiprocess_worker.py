"""One of two processes started by test_multidevice.py (4 host CPU devices each); prints JSON.

    JAX_COORDINATOR_ADDRESS=localhost:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i \
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
        python tests/integration/_multiprocess_worker.py

Each process loads its own half of a fixed global batch, as a multi-host input pipeline
does; `shard_batch` assembles the global array and a jitted sum sees all 8 rows.
"""
import json

import jax
import numpy as np

from mta_jax import sharding as sh

initialised = sh.maybe_initialize_distributed()  # before any other JAX call

GLOBAL = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
pid, n = jax.process_index(), jax.process_count()
rows = GLOBAL.shape[0] // n
local = {"x": GLOBAL[pid * rows:(pid + 1) * rows], "ids": np.arange(pid * rows, (pid + 1) * rows, dtype=np.int32)}

mesh = sh.make_mesh(dict(data=-1, fsdp=1, tensor=1))
batch = sh.shard_batch(local, mesh)
row_sums = jax.jit(lambda b: b["x"].sum(axis=1), out_shardings=sh.replicated(mesh))(batch)
try:
    # Data-parallel size 1 divides 3, but two hosts cannot load equal halves of it.
    sh.check_batch_size(3, sh.make_mesh(dict(data=1, fsdp=1, tensor=-1)))
    batch_error = None
except sh.ShardingError as e:
    batch_error = str(e)

print(json.dumps({
    "initialised": initialised,
    "process": pid,
    "processes": n,
    "describe": sh.describe(mesh),
    "global_shape": list(batch["x"].shape),
    "local_rows": sorted(int(i) for s in batch["ids"].addressable_shards for i in np.asarray(s.data)),
    "row_sums": np.asarray(row_sums).tolist(),
    "expected_row_sums": GLOBAL.sum(axis=1).tolist(),
    "batch_error": batch_error,
}))
jax.distributed.shutdown()
