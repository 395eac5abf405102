"""Sharded training on 8 host CPU devices gives the single-device losses; bad meshes fail early.

The work happens in `_multidevice_worker.py`, run once in a subprocess: the device count
must be set before JAX is imported, and this pytest process imported it with one device.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(__file__), "_multidevice_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    env = dict(os.environ)
    # Less XLA optimisation: compiles twice as fast on shared CPUs, same program on every mesh.
    env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("MTA_JAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES"):
        env.pop(var, None)
    ckpt_dir = tmp_path_factory.mktemp("multidevice") / "ckpt"
    proc = subprocess.run([sys.executable, WORKER, str(ckpt_dir)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    stderr = "\n".join(l for l in proc.stderr.splitlines() if "Involuntary full rematerialization" not in l)
    assert proc.returncode == 0, f"worker failed:\n{stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


MESHES = ("data8", "data4_tensor2", "fsdp2_data4")


def test_worker_saw_eight_devices(report):
    assert report["device_count"] == 8
    assert report["describe"]["single"] == "mesh data=1 x fsdp=1 x tensor=1 over 1 cpu device"
    assert report["describe"]["data4_tensor2"] == "mesh data=4 x fsdp=1 x tensor=2 over 8 cpu devices"


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_losses_match_single_device(report, mesh):
    single, sharded = report["losses"]["single"], report["losses"][mesh]
    assert len(single) == len(sharded) == 5
    assert single[-1] < single[0]  # it trains
    for step, (a, b) in enumerate(zip(single, sharded)):
        assert abs(a - b) <= 1e-5 * abs(a), f"{mesh} step {step}: {b} vs single-device {a}"


@pytest.mark.parametrize("mesh", ("single",) + MESHES)
def test_batch_split_over_data_and_fsdp(report, mesh):
    assert report["batch_spec"][mesh] == [["data", "fsdp"]]


def test_tensor_axis_splits_mlp_heads_vocab(report):
    lay = report["layouts"]["data4_tensor2"]
    for key in ("encoder/layers_0/ffn/mlp/wi", "mu:encoder/layers_0/ffn/mlp/wi"):
        assert "tensor" in lay[key]["spec"]
        assert lay[key]["shard_shape"] == [32, 32]  # [embed, mlp=64 / 2]
    assert lay["encoder/layers_1/ffn/mta/adapters/wi"]["shard_shape"] == [5, 32, 32]  # adapters whole
    assert lay["encoder/layers_0/self_attention/query"]["shard_shape"] == [32, 2, 8]  # heads 4 / 2
    assert lay["shared/embedding"]["shard_shape"] == [64, 32]  # vocab 128 / 2
    assert lay["count"] == {"spec": [], "shard_shape": []}  # Adam's count replicated


def test_fsdp_axis_splits_embed(report):
    lay = report["layouts"]["fsdp2_data4"]
    for key in ("encoder/layers_0/ffn/mlp/wi", "mu:encoder/layers_0/ffn/mlp/wi"):
        assert lay[key]["spec"][0] == "fsdp"
        assert lay[key]["shard_shape"] == [16, 64]  # embed 32 / 2
    assert lay["encoder/layers_1/ffn/mta/adapters/wi"]["shard_shape"] == [5, 16, 64]
    assert lay["shared/embedding"]["shard_shape"] == [128, 16]


def test_pure_data_parallel_replicates_params(report):
    lay = report["layouts"]["data8"]
    assert lay["encoder/layers_0/ffn/mlp/wi"]["shard_shape"] == [32, 64]
    assert lay["shared/embedding"]["shard_shape"] == [128, 32]


def test_jit_init_into_shardings_equals_unsharded_init(report):
    assert report["jit_init_matches_host"] is True


def test_bad_meshes_name_the_numbers(report):
    err = report["errors"]
    assert "data=3" in err["product"] and "product 3" in err["product"] and "devices 8" in err["product"]
    assert "only one axis may be -1" in err["two_free"] and "data, fsdp" in err["two_free"]
    assert "8 devices" in err["indivisible_free"] and "(3)" in err["indivisible_free"]


def test_indivisible_param_named_before_compiling(report):
    err = report["errors"]["param"]
    assert "parameter decoder/layers_0/encoder_decoder_attention/key has size 4 on dim 1" in err
    assert "mesh axis size 8 (mesh tensor=8)" in err


def test_batch_size_error(report):
    assert report["errors"]["batch"] == (
        "train.batch_size=6 is not divisible by the data-parallel size 4 (mesh data=2 x fsdp=2)")


def test_checkpoint_restores_across_meshes(report):
    ck = report["checkpoint"]
    assert ck["step"] == 5
    assert ck["all_equal"] is True  # saved under data=4 x tensor=2, restored bitwise
    assert ck["target_matches"] is True  # with the fsdp=2 x data=4 target's shardings
    assert ck["layouts"]["encoder/layers_0/ffn/mlp/wi"]["shard_shape"] == [16, 64]
    nxt = ck["next_loss"]  # training goes on under the new mesh with the same loss
    assert abs(nxt["restored_mesh"] - nxt["original_mesh"]) <= 1e-5 * abs(nxt["original_mesh"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two_processes(port):
    """Both workers on coordinator port `port`: [(returncode, stdout, stderr)] by process id."""
    worker = os.path.join(os.path.dirname(__file__), "_multiprocess_worker.py")
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("MTA_JAX_DISTRIBUTED", None)
        procs.append(subprocess.Popen([sys.executable, worker], env=env, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=180)
            results.append((p.returncode, out, err))
            if p.returncode and "Failed to start RPC server" in err:
                break  # the coordinator's port was taken meanwhile: process 1 would wait
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def test_two_processes_assemble_one_global_batch(tmp_path):
    """maybe_initialize_distributed from JAX_* variables; each process feeds its own half."""
    # A free port found here may be taken before process 0's coordinator binds it: then
    # that process fails at once with "Failed to start RPC server", and a new port is tried.
    for _ in range(3):
        results = _run_two_processes(_free_port())
        if not (results[0][0] and "Failed to start RPC server" in results[0][2]):
            break
    outs = []
    for returncode, out, err in results:
        assert returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    for pid, r in enumerate(outs):
        assert r["initialised"] is True and (r["process"], r["processes"]) == (pid, 2)
        assert r["describe"] == "mesh data=8 x fsdp=1 x tensor=1 over 8 cpu devices in 2 processes"
        assert r["global_shape"] == [8, 3]
        assert r["local_rows"] == list(range(4 * pid, 4 * pid + 4))
        assert r["row_sums"] == r["expected_row_sums"]
        assert r["batch_error"] == ("train.batch_size=3 is not divisible by the number of processes 2 "
                                    "(each host loads an equal slice)")
