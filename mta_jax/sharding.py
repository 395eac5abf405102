"""Device mesh, logical axis rules and shardings for parameters, optimizer state and batches.

The mesh has three named axes (t5x / maxtext style)::

    data    pure data parallelism: parameters replicated, the batch split
    fsdp    data parallelism whose parameters (their `embed` dimension) are split too (ZeRO-3)
    tensor  model parallelism: `mlp`, `heads`, `vocab` (and `adapter_mlp`) dimensions split

Every parameter of `models.t5` / `models.mta` carries logical axis names; `logical_rules`
maps them to mesh axes and `param_shardings` turns the boxed abstract parameters into one
`NamedSharding` per leaf. The train loop then passes explicit shardings to
`jax.jit(..., in_shardings=..., out_shardings=...)`, so no rules context is needed at run time.

The adapter axis (`adapter`: the E stacked task adapters) is replicated: every example runs
through all E adapters (stage one) or a top-k mixture computed densely (stage two), so
splitting adapters over devices would save no compute, and E = 5 rarely divides a mesh axis.
Inside each adapter, its FFN width (`mlp`, or `adapter_mlp` for bottlenecks) is split over
`tensor` exactly like the dense FFN it replaces.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mta_jax.errors import ShardingError

PyTree = Any
log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes the batch (leading) dimension is split over

# Logical axis -> mesh axis (None: replicated). Order matters: flax gives a mesh axis to the
# first matching rule only, so `batch` (data, fsdp) wins over `embed` (fsdp) in activations.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("relpos_buckets", None),
    ("adapter", None),  # see the module docstring
    ("adapter_mlp", "tensor"),
    ("task", None),
    ("gate_in", None),
    ("gate_hidden", None),
    ("gate_out", None),
)


# ---------------------------------------------------------------------------------- mesh


def default_mesh_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data = -1  # data-parallel replicas (parameters replicated); -1 = the devices left over
    c.fsdp = 1  # data-parallel shards that also split parameters' `embed` dim (-1 = the rest)
    c.tensor = 1  # model-parallel shards of `mlp`/`heads`/`vocab` dims (-1 = the rest)
    # Extra ((logical, mesh-axis | None | (mesh-axes)), ...) rules, applied before the defaults.
    c.rules = ml_collections.config_dict.placeholder(tuple)
    return c


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, ...]:
    """(data, fsdp, tensor) sizes for `num_devices`, with a single -1 resolved."""
    sizes = []
    for axis in MESH_AXES:
        value = _get(mesh_cfg, axis, -1 if axis == "data" else 1)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (value < 1 and value != -1):
            raise ShardingError(f"mesh.{axis}={value!r} must be a positive integer or -1 (the devices left over)")
        sizes.append(int(value))
    given = " x ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
    free = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
    if len(free) > 1:
        raise ShardingError(f"mesh {given}: only one axis may be -1, got {len(free)} ({', '.join(free)})")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % fixed:
            raise ShardingError(
                f"mesh {given}: {num_devices} devices are not divisible by the product of the "
                f"other axes ({fixed}), so mesh.{free[0]}=-1 has no integer size")
        sizes[MESH_AXES.index(free[0])] = num_devices // fixed
    elif fixed != num_devices:
        raise ShardingError(
            f"mesh {given}: the product {fixed} must equal the number of devices {num_devices} "
            f"(set one axis to -1 to take the devices left over)")
    return tuple(sizes)


def _auto_axis_types() -> dict:
    # Auto (GSPMD) axes: jax.make_mesh defaults to Explicit axes in recent JAX, which would
    # switch on sharding-in-types under jax.set_mesh; the model is written for Auto.
    axis_type = getattr(jax.sharding, "AxisType", None)
    return {} if axis_type is None else {"axis_types": (axis_type.Auto,) * len(MESH_AXES)}


def make_mesh(mesh_cfg: Any = None, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
        from jax.experimental import mesh_utils
        # Places mesh axes on the physical topology (ICI rings on TPU); needs all devices.
        device_array = mesh_utils.create_device_mesh(shape, devices)
    except Exception as e:  # noqa: BLE001 -- e.g. a shape the TPU topology cannot map
        log.info("mesh_utils.create_device_mesh(%s) failed (%s); using device order", shape, e)
        device_array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(device_array, MESH_AXES, **_auto_axis_types())


def describe(mesh: Mesh) -> str:
    """e.g. 'mesh data=4 x fsdp=2 x tensor=1 over 8 cpu devices'."""
    axes = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    devices = list(mesh.devices.flat)
    platform = devices[0].platform if devices else "no"
    text = f"mesh {axes} over {len(devices)} {platform} device{'s' if len(devices) != 1 else ''}"
    processes = len({d.process_index for d in devices})
    return text + (f" in {processes} processes" if processes > 1 else "")


def mesh_context(mesh: Mesh, rules: Optional[Sequence[tuple[str, Any]]] = None):
    """Context manager making `mesh` (and, given, the logical axis `rules`) current.

    `jax.set_mesh` (JAX >= 0.7; `with mesh:` is deprecated), with fallbacks for older JAX.
    `jax.jit` with explicit NamedShardings needs neither. The rules matter for code traced
    inside: `nn.unbox` of freshly initialised parameters and `nn.with_logical_constraint`
    on activations constrain to the rules of the context, and to replicated without them.
    """
    stack = contextlib.ExitStack()
    if hasattr(jax, "set_mesh"):
        stack.enter_context(jax.set_mesh(mesh))
    elif hasattr(jax.sharding, "use_mesh"):
        stack.enter_context(jax.sharding.use_mesh(mesh))
    else:
        stack.enter_context(mesh)  # Mesh is itself a context manager in old JAX
    if rules is not None:
        stack.enter_context(nn.logical_axis_rules(tuple(rules)))
    return stack


# --------------------------------------------------------------------------------- rules


def _check_rule(i: int, rule: Any) -> tuple[str, Any]:
    where = f"mesh.rules[{i}]={rule!r}"
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
        raise ShardingError(f"{where} must be a pair (logical axis name, mesh axis | None | tuple)")
    logical, target = rule
    targets = (target,) if target is None or isinstance(target, str) else tuple(target)
    for t in targets:
        if t is not None and t not in MESH_AXES:
            raise ShardingError(f"{where}: mesh axis {t!r} is not one of {MESH_AXES}")
    if isinstance(target, list):
        target = tuple(target)
    return logical, target


def logical_rules(mesh_cfg: Any = None) -> tuple[tuple[str, Any], ...]:
    """The logical -> mesh axis rules: `mesh_cfg.rules` (if any) first, then DEFAULT_RULES."""
    extra = _get(mesh_cfg, "rules", None) or ()
    return tuple(_check_rule(i, r) for i, r in enumerate(extra)) + DEFAULT_RULES


def _path_str(path: Iterable[Any]) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def param_shardings(boxed_abstract_params: PyTree, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]]) -> PyTree:
    """One NamedSharding per leaf of the UNBOXED params tree.

    `boxed_abstract_params`: e.g. `jax.eval_shape(lambda: t5.init_params(model, rng))`, its
    leaves `nn.Partitioned` boxes (or plain arrays, which are replicated). Every logical
    name must have a rule: an unknown name is an error rather than a silent replication.
    """
    known = {name for name, _ in rules}

    def leaf(path, x):
        if not _is_box(x):
            return NamedSharding(mesh, P())
        unknown = [n for n in x.names if isinstance(n, str) and n not in known]
        if unknown:
            raise ShardingError(
                f"parameter {_path_str(path)} has logical axes {tuple(x.names)}; {unknown} "
                f"have no rule: add e.g. ({unknown[0]!r}, None) to mesh.rules")
        # flax's logical_to_mesh_axes: first matching rule wins, a mesh axis used once per array
        return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(x.names), rules))

    return jax.tree_util.tree_map_with_path(leaf, boxed_abstract_params, is_leaf=_is_box)


def _spec(sharding: Any) -> Any:
    return sharding.spec if hasattr(sharding, "spec") else sharding


def _axis_size(mesh: Any, entry: Any) -> tuple[int, str]:
    names = (entry,) if isinstance(entry, str) else tuple(entry)
    size = math.prod(int(mesh.shape[n]) for n in names)
    label = " x ".join(f"{n}={mesh.shape[n]}" for n in names)
    return size, label


def _indivisible(shape: Sequence[int], spec: Any, mesh: Any) -> Optional[str]:
    """None when `spec` splits `shape` evenly on `mesh`, else what goes wrong."""
    spec = tuple(spec)
    if len(spec) > len(shape):
        return f"has {len(shape)} dims but its sharding names {len(spec)} ({spec})"
    for dim, entry in enumerate(spec):
        if entry is None or entry is P.UNCONSTRAINED:
            continue
        size, label = _axis_size(mesh, entry)
        if shape[dim] % size:
            return (f"has size {shape[dim]} on dim {dim} (shape {tuple(shape)}), not divisible "
                    f"by the mesh axis size {size} (mesh {label})")
    return None


def check_param_divisibility(abstract_params_unboxed: PyTree, shardings: PyTree, mesh: Any) -> None:
    """ShardingError naming every parameter whose sharded dims do not split evenly.

    Run before compiling: jit's own error names neither the config nor the fix.
    `shardings` holds NamedShardings (or PartitionSpecs) matching the params tree.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract_params_unboxed)
    specs = jax.tree_util.tree_leaves(
        jax.tree.map(_spec, shardings, is_leaf=lambda s: isinstance(s, (NamedSharding, P))),
        is_leaf=lambda s: isinstance(s, P))
    assert len(flat) == len(specs), "shardings do not match the parameter tree"
    problems = []
    for (path, x), spec in zip(flat, specs):
        why = _indivisible(np.shape(x), spec, mesh)
        if why:
            problems.append(f"parameter {_path_str(path)} {why}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ShardingError("; ".join(problems[:3]) + more +
                            ". Change the mesh (mesh.tensor / mesh.fsdp) or the model size, or "
                            "replicate that logical axis via mesh.rules")


def opt_state_shardings(opt_state_abstract: PyTree, params_shardings: PyTree, mesh: Mesh) -> PyTree:
    """Shardings for an optax state: leaves that mirror a parameter get its sharding.

    A leaf mirrors a parameter when its key path ends with that parameter's path (Adam's
    mu/nu, also inside optax.partition / masked / chain states) and it has the same number
    of dims, split evenly. Everything else (counts, factored Adafactor statistics, empty
    states) is replicated. Needs no optimizer object, unlike optax.tree_map_params.
    """
    by_path = {
        tuple(path): s for path, s in jax.tree_util.tree_flatten_with_path(
            params_shardings, is_leaf=lambda s: isinstance(s, NamedSharding))[0]}
    depths = sorted({len(p) for p in by_path}, reverse=True)
    rep = NamedSharding(mesh, P())

    def leaf(path, x):
        path = tuple(path)
        for depth in depths:
            s = by_path.get(path[-depth:]) if len(path) >= depth else None
            if s is not None:
                if len(s.spec) == np.ndim(x) and _indivisible(np.shape(x), s.spec, mesh) is None:
                    return s
                return rep
        return rep

    return jax.tree_util.tree_map_with_path(leaf, opt_state_abstract)


def with_shardings(abstract_tree: PyTree, shardings: PyTree) -> PyTree:
    """ShapeDtypeStructs carrying `shardings` (e.g. checkpoint restore targets)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        abstract_tree, shardings)


# --------------------------------------------------------------------------------- batch


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over ('data', 'fsdp'), every other dim replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def data_parallel_size(mesh: Any) -> int:
    return math.prod(int(mesh.shape[a]) for a in BATCH_AXES)


def check_batch_size(global_batch_size: int, mesh: Any, name: str = "train.batch_size") -> None:
    dp = data_parallel_size(mesh)
    if global_batch_size % dp:
        parts = " x ".join(f"{a}={mesh.shape[a]}" for a in BATCH_AXES)
        raise ShardingError(f"{name}={global_batch_size} is not divisible by the data-parallel "
                            f"size {dp} (mesh {parts})")
    processes = jax.process_count()
    if global_batch_size % processes:
        raise ShardingError(f"{name}={global_batch_size} is not divisible by the number of "
                            f"processes {processes} (each host loads an equal slice)")


def shard_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Host arrays [local_batch, ...] -> global jax.Arrays [local_batch * processes, ...].

    Single process: the local batch is the global batch. Multi-process: each host passes
    its own distinct examples, the same number on every host; they land on that host's
    devices (with make_mesh's device order, process i's rows are i*n:(i+1)*n).
    """
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in local_batch.items()}
    if len(set(sizes.values())) > 1 or None in sizes.values():
        raise ShardingError(f"every batch array needs the same leading (batch) dim; got {sizes}")
    if sizes:
        n = next(iter(sizes.values()))
        check_batch_size(n * jax.process_count(), mesh,
                         name=f"the global batch ({n} per process x {jax.process_count()} processes)"
                         if jax.process_count() > 1 else "the batch size")
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


# --------------------------------------------------------------------------- multi-host


def _int_env(name: str) -> Optional[int]:
    value = os.environ.get(name, "").strip()
    try:
        return int(value) if value else None
    except ValueError:
        return None


def _multi_process_reason() -> Optional[str]:
    """Why the environment asks for several processes, or None for a single process."""
    forced = os.environ.get("MTA_JAX_DISTRIBUTED", "").strip().lower()
    if forced in ("0", "false", "no"):
        return None
    if forced in ("1", "true", "yes"):
        return "MTA_JAX_DISTRIBUTED=1"
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS is set"
    if (_int_env("JAX_NUM_PROCESSES") or 1) > 1:
        return f"JAX_NUM_PROCESSES={_int_env('JAX_NUM_PROCESSES')}"
    if "SLURM_JOB_ID" in os.environ and "SLURM_STEP_NODELIST" in os.environ and (_int_env("SLURM_NTASKS") or 1) > 1:
        return f"SLURM_NTASKS={_int_env('SLURM_NTASKS')}"
    if "OMPI_MCA_orte_hnp_uri" in os.environ and (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return f"OMPI_COMM_WORLD_SIZE={_int_env('OMPI_COMM_WORLD_SIZE')}"
    hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "a multi-host TPU slice (TPU_WORKER_HOSTNAMES)"
    return None


def maybe_initialize_distributed() -> bool:
    """jax.distributed.initialize() when the environment configures several processes.

    Must run before any other JAX call. Returns True when it initialised. A single-process
    run (a laptop, one GPU host, a single-host TPU VM) is a no-op. MTA_JAX_DISTRIBUTED=1
    forces the call (e.g. Cloud TPU pods, where JAX reads the topology from the metadata
    server); =0 disables it.
    """
    reason = _multi_process_reason()
    if reason is None:
        return False
    if getattr(jax.distributed, "is_initialized", lambda: False)():
        return False
    kwargs = {}
    for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if _int_env(env) is not None:
            kwargs[key] = _int_env(env)
    if "num_processes" in kwargs and not os.environ.get("JAX_COORDINATOR_ADDRESS") and reason.startswith("JAX_"):
        raise ShardingError(f"{reason} needs JAX_COORDINATOR_ADDRESS=host:port (process 0's address) "
                            "and JAX_PROCESS_ID")
    log.info("initialising jax.distributed (%s)", reason)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 -- name the environment that asked for it
        raise ShardingError(f"jax.distributed.initialize() failed ({reason}): {type(e).__name__}: {e}. "
                            "Set MTA_JAX_DISTRIBUTED=0 to run as a single process") from e
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


__all__ = [
    "MESH_AXES", "BATCH_AXES", "DEFAULT_RULES", "ShardingError", "default_mesh_config",
    "mesh_shape", "make_mesh", "describe", "mesh_context", "logical_rules", "param_shardings",
    "check_param_divisibility", "opt_state_shardings", "with_shardings", "replicated",
    "batch_sharding", "data_parallel_size", "check_batch_size", "shard_batch",
    "maybe_initialize_distributed",
]
