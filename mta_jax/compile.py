"""Compile the real train and decode steps for a TPU slice on any host, before renting it.

    python -m mta_jax.compile --config=configs/t5_large.py --topology=v5e:4x4 \
        [--config.mesh.fsdp=-1 --config.mesh.data=1 ...] [--out=compile.json] [--nodecode]

With libtpu installed (`pip install "jax[tpu]"`, part of the `test` extra) XLA compiles for a
TPU topology it does not have: `jax.experimental.topologies` describes the slice's chips, the
mesh of `config.mesh` is laid over them, and each stage's step is built exactly as training
builds it (build.make_setup / setup.stage: model, optimizer, freezing labels, shardings;
step.jit_train_step with the accelerator's donation; the batch split as shard_batch splits
it; evaluation's decoder), from abstract values only: no weights, tokenizer or data are read,
and `init_from` gives its shapes (a local folder's config.json, or the published configs of
hf.PUBLISHED_CONFIGS, offline).

Per stage it prints (and --out writes as JSON):
  memory per device   parameters, optimizer state, other arguments, temporaries, against the
                      chip's HBM (compiled.memory_analysis(); parameters and optimizer state
                      from their shardings)
  collectives         all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute
                      in the compiled HLO: how many, and the bytes they carry per step
  cost per device     FLOPs and bytes of one step as it runs (mta_jax.hlo.costs): XLA's cost
                      analysis counts a loop body once, so the later iterations of the
                      windowed-einsum loops that fsdp's sharded matmuls compile to are added;
                      and its bytes accessed count every operand and result in any memory, so
                      the HBM traffic is estimated apart, from the arrays the compiled program
                      keeps in HBM (memory space 0) and what it moves to and from VMEM
  roofline            three lower bounds on the step time: FLOPs / the chip's bf16 peak, HBM
                      traffic / HBM bandwidth, collective traffic / ICI bandwidth. The step
                      cannot be faster than the largest; the MFU that bound implies is the
                      most the step could reach. Its model FLOPs are the products the step
                      needs, read from its program less remat's recomputation: with every
                      weight trained, mta_jax.flops' count to the FLOP; with the backbone
                      frozen (stage two) less, as no gradient is taken for frozen weights or
                      below the lowest trained block. Estimates from published chip figures
                      (flops.TPU_CHIPS), never measurements.
A stage that does not fit exits 1 with one line: the stage, the bytes it needs, the HBM, and
the mesh change (fsdp across the slice, remat, gradient accumulation) estimated to fit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import time
from typing import Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections

from mta_jax import build, cli, evaluation, flops, hlo, optim, sharding, storage
from mta_jax import step as step_lib
from mta_jax.errors import ShardingError
from mta_jax.models import mta

GiB = 2**30
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


# ----------------------------------------------------------------------------- the slice

# libtpu's compiler runs on fibers with small stacks; estimating the cost of some fused
# convolutions recurses deeper than they allow, and the process dies with "SIGSEGV STACK
# OVERFLOW" (seen: T5-small's stage-two step under fsdp with dropout, jax 0.10.2's libtpu).
# 8 MiB, a Linux thread's default stack, is reserved address space, touched only when used.
FIBER_STACK_FLAG = "--fibers_default_thread_stack_size=8388608"


@contextlib.contextmanager
def _libtpu_environment(extra_flags=()):
    """libtpu reads these when it loads (once a process). Without them, on a host with no TPU
    it prints errors about the worker hostnames and accelerator type, and takes a lock file
    that makes every other JAX process on the host wait ~10 s for it; it opens no chip when
    only compiling. LIBTPU_INIT_ARGS gains FIBER_STACK_FLAG and `extra_flags` (those training
    runs with: step.libtpu_flags), unless the user's own LIBTPU_INIT_ARGS names them."""
    values = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_WORKER_HOSTNAMES": "localhost",
              "TPU_ACCELERATOR_TYPE": "v5litepod-8", "TPU_SKIP_MDS_QUERY": "1"}
    saved = {k: os.environ.get(k) for k in [*values, "LIBTPU_INIT_ARGS"]}
    os.environ.update({k: v for k, v in values.items() if saved[k] is None})
    cli.add_libtpu_flags([FIBER_STACK_FLAG, *extra_flags])
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def topology(spec: str, libtpu_flags=()) -> tuple[flops.Chip, list]:
    """'v5e:4x4' | 'v4:2x2x2' ... -> (the chip, the slice's compile-only devices, one per chip).
    `libtpu_flags` count only if this is the process's first TPU topology (libtpu loads once)."""
    m = re.fullmatch(r"(\w+):(\d+(?:x\d+){1,2})", spec.strip())
    chip = flops.TPU_CHIPS.get(m.group(1)) if m else None
    if chip is None:
        raise ShardingError(f"--topology={spec!r} must be <chip>:<AxB> or <chip>:<AxBxC> with "
                            f"chip one of {', '.join(flops.TPU_CHIPS)}, e.g. v5e:4x4 or v4:2x2x2")
    dims = [int(d) for d in m.group(2).split("x")] + [1]
    per_host = tuple(min(d, h) for d, h in zip(dims, chip.chips_per_host))
    try:
        from jax.experimental import topologies
        with _libtpu_environment(libtpu_flags):
            desc = topologies.get_topology_desc(
                platform="tpu", topology_name=f"{chip.name}:{m.group(2)}",
                chip_config_name="megacore" if chip.megacore else "default",
                chips_per_host_bounds=per_host)
    except Exception as e:  # noqa: BLE001 -- libtpu missing, or a shape it does not make
        hint = ' (install libtpu: pip install "jax[tpu]")' if "not installed" in str(e) else ""
        raise ShardingError(f"--topology={spec!r}: {str(e).splitlines()[0]}{hint}") from e
    return chip, list(desc.devices)


# ----------------------------------------------------------------------------- abstract inputs

def abstract_batch(config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """A training batch (the layout of mta_jax/data) as int32 shapes, split like shard_batch:
    input_ids, attention_mask [B, S]; decoder_input_ids, labels, decoder_attention_mask [B, T];
    task_ids [B]."""
    b, s, t = (config.train.batch_size, config.data.max_source_length,
               config.data.max_target_length)
    sharding.check_batch_size(b, mesh)
    split = sharding.batch_sharding(mesh)
    shapes = dict(input_ids=(b, s), attention_mask=(b, s), decoder_input_ids=(b, t), labels=(b, t),
                  decoder_attention_mask=(b, t), task_ids=(b,))
    return {k: jax.ShapeDtypeStruct(v, jnp.int32, sharding=split) for k, v in shapes.items()}


def _abstract_dropout_key(config, mesh) -> jax.ShapeDtypeStruct:
    key = jax.eval_shape(lambda: step_lib.dropout_key(0, 0, config.train.rng_impl))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying NamedShardings."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(tree))


def compile_train_step(setup: build.Setup, name: str):
    """The stage's train step as training jits it (donation as on TPU), compiled for the mesh."""
    stage, mesh, config = setup.stage(name), setup.mesh, setup.config
    fn = step_lib.jit_train_step(stage, sharding.batch_sharding(mesh),
                                 grad_accum_steps=config.train.grad_accum_steps, platform="tpu")
    with sharding.mesh_context(mesh, setup.rules):
        lowered = fn.lower(stage.abstract_params, stage.abstract_opt_state,
                           abstract_batch(config, mesh), _abstract_dropout_key(config, mesh))
    return lowered.compile()


def compile_decoder(setup: build.Setup, name: str):
    """Evaluation's decoder (config.eval) for the stage's model. Evaluation passes host
    arrays, which jit places replicated beside the sharded parameters: so do these."""
    stage, mesh, config = setup.stage(name), setup.mesh, setup.config
    rows, s = config.eval.batch_size, config.data.max_source_length
    rep = sharding.replicated(mesh)
    inputs = [jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rep)
              for shape in ((rows, s), (rows, s), (rows,))]
    decoder = evaluation.make_decoder(stage.model, config.eval)
    with sharding.mesh_context(mesh, setup.rules):
        return decoder.lower(stage.abstract_params, *inputs).compile()


# ----------------------------------------------------------------------------- the compiled HLO

def _group_size(line: str, num_devices: int) -> int:
    """Devices per replica group of a collective (`line`: what follows its opcode; all devices
    when not given)."""
    mesh_form = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if mesh_form:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", mesh_form.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", mesh_form.group(2)))
    iota_form = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if iota_form:
        return int(iota_form.group(2))
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    return len(listed.group(1).split(",")) if listed else num_devices


def collectives(hlo_text: "str | hlo.Module", num_devices: int) -> dict[str, dict[str, float]]:
    """{kind: {count, bytes, traffic}} of the collectives in a compiled module's text.

    bytes: the arrays each collective produces on a device (of an asynchronous `-start` op,
    whose result tuple also holds its operands and context, the largest array); traffic: what
    a device sends for it on a ring of n devices: all-reduce 2(n-1)/n x bytes, all-gather and
    all-to-all (n-1)/n x bytes, reduce-scatter (n-1) x its shard, collective-permute the bytes.
    """
    out = {k: {"count": 0, "bytes": 0.0, "traffic": 0.0} for k in COLLECTIVES}
    seen = set()
    module = hlo_text if isinstance(hlo_text, hlo.Module) else hlo.Module(hlo_text)
    found = ((type_text, opcode, line, module.runs.get(c, 1)) for c in module.computations
             for _, type_text, opcode, line in module.instructions(c))
    for type_text, opcode, line, times in found:
        is_async = opcode.endswith("-start")
        kind = opcode[:-len("-start")] if is_async else opcode
        if kind not in out:
            continue
        # XLA TPU carries one asynchronous collective through several fused computations,
        # each holding a copy of it with the same channel: count it once.
        channel = re.search(r"channel_id=(\d+)", line)
        if channel:
            if (kind, channel.group(1)) in seen:
                continue
            seen.add((kind, channel.group(1)))
        sizes = hlo.shape_bytes(type_text)
        nbytes = float(max(sizes) if is_async and kind != "all-reduce" else sum(sizes))
        n = _group_size(line, num_devices)
        share = {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n,
                 "all-to-all": (n - 1) / n, "reduce-scatter": n - 1,
                 "collective-permute": 1.0}[kind]
        entry = out[kind]
        entry["count"] += times
        entry["bytes"] += nbytes * times
        entry["traffic"] += nbytes * share * times if n > 1 or kind == "collective-permute" else 0.0
    return out


def _cost(compiled, module: hlo.Module) -> dict[str, float]:
    """FLOPs and bytes per device of one step as it runs (`hlo.costs`): the compiler's count
    with the loop iterations it leaves out added, and the HBM share of the traffic."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list before jax 0.4.30
    # Never "optimal_seconds": for a whole train step it came out negative.
    raw_flops, raw_bytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    run = hlo.costs(module)
    return {"flops": raw_flops + run["flops_left_out"],
            "bytes_accessed": raw_bytes + run["bytes_left_out"],
            "hbm_bytes": float(run["hbm_bytes"]), "matmul_flops": float(run["matmul_flops"]),
            "remat_flops": float(run["remat_flops"]),
            "needed_flops": float(run["matmul_flops"] - run["remat_flops"]),
            "compiler_flops": raw_flops, "compiler_bytes_accessed": raw_bytes,
            "loops": run["loops"], "unknown_trip_counts": run["unknown_trip_counts"]}


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    fields = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                  aliased=m.alias_size_in_bytes, temporaries=m.temp_size_in_bytes,
                  code=m.generated_code_size_in_bytes)
    fields["total"] = (fields["arguments"] + fields["outputs"] - fields["aliased"]
                       + fields["temporaries"] + fields["code"])
    return {k: int(v) for k, v in fields.items()}


# ----------------------------------------------------------------------------- one stage

def roofline(cost: dict, traffic: float, chip: flops.Chip, model_flops_per_device: float) -> dict:
    """Lower bounds on the step time (s) and the MFU the largest of them would imply: the
    model FLOPs the step needs (per device) over that time and the chip's peak.

    compute: the step's FLOPs over the chip's bf16 peak; hbm: its HBM traffic (`hlo.costs`'
    estimate from the memory spaces of the compiled program) over the HBM bandwidth; ici: what
    its collectives send over the ICI bandwidth. `all_bytes_s` is the compiler's bytes
    accessed over the HBM bandwidth: what the step would take if every byte XLA counts, on-chip
    VMEM traffic included, went through HBM (the figure these tables showed until 2026-12-03;
    not a bound)."""
    bounds = {"compute_s": cost["flops"] / chip.peak_bf16,
              "hbm_s": cost["hbm_bytes"] / chip.hbm_bandwidth,
              "ici_s": traffic / chip.ici_bandwidth}
    bound = max(bounds, key=bounds.get)
    step_s = bounds[bound]
    mfu = model_flops_per_device / (step_s * chip.peak_bf16) if step_s > 0 else None
    return {**bounds, "step_s": step_s, "bound": bound[:-2], "mfu": mfu,
            "all_bytes_s": cost["bytes_accessed"] / chip.hbm_bandwidth}


class _Clock:
    """Wall and CPU seconds (this process, every thread) since it was made: on a shared host
    the CPU seconds say what a compile costs, the wall seconds what it took."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict[str, float]:
        return {"compile_s": time.perf_counter() - self.wall,
                "compile_cpu_s": time.process_time() - self.cpu}


def _save_hlo(hlo_dir: Optional[str], filename: str, text: str) -> None:
    if hlo_dir:
        storage.write_text(storage.makedirs(hlo_dir) / filename, text)


def train_report(setup: build.Setup, name: str, chip: flops.Chip, hbm_bytes: int,
                 hlo_dir: Optional[str] = None) -> dict:
    """Compiles one stage's train step and reads memory, collectives, cost and roofline."""
    stage, mesh, config = setup.stage(name), setup.mesh, setup.config
    counts = optim.count_params(stage.abstract_params, stage.labels)
    report = {"stage": name, "kind": "train step",
              "parameters": counts[optim.TRAINABLE] + counts[optim.FROZEN],
              "trainable_parameters": counts[optim.TRAINABLE]}
    state = {"parameters": bytes_per_device(stage.abstract_params),
             "optimizer_state": bytes_per_device(stage.abstract_opt_state)}
    clock = _Clock()
    if sum(state.values()) > hbm_bytes:  # no program can fit: do not spend the compile
        return _unfit(report, clock, state, sum(state.values()),
                      "not compiled: parameters and optimizer state alone exceed the HBM")
    try:
        compiled = compile_train_step(setup, name)
    except Exception as e:  # noqa: BLE001 -- XLA refuses a program over the chip's HBM
        used = _xla_out_of_memory(str(e), sum(state.values()))
        if used is None:
            raise
        return _unfit(report, clock, state, used, str(e).splitlines()[0][:300])
    report.update(clock.read())
    hlo_text = compiled.as_text()
    _save_hlo(hlo_dir, f"{name}_train.hlo", hlo_text)
    memory = {**_memory(compiled), **state}
    memory["other_arguments"] = memory["arguments"] - sum(state.values())
    module = hlo.Module(hlo_text)  # read once: collectives and cost both count loops in it
    comms = collectives(module, mesh.devices.size)
    cost = _cost(compiled, module)
    b, s, t = (config.train.batch_size, config.data.max_source_length,
               config.data.max_target_length)
    model_flops = analytic_train_flops(stage, b, s, t)
    # MFU's numerator: the products the step needs, read from its program (remat's
    # recomputation left out). Every weight trained, or only the MTA blocks, that is
    # mta_jax.flops' count (a test checks both to the FLOP); the count stands in where a
    # loop's trip count could not be read.
    needed = cost["needed_flops"] if not cost["unknown_trip_counts"] or model_flops is None \
        else model_flops / mesh.devices.size
    report.update(memory=memory, fits=memory["total"] <= hbm_bytes, collectives=comms,
                  cost=cost, model_flops=model_flops, devices=mesh.devices.size,
                  roofline=roofline(cost, sum(c["traffic"] for c in comms.values()), chip,
                                    needed))
    return report


def analytic_train_flops(stage: build.Stage, batch: int, source: int, target: int
                         ) -> Optional[int]:
    """mta_jax.flops' count of one step of `stage`: every weight trained (stage one), or only
    the MTA blocks (stage two's `trainable="mta"`, the backbone frozen); None for another
    split, whose products only the compiled program tells."""
    labels = flax.traverse_util.flatten_dict(dict(stage.labels))
    trained = {path for path, label in labels.items() if label == optim.TRAINABLE}
    in_mta = {path for path in labels if "mta" in path}
    config = stage.model.config
    if len(trained) == len(labels):
        return flops.model_flops_per_step(config, batch, source, target)
    if isinstance(stage.plug, mta.MTAConfig) and trained == in_mta:
        return flops.train_flops(config, batch, source, target, frozen_backbone=True)
    return None


def _unfit(report: dict, clock: "_Clock", state: dict, total: int, note: str) -> dict:
    """A train step known not to fit without its compiled program: what it needs at least."""
    report.update(clock.read(), fits=False, note=note, memory=dict(
        state, total=total, temporaries=max(total - sum(state.values()), 0)))
    return report


def _xla_out_of_memory(message: str, state_bytes: int) -> Optional[int]:
    """The bytes a step needs from XLA's refusal to compile it for the chip, or None when
    `message` is another error. XLA TPU words it "... Used 18.9G of 15.7G hbm ..." (the
    whole program) or "... memory required for HLO temporaries (18.37G) exceeds available
    HBM (15.75G)" (temporaries: the arguments come on top)."""
    size = r"([\d.]+)([KMGT]?)(?:i?B)?"
    to_bytes = lambda m, i: int(float(m.group(i)) * 1024 ** " KMGT".index(m.group(i + 1) or " "))
    whole = re.search(rf"Used {size} of {size} hbm", message)
    if whole:
        return to_bytes(whole, 1)
    temps = re.search(rf"HLO temporaries \({size}\) exceeds available HBM", message)
    return to_bytes(temps, 1) + state_bytes if temps else None


def decode_report(setup: build.Setup, name: str, hbm_bytes: int,
                  hlo_dir: Optional[str] = None) -> dict:
    """Compiles evaluation's decoder of one stage: memory and the collectives in its program
    (those inside the search loop run once per generated position)."""
    clock = _Clock()
    compiled = compile_decoder(setup, name)
    hlo = compiled.as_text()
    _save_hlo(hlo_dir, f"{name}_decode.hlo", hlo)
    memory = _memory(compiled)
    memory["parameters"] = bytes_per_device(setup.stage(name).abstract_params)
    return {"stage": name, "kind": "decode", **clock.read(), "memory": memory,
            "fits": memory["total"] <= hbm_bytes,
            "collectives": collectives(hlo, setup.mesh.devices.size)}


# ----------------------------------------------------------------------------- not fitting

def _mesh_flags(mesh) -> str:
    return " x ".join(f"{a}={s}" for a, s in mesh.shape.items())


def fitting_change(config, mesh, report: dict, hbm_bytes: int) -> str:
    """The config change estimated to bring a train step under `hbm_bytes`: fsdp across the
    slice (parameters and optimizer state split over every data-parallel device), then remat,
    then gradient accumulation (both cut activation temporaries). An estimate to compile."""
    m = report["memory"]
    state = m["parameters"] + m["optimizer_state"]
    other = m["total"] - state - m["temporaries"]
    data = int(mesh.shape["data"])
    flags_, estimate = [], state
    if data > 1:  # the data-parallel replicas become fsdp shards
        flags_.append("--config.mesh.data=1 --config.mesh.fsdp=-1")
        estimate = state // data
    room = hbm_bytes - estimate - other
    temps = m["temporaries"]
    if temps > room and not config.model.remat:
        flags_.append("--config.model.remat=True")
        temps = temps // 2  # a block's activations are recomputed: roughly half stay
    if temps > room > 0:
        accum = config.train.grad_accum_steps * math.ceil(temps / room)
        flags_.append(f"--config.train.grad_accum_steps={accum}")
        temps = temps * config.train.grad_accum_steps // accum
    if room <= 0:
        return ("no mesh change fits the parameters and optimizer state alone: a chip with more "
                "HBM, or a larger slice")
    need = (estimate + other + temps) / GiB
    return " ".join(flags_) + f" (estimated {need:.1f} GiB per device; compile it to check)"


def check_fits(result: dict) -> None:
    """ShardingError (one line) for the first step that does not fit the chip's HBM."""
    hbm = result["hbm_bytes"]
    for report in result["steps"]:
        if report["fits"]:
            continue
        m = report["memory"]
        parts = ", ".join(f"{k.replace('_', ' ')} {m[k] / GiB:.2f}" for k in
                          ("parameters", "optimizer_state", "temporaries") if k in m)
        advice = (report.get("fitting_change") or
                  "a smaller config.eval.batch_size or beam_size")
        raise ShardingError(
            f"{report['stage']} {report['kind']} needs {m['total'] / GiB:.2f} GiB per device "
            f"({parts} GiB) but a {result['chip']['name']} chip has {hbm / GiB:.2f} GiB of HBM "
            f"(mesh {result['mesh']}); try {advice}")


# ----------------------------------------------------------------------------- the whole run

def compile_config(config: ml_collections.ConfigDict, topology_spec: str, *, decode: bool = True,
                   hbm_gib: Optional[float] = None, hlo_dir: Optional[str] = None,
                   log=print) -> dict:
    """Compiles every stage of `config` (and, with `decode`, evaluation's decoder) for the
    slice; returns everything as a JSON-able dict. `hbm_gib` replaces the chip's HBM;
    `hlo_dir` receives each compiled program's text (<stage>_train.hlo, <stage>_decode.hlo)."""
    tpu_flags = step_lib.libtpu_flags(config.train.rng_impl)
    chip, devices = topology(topology_spec, tpu_flags)
    mesh = sharding.make_mesh(config.mesh, devices)
    setup = build.make_setup(config, training=True, mesh=mesh, shapes_only=True)
    hbm = int(hbm_gib * GiB) if hbm_gib else chip.hbm_bytes
    source = setup.pretrained.source if setup.pretrained else "config.model (random init)"
    result = {"topology": topology_spec, "chip": dataclasses.asdict(chip), "hbm_bytes": hbm,
              "devices": len(devices), "mesh": _mesh_flags(mesh), "shapes_from": source,
              "batch": {"batch_size": config.train.batch_size,
                        "source_length": config.data.max_source_length,
                        "target_length": config.data.max_target_length,
                        "grad_accum_steps": config.train.grad_accum_steps},
              "dtype": config.model.dtype, "remat": config.model.remat,
              "rng_impl": config.train.rng_impl, "libtpu_flags": list(tpu_flags), "steps": []}
    log(_header(result, chip))
    for name in config.stages:
        report = train_report(setup, name, chip, hbm, hlo_dir)
        if not report["fits"]:
            report["fitting_change"] = fitting_change(config, mesh, report, hbm)
        result["steps"].append(report)
        log(_describe(report, hbm))
    if decode:
        for name in config.stages:
            report = decode_report(setup, name, hbm, hlo_dir)
            result["steps"].append(report)
            log(_describe(report, hbm))
    return result


def _header(result: dict, chip: flops.Chip) -> str:
    b = result["batch"]
    flags_ = f" (libtpu {' '.join(result['libtpu_flags'])})" if result["libtpu_flags"] else ""
    return (f"{result['topology']}: {result['devices']} x {chip.device_kind} "
            f"({result['hbm_bytes'] / GiB:.1f} GiB HBM, {chip.peak_bf16 / 1e12:.0f} TFLOP/s bf16, "
            f"HBM {chip.hbm_bandwidth / 1e9:.0f} GB/s, ICI {chip.ici_bandwidth / 1e9:.0f} GB/s)\n"
            f"mesh {result['mesh']}; batch {b['batch_size']} x {b['source_length']}/"
            f"{b['target_length']} tokens; {result['dtype']} compute, remat {result['remat']}, "
            f"dropout keys {result['rng_impl']}{flags_}\nmodel shapes from {result['shapes_from']}")


def _size(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB / 10 else f"{nbytes / 2**20:.1f} MiB"


def _describe(report: dict, hbm: int) -> str:
    """A few lines per compiled step; every time is a roofline lower bound."""
    m = report["memory"]
    lines = [f"{report['stage']} {report['kind']} (compiled in {report['compile_s']:.0f} s, "
             f"{report['compile_cpu_s']:.0f} CPU s)"]
    if "trainable_parameters" in report:
        lines[0] += (f": {report['parameters'] / 1e6:.1f}M parameters, "
                     f"{report['trainable_parameters'] / 1e6:.1f}M trained")
    parts = [f"{k.replace('_', ' ')} {_size(m[k])}" for k in
             ("parameters", "optimizer_state", "other_arguments", "temporaries") if k in m]
    lines.append(f"  memory/device  {', '.join(parts)} -> {_size(m['total'])} of {_size(hbm)} "
                 f"({'fits' if report['fits'] else 'DOES NOT FIT'})")
    if "note" in report:  # not compiled, or XLA stopped: over the real chip's HBM
        lines.append(f"  compiler       {report['note']}")
    else:
        comms = [f"{k} {c['count']} ({_size(c['bytes'])})"
                 for k, c in report["collectives"].items() if c["count"]]
        lines.append(f"  collectives    {', '.join(comms) or 'none'}")
    if "cost" in report:
        c, r = report["cost"], report["roofline"]
        loops = (f"; {c['loops']} loops, their later iterations added: "
                 f"+{(c['flops'] - c['compiler_flops']) / 1e12:.3g} TFLOP, "
                 f"+{(c['bytes_accessed'] - c['compiler_bytes_accessed']) / 1e9:.3g} GB"
                 if c["loops"] else "")
        count = ("no count for this trained/frozen split" if report["model_flops"] is None else
                 f"{report['model_flops'] / report['devices'] / 1e12:.4g} by mta_jax.flops")
        lines.append(f"  per device     {c['flops'] / 1e12:.4g} TFLOP ({c['needed_flops'] / 1e12:.4g} "
                     f"in the products the step needs, {count}); {c['hbm_bytes'] / 1e9:.4g} GB "
                     f"HBM traffic (est.) of {c['bytes_accessed'] / 1e9:.4g} GB the compiler "
                     f"counts in all memories{loops}")
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.0f}%"
        lines.append(f"  roofline       lower bounds: compute {1e3 * r['compute_s']:.3g} ms, "
                     f"HBM {1e3 * r['hbm_s']:.3g} ms, ICI {1e3 * r['ici_s']:.3g} ms -> step >= "
                     f"{1e3 * r['step_s']:.3g} ms ({r['bound']}-bound), MFU <= {mfu} "
                     f"(estimates, not measurements)")
    if report.get("fitting_change"):
        lines.append(f"  to fit         {report['fitting_change']}")
    return "\n".join(lines)


def main(argv) -> int:
    from absl import flags
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {argv[1:]}")
    # Compile only: never claim a local accelerator (a TPU VM may be training already).
    jax.config.update("jax_platforms", "cpu")
    cli.quiet_libraries()
    with cli.one_line_errors():
        result = compile_config(FLAGS.config, FLAGS.topology, decode=FLAGS.decode,
                                hbm_gib=FLAGS.hbm_gib, hlo_dir=FLAGS.hlo_dir)
        if FLAGS.out:
            storage.write_json(FLAGS.out, result, indent=1)
        check_fits(result)
    return 0


def run():
    from absl import app, flags
    from ml_collections import config_flags
    config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                    lock_config=True)
    flags.DEFINE_string("topology", None, "TPU slice: v5e:2x4, v5e:4x8, v4:2x2x1, v5p:2x2x2, ...")
    flags.DEFINE_string("out", None, "Also write everything as JSON here.")
    flags.DEFINE_bool("decode", True, "Also compile evaluation's decoder of each stage.")
    flags.DEFINE_float("hbm_gib", None, "HBM per chip to check against (default: the chip's).")
    flags.DEFINE_string("hlo_dir", None, "Also write each compiled program's HLO text here.")
    flags.mark_flags_as_required(["config", "topology"])
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
