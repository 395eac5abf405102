"""`mta_jax.compile`: the real train steps of a tiny model compiled for a TPU v5e 2x2 slice by
libtpu on the CPU host (no TPU needed), the HLO collective count, the offline shapes of the
published checkpoints, and the one-line error of a step that does not fit."""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from mta_jax import build, hlo, sharding
from mta_jax import step as step_lib
from mta_jax import compile as C
from mta_jax.errors import ConfigError, ShardingError
from tests.integration import tiny

pytest.importorskip("libtpu")  # the `test` extra installs it (jax[tpu])

ROOT = tiny.ROOT
TOPOLOGY = "v5e:2x2"
# Parameters outweigh activations (a 32768-token vocabulary on d_model 32, 16/8 tokens), so
# sharding them moves the per-device total; the batch of 4 splits over the 4 chips.
SHAPE = {"model.vocab_size": 32768, "train.batch_size": 4, "data.max_source_length": 16,
         "data.max_target_length": 8}


def _compile(decode=False, hbm_gib=None, hlo_dir=None, **changes):
    config = tiny.tiny_config(**{**SHAPE, **changes})
    return C.compile_config(config, TOPOLOGY, decode=decode, hbm_gib=hbm_gib, hlo_dir=hlo_dir,
                            log=lambda _: None)


def _step(result, stage, kind="train step"):
    return next(r for r in result["steps"] if r["stage"] == stage and r["kind"] == kind)


@pytest.fixture(scope="module")
def data_parallel():
    return _compile(decode=True)


@pytest.fixture(scope="module")
def fsdp_hlo(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hlo"))


@pytest.fixture(scope="module")
def fsdp(fsdp_hlo):
    return _compile(hlo_dir=fsdp_hlo, **{"mesh.data": 1, "mesh.fsdp": 4})


@pytest.mark.slow  # over 3 s on 2 cores
def test_both_stages_and_the_decoder_compile_for_the_slice(data_parallel):
    assert data_parallel["devices"] == 4 and data_parallel["mesh"] == "data=4 x fsdp=1 x tensor=1"
    assert data_parallel["chip"]["name"] == "v5e"
    assert [(r["stage"], r["kind"]) for r in data_parallel["steps"]] == [
        ("stage1", "train step"), ("stage2", "train step"), ("stage1", "decode"),
        ("stage2", "decode")]
    for report in data_parallel["steps"]:
        m = report["memory"]
        assert report["fits"] and m["total"] >= m["arguments"] >= m["parameters"] > 0
    for stage in ("stage1", "stage2"):
        r = _step(data_parallel, stage)
        assert r["cost"]["flops"] > 0 and r["cost"]["bytes_accessed"] > 0
        # Replicated parameters: each chip holds all of them (float32).
        assert r["memory"]["parameters"] == 4 * r["parameters"]
        # Data parallelism: the gradients are all-reduced, nothing else moves.
        comms = r["collectives"]
        assert comms["all-reduce"]["count"] >= 1 and comms["all-reduce"]["traffic"] > 0
        assert comms["all-gather"]["count"] == comms["reduce-scatter"]["count"] == 0
        roof = r["roofline"]
        assert roof["step_s"] == max(roof["compute_s"], roof["hbm_s"], roof["ici_s"]) > 0
        assert 0 < roof["mfu"] < 1
        # HBM traffic leaves out what stays in VMEM: less than all the bytes XLA counts.
        assert 0 < r["cost"]["hbm_bytes"] < r["cost"]["bytes_accessed"]


@pytest.mark.slow  # compiles for the TPU slice: over 3 s on 2 cores
def test_mfu_counts_the_products_each_stage_needs_on_any_mesh_with_or_without_remat(
        data_parallel, fsdp):
    # Every weight trained: the products of the compiled program, loops counted as they run,
    # are mta_jax.flops' count to the FLOP, a quarter of the batch's on each of the 4 chips.
    for result in (data_parallel, fsdp):
        r = _step(result, "stage1")
        assert r["cost"]["unknown_trip_counts"] == 0 and r["cost"]["remat_flops"] == 0
        assert r["cost"]["matmul_flops"] * 4 == r["cost"]["needed_flops"] * 4 == r["model_flops"]
    # Stage two freezes the backbone: no gradient for its weights, none below the MTA blocks.
    one, two = _step(data_parallel, "stage1"), _step(data_parallel, "stage2")
    assert two["cost"]["needed_flops"] < 0.75 * one["cost"]["needed_flops"]
    assert two["roofline"]["mfu"] == pytest.approx(
        two["cost"]["needed_flops"] / two["roofline"]["step_s"] / C.flops.TPU_CHIPS["v5e"].peak_bf16)
    # Gradient accumulation runs a micro-batch's products in a loop: twice the batch in two
    # micro-batches is twice the products. A micro-batch the mesh cannot split is refused
    # (each chip would compute rows that are not its own).
    accumulated = _step(_compile(stages=("stage1",), **{"train.grad_accum_steps": 2,
                                                         "train.batch_size": 8}), "stage1")
    assert accumulated["cost"]["unknown_trip_counts"] == 0
    assert accumulated["cost"]["needed_flops"] == 2 * one["cost"]["needed_flops"]
    with pytest.raises(ShardingError, match=r"a micro-batch \(train.batch_size=4 / "
                                            r"train.grad_accum_steps=2\)=2 is not divisible by "
                                            r"the data-parallel size 4"):
        _compile(stages=("stage1",), **{"train.grad_accum_steps": 2})
    # Remat recomputes forward products in the backward pass: more FLOPs, the same need.
    remat = _compile(**{"model.remat": True})
    for name, plain in (("stage1", one), ("stage2", two)):
        r = _step(remat, name)
        assert r["cost"]["matmul_flops"] > plain["cost"]["matmul_flops"]
        assert r["cost"]["needed_flops"] == plain["cost"]["needed_flops"]


@pytest.mark.slow  # compiles for the TPU slice: over 3 s on 2 cores
def test_stage_two_products_are_the_frozen_backbone_count_to_the_flop():
    # MTA in encoder block 0 and decoder block 1 of 2, top-2 gathered, a shared adapter and
    # the gate: no gradient below encoder block 0's adapters' inputs; the decoder's block 0
    # passes the keys' and values' gradients to the encoder but none to its own queries;
    # block 1 passes everything. (2 examples per chip: with one, XLA turns the gate's
    # vector-matrix products into reductions, which are not products.)
    changes = {"train.batch_size": 8, "model.num_layers": 2, "model.num_decoder_layers": 2,
               "mta.encoder_layers": "0", "mta.decoder_layers": "1", "mta.topk_compute": "gather"}
    r = _step(_compile(stages=("stage2",), **changes), "stage2")
    def stage(**more):
        config = tiny.tiny_config(**{**SHAPE, **changes, **more})
        mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
        return build.make_setup(config, shapes_only=True, mesh=mesh).stage("stage2")

    config = stage().model.config
    expected = C.flops.train_flops(config, 8, 16, 8, frozen_backbone=True)
    # Another split of trained and frozen weights has no analytic count: the program's stands.
    assert C.analytic_train_flops(stage(**{"stage2.trainable": "mta|layer_norm"}), 8, 16, 8) \
        is None
    assert r["cost"]["unknown_trip_counts"] == 0
    assert r["cost"]["needed_flops"] * 4 == r["model_flops"] == expected
    assert expected < 0.7 * C.flops.train_flops(config, 8, 16, 8)  # the LM head keeps 2/3
    assert r["roofline"]["mfu"] == pytest.approx(
        expected / 4 / r["roofline"]["step_s"] / C.flops.TPU_CHIPS["v5e"].peak_bf16)


@pytest.mark.slow  # compiles for the TPU slice: over 3 s on 2 cores
def test_stage_two_keeps_optimizer_state_for_its_trainable_leaves_only(data_parallel):
    one, two = _step(data_parallel, "stage1"), _step(data_parallel, "stage2")
    assert two["trainable_parameters"] < two["parameters"]
    # Adam: two float32 moments per trained parameter (+ step counters), none for frozen ones.
    for r in (one, two):
        assert r["memory"]["optimizer_state"] == pytest.approx(8 * r["trainable_parameters"],
                                                               abs=64)
    assert two["cost"]["flops"] < one["cost"]["flops"]  # no frozen weight gradients


@pytest.mark.slow  # over 3 s on 2 cores
def test_fsdp_divides_parameter_and_optimizer_bytes_by_its_size(data_parallel, fsdp):
    assert fsdp["mesh"] == "data=1 x fsdp=4 x tensor=1"
    for stage in ("stage1", "stage2"):
        dp, split = _step(data_parallel, stage)["memory"], _step(fsdp, stage)["memory"]
        assert split["parameters"] == pytest.approx(dp["parameters"] / 4, rel=0.1)
        assert split["optimizer_state"] == pytest.approx(dp["optimizer_state"] / 4, rel=0.1)
        # The sharded parameters are gathered for the forward pass, and the gradients
        # reduce-scattered back to their shards.
        comms = _step(fsdp, stage)["collectives"]
        assert comms["all-gather"]["count"] > 0


def _collectives_of(hlo_path: str) -> list[tuple[str, list[int], str]]:
    """(kind, result dims, op_name) of each collective in a compiled module's text; op_name
    with HLO's escaping undone. jax 0.10 names a parameter's collective by the module path
    ("mta._task_adapters/..."), jax 0.12 by the parameter ("params['...']['mta']['adapters']...")."""
    found = []
    with open(hlo_path) as f:
        module = hlo.Module(f.read())
    for computation in module.computations:
        for name, _, opcode, rest in module.instructions(computation):
            kind = opcode.removesuffix("-start")
            if kind in C.COLLECTIVES:
                op = re.search(r'op_name="([^"]*)"', rest)
                found.append((kind, module.dims(name),
                              op.group(1).replace("\\'", "'") if op else ""))
    return found


@pytest.mark.slow  # compiles for the TPU slice: over 3 s on 2 cores
def test_fsdp_keeps_mta_adapter_activations_split_along_the_batch(fsdp, fsdp_hlo):
    """Under fsdp the collectives of MTA's task adapters gather their weights [E, d, f]; XLA
    had gathered and all-reduced the adapters' activations [E, b, l, f] across the batch."""
    num_tasks = 5
    for stage in ("stage1", "stage2"):
        comms = _collectives_of(os.path.join(fsdp_hlo, f"{stage}_train.hlo"))
        adapters = [(kind, dims) for kind, dims, op in comms
                    if "mta._task_adapters" in op or "['mta']['adapters']" in op]
        assert adapters and all(kind == "all-gather" and len(dims) == 3 and
                                dims[0] == num_tasks for kind, dims in adapters), adapters
        # By shape, whatever the names: no collective carries a stack of activations.
        stacked = [(kind, dims, op) for kind, dims, op in comms
                   if len(dims) >= 4 and dims[0] == num_tasks]
        assert not stacked, stacked


def _between(data_parallel, fsdp) -> float:
    """An HBM (GiB) that stage one's step fits under fsdp but not with replicated parameters,
    though they and their optimizer state alone would fit (so the step is compiled)."""
    dp = _step(data_parallel, "stage1")["memory"]
    hbm = 1.02 * max(_step(fsdp, "stage1")["memory"]["total"],
                     dp["parameters"] + dp["optimizer_state"])
    assert hbm < dp["total"]
    return hbm / C.GiB


@pytest.mark.slow  # over 3 s on 2 cores
def test_a_step_that_does_not_fit_names_stage_bytes_hbm_and_a_fsdp_mesh_that_fits(
        data_parallel, fsdp):
    hbm_gib = _between(data_parallel, fsdp)
    result = _compile(hbm_gib=hbm_gib, stages=("stage1",))
    report = _step(result, "stage1")
    assert not report["fits"] and "note" not in report  # compiled, then found too large
    with pytest.raises(ShardingError) as e:
        C.check_fits(result)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"stage1 train step needs {report['memory']['total'] / C.GiB:.2f} "
                              "GiB per device")
    assert f"has {hbm_gib:.2f} GiB of HBM" in message
    assert "try --config.mesh.data=1 --config.mesh.fsdp=-1 (estimated" in message
    # The suggestion, compiled (the `fsdp` fixture is that mesh), fits the same HBM.
    assert _step(fsdp, "stage1")["memory"]["total"] <= hbm_gib * C.GiB


@pytest.mark.slow  # compiles for the TPU slice: over 3 s on 2 cores
def test_parameters_and_optimizer_state_over_the_hbm_skip_the_compile(data_parallel):
    dp = _step(data_parallel, "stage1")["memory"]
    hbm_gib = 0.9 * (dp["parameters"] + dp["optimizer_state"]) / C.GiB
    result = _compile(hbm_gib=hbm_gib, stages=("stage1",))
    report = _step(result, "stage1")
    assert report["note"].startswith("not compiled") and report["compile_cpu_s"] < 5
    with pytest.raises(ShardingError, match="stage1 train step needs .* try --config.mesh.data=1"):
        C.check_fits(result)


def test_collectives_are_read_from_hlo_text():
    hlo = "\n".join([
        "  %all-reduce.1 = f32[512,64]{0,1:T(8,128)} all-reduce(%f), channel_id=2, "
        "replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, to_apply=%add",
        # the same collective again, inside another fused computation: counted once
        "  %all-reduce.9 = f32[512,64]{0,1} all-reduce(%g), channel_id=2, "
        "replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, to_apply=%add",
        "  %ag = (bf16[8,16]{1,0}, bf16[32,16]{1,0}) all-gather-start(%p), replica_groups=[2,4]<=[8]",
        "  %all-gather-done = bf16[32,16]{1,0} all-gather-done(%ag)",
        "  %rs = f32[4]{0} reduce-scatter(%g), replica_groups={{0,1},{2,3},{4,5},{6,7}}",
        "  ROOT %t = (f32[], s32[2]) all-reduce(%a, %b), replica_groups={}",
    ])
    out = C.collectives(hlo, num_devices=8)
    ar, ag, rs = out["all-reduce"], out["all-gather"], out["reduce-scatter"]
    assert ar["count"] == 2 and ar["bytes"] == 512 * 64 * 4 + 4 + 8
    assert ar["traffic"] == 2 * 3 / 4 * 512 * 64 * 4 + 2 * 7 / 8 * 12  # groups of 4, then all 8
    assert ag["count"] == 1 and ag["bytes"] == 32 * 16 * 2 and ag["traffic"] == 3 / 4 * 1024
    assert rs["count"] == 1 and rs["bytes"] == 16 and rs["traffic"] == 16
    assert out["all-to-all"]["count"] == out["collective-permute"]["count"] == 0


def test_an_unknown_topology_is_one_line():
    with pytest.raises(ShardingError, match=r"--topology='v9:2x2' must be <chip>:<AxB> or "
                                            r"<chip>:<AxBxC> with chip one of v4, v5e, v5p, v6e"):
        C.topology("v9:2x2")


@pytest.mark.parametrize("name, count", [("t5-small", 60_506_624),
                                         ("google/flan-t5-small", 76_961_152),
                                         ("google/flan-t5-xl", 2_849_757_184)])
@pytest.mark.slow  # over 3 s on 2 cores
def test_published_shapes_build_offline_with_the_hub_parameter_counts(name, count):
    config = tiny.tiny_config(init_from=name, variant="dense", stages=("stage1",))
    config.mta.enabled = False
    setup = build.make_setup(config, mesh=sharding.make_mesh(config.mesh, jax.devices()[:1]),
                             shapes_only=True)
    assert setup.tokenizer is None and name in setup.pretrained.source
    params = setup.stage("stage1").abstract_params
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == count


@pytest.mark.slow  # over 3 s on 2 cores
def test_a_local_folder_gives_its_config_json(tmp_path):
    from tests.helpers import make_hf_t5
    make_hf_t5(str(tmp_path), shape="v1_1_old")
    os.remove(tmp_path / "model.safetensors")  # the shapes need no weights
    shapes = build.ShapesOnly(str(tmp_path))
    assert shapes.source == str(tmp_path / "config.json")
    config = shapes.model_config()
    assert config.num_decoder_layers == 1 and config.is_gated and not config.tie_word_embeddings


def test_unknown_names_and_rng_impls_are_config_errors():
    with pytest.raises(ConfigError, match="config.init_from='t5-tiny' is neither a local folder"):
        build.ShapesOnly("t5-tiny")
    with pytest.raises(ConfigError, match="config.train.rng_impl must be one of threefry2x32, "
                                          "rbg, unsafe_rbg; got 'philox'"):
        build.validate_config(tiny.tiny_config(**{"train.rng_impl": "philox"}))


@pytest.mark.slow
def test_cli_exits_1_with_one_error_line_and_writes_the_json(tmp_path, data_parallel, fsdp):
    hbm_gib = _between(data_parallel, fsdp)
    out = tmp_path / "compile.json"
    args = [sys.executable, "-m", "mta_jax.compile", "--config=configs/demo.py",
            f"--topology={TOPOLOGY}", "--nodecode", f"--hbm_gib={hbm_gib}", f"--out={out}",
            "--config.stages=('stage1',)"]
    args += [f"--config.{k}={v}" for k, v in {**tiny.OVERRIDES, **SHAPE}.items()]
    proc = subprocess.run(args, cwd=ROOT, env=tiny.env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stage1 train step needs" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "stage1 train step" in proc.stdout and "DOES NOT FIT" in proc.stdout
    result = json.loads(out.read_text())
    assert result["steps"][0]["fits"] is False and result["hbm_bytes"] < result["chip"]["hbm_bytes"]


def test_xla_refusing_a_program_over_the_hbm_gives_the_bytes_it_needs():
    oom = C._xla_out_of_memory
    assert oom("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
               "temporaries (18.37G) exceeds available HBM (15.75G).", 10) == int(18.37 * 2**30) + 10
    assert oom("Ran out of memory in memory space hbm. Used 18.93G of 15.75G hbm.", 10) == \
        int(18.93 * 2**30)
    assert oom("INTERNAL: something else", 10) is None


def test_libtpu_gets_a_deeper_fiber_stack_and_keeps_the_users_arguments(monkeypatch):
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_user_flag=1")
    with C._libtpu_environment():
        assert os.environ["LIBTPU_INIT_ARGS"] == f"--xla_tpu_user_flag=1 {C.FIBER_STACK_FLAG}"
    assert os.environ["LIBTPU_INIT_ARGS"] == "--xla_tpu_user_flag=1"
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--fibers_default_thread_stack_size=1048576")
    with C._libtpu_environment():  # the user's own size wins
        assert os.environ["LIBTPU_INIT_ARGS"] == "--fibers_default_thread_stack_size=1048576"
    monkeypatch.delenv("LIBTPU_INIT_ARGS")
    with C._libtpu_environment():
        assert os.environ["LIBTPU_INIT_ARGS"] == C.FIBER_STACK_FLAG
    assert "LIBTPU_INIT_ARGS" not in os.environ


@pytest.mark.slow  # the real T5-small step: about 75 s on 2 cores
def test_t5_small_stage_two_under_fsdp_with_dropout_compiles(tmp_path):
    """libtpu's default fiber stack overflowed on this step (SIGSEGV in the cost model of a
    fused convolution); FIBER_STACK_FLAG makes it compile. In a subprocess: a crash fails
    the test instead of ending pytest."""
    out = tmp_path / "compile.json"
    args = [sys.executable, "-m", "mta_jax.compile", "--config=configs/t5_small.py",
            "--topology=v5e:2x4", "--nodecode", f"--out={out}", "--config.stages=('stage2',)",
            "--config.train.batch_size=64", "--config.mesh.data=1", "--config.mesh.fsdp=-1"]
    env = {k: v for k, v in tiny.env().items() if k != "LIBTPU_INIT_ARGS"}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    result = json.loads(out.read_text())
    (step,) = result["steps"]
    assert result["mesh"] == "data=1 x fsdp=8 x tensor=1" and step["fits"]
    assert step["model_flops"] > 0 and step["cost"]["flops"] > 0
    # Each of the 8 chips holds an eighth of the parameters (float32), within 10%.
    assert step["memory"]["parameters"] == pytest.approx(4 * step["parameters"] / 8, rel=0.1)


def test_rbg_keys_get_the_spmd_flag():
    assert step_lib.libtpu_flags("rbg") == (step_lib.RBG_SPMD_FLAG,)
    assert step_lib.libtpu_flags("unsafe_rbg") == (step_lib.RBG_SPMD_FLAG,)
    assert step_lib.libtpu_flags("threefry2x32") == ()


def _rng_bit_generator_shapes(hlo_path) -> list[list[int]]:
    """The bits each rng-bit-generator draws (its result, or the bits beside the new state)."""
    shapes = []
    with open(hlo_path) as f:
        for line in f:
            if " rng-bit-generator(" in line:
                result = line.split(" rng-bit-generator(")[0].split("=", 1)[1]
                dims = [d for t, d, _ in hlo._ARRAY.findall(result) if t != "u64"]
                shapes.append([int(x) for x in dims[-1].split(",") if x])
    return shapes


@pytest.mark.slow  # compiles in a fresh process (libtpu reads its flags once): ~20 s each
@pytest.mark.parametrize("remat", [False, True])
def test_rbg_dropout_masks_are_drawn_for_the_chips_share_of_the_batch_only(tmp_path, remat):
    """With rbg keys XLA had drawn each dropout mask for the whole batch on every chip and
    kept a slice; step.libtpu_flags makes the partitioner split the draw (data=4, batch 4:
    one example a chip). With remat the backward pass draws the masks again: split alike.
    In a subprocess, as training runs: libtpu reads its flags once."""
    hlo_dir = tmp_path / "hlo"
    args = [sys.executable, "-m", "mta_jax.compile", "--config=configs/demo.py",
            f"--topology={TOPOLOGY}", "--nodecode", f"--hlo_dir={hlo_dir}",
            "--config.stages=('stage1',)", "--config.train.rng_impl=rbg",
            f"--config.model.remat={remat}"]
    args += [f"--config.{k}={v}" for k, v in {**tiny.OVERRIDES, **SHAPE}.items()]
    proc = subprocess.run(args, cwd=ROOT, env=tiny.env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert step_lib.RBG_SPMD_FLAG in proc.stdout  # the header names the flag
    shapes = _rng_bit_generator_shapes(hlo_dir / "stage1_train.hlo")
    # Masks of [batch, ...] activations: attention [b, heads, q, k], FFN [b, l, f], and the
    # MTA adapters' [E, b, l, f]; each drawn for 1 example, never for the batch of 4.
    batch_dim = lambda s: s[1] if s[0] == 5 else s[0]  # 5 tasks: [E, b, ...]
    assert shapes and all(batch_dim(s) == 1 for s in shapes), shapes


def _first_in_schedule(hlo_path, opcode: str, op_name: str) -> dict[int, int]:
    """{encoder block: position in the entry computation's schedule of its first `opcode`
    instruction (any, for "") whose op_name holds `encoder/layers_<block>/<op_name>`}."""
    module = hlo.Module(open(hlo_path).read())
    first = {}
    for i, (_, _, op, rest) in enumerate(module.instructions(module.entry)):
        block = re.search(r'op_name="[^"]*encoder/layers_(\d+)/' + op_name, rest)
        if block and op_name and (op == opcode or not opcode):
            first.setdefault(int(block.group(1)), i)
    return first


@pytest.mark.slow  # compiles in a fresh process (libtpu reads its flags once): ~40 s
def test_under_tensor_parallelism_each_blocks_dropout_masks_wait_for_the_block(tmp_path):
    """Under fsdp x tensor XLA drew every block's masks at the start of the step (T5-base's
    stage two: 3.01 GiB of temporaries on a v5e-8 against 1.29 with the tie). With
    T5Config.tie_dropout_masks, which build sets from the mesh, block i's attention mask is
    drawn after block i-1's FFN has begun. Three encoder blocks, MTA in the last; rbg keys,
    whose masks are single rng-bit-generator instructions."""
    hlo_dir = tmp_path / "hlo"
    args = [sys.executable, "-m", "mta_jax.compile", "--config=configs/demo.py",
            f"--topology={TOPOLOGY}", "--nodecode", f"--hlo_dir={hlo_dir}",
            "--config.stages=('stage2',)", "--config.train.rng_impl=rbg"]
    changes = {**tiny.OVERRIDES, **SHAPE, "model.num_layers": 3, "model.num_decoder_layers": 3,
               "mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2}
    args += [f"--config.{k}={v}" for k, v in changes.items()]
    proc = subprocess.run(args, cwd=ROOT, env=tiny.env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data=1 x fsdp=2 x tensor=2" in proc.stdout
    path = hlo_dir / "stage2_train.hlo"
    masks = _first_in_schedule(path, "rng-bit-generator", "self_attention/Dropout")
    ffn_begins = _first_in_schedule(path, "", "pre_mlp_layer_norm")
    assert sorted(masks) == sorted(ffn_begins) == [0, 1, 2]
    assert all(masks[i] > ffn_begins[i - 1] for i in (1, 2)), (masks, ffn_begins)

    # build ties them under tensor parallelism only (under data and fsdp XLA drew each mask
    # where it was used already, and the tie cost HBM traffic: benchmarks/README.md).
    def tied(**mesh):
        config = tiny.tiny_config(**{**SHAPE, **{f"mesh.{k}": v for k, v in mesh.items()}})
        devices = C.topology(TOPOLOGY)[1]
        setup = build.make_setup(config, shapes_only=True,
                                 mesh=sharding.make_mesh(config.mesh, devices))
        return setup.stage("stage2").model.config.tie_dropout_masks

    assert tied(data=1, fsdp=2, tensor=2) and not tied(data=1, fsdp=4, tensor=1)
