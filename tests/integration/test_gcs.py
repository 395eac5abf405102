"""Runs whose workdir, data and checkpoints live in a gs:// bucket, against a GCS server on
127.0.0.1 (tests/gcs_emulator.py). The code under test only sees the emulator's environment
variables, as a user of one would set them; every run is `python -m mta_jax.main` (or predict,
compare) on the shrunk demo config (tests/integration/tiny.py)."""
import gc
import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath

from mta_jax import checkpoint as ckpt_lib
from mta_jax import hf, storage
from tests.gcs_emulator import GcsEmulator, free_port
from tests.helpers import make_hf_t5
from tests.integration import tiny

pytestmark = pytest.mark.slow

STEPS = {"stage1": 12, "stage2": 6}


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator, and its variables set in this process too (the tests read the bucket)."""
    log = tmp_path_factory.mktemp("gcs") / "emulator.log"
    with GcsEmulator(log_path=str(log)) as emulator, pytest.MonkeyPatch.context() as mp:
        for key, value in emulator.env.items():
            mp.setenv(key, value)
        yield emulator


def _url(gcs, name: str) -> str:
    return f"gs://{gcs.bucket}/{name}"


def _env(gcs, **extra) -> dict:
    # Unoptimised XLA code compiles in half the time; every run here uses the same flags.
    return {**tiny.env(), **gcs.env, **extra}


def _main(gcs, workdir: str, **changes) -> subprocess.CompletedProcess:
    return subprocess.run(tiny.cli_args(workdir, **changes), cwd=tiny.ROOT, env=_env(gcs),
                          capture_output=True, text=True, timeout=900)


def _path(url: str) -> epath.Path:
    return epath.Path(url)


def _rows(url: str) -> list[dict]:
    return [json.loads(line) for line in _path(url).read_text().splitlines() if line.strip()]


def _losses(stage_url: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(f"{stage_url}/metrics.jsonl") if "loss" in r}


def _scalars(event_bytes: bytes) -> dict[str, list[tuple[int, float]]]:
    """The scalars of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2
    out, pos = {}, 0
    while pos < len(event_bytes):
        (length,) = struct.unpack("<Q", event_bytes[pos:pos + 8])
        event = event_pb2.Event.FromString(event_bytes[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def _write_and_die(url: str, data: bytes) -> None:
    try:
        with storage.open_atomic(url) as f:
            f.write(data)
            raise RuntimeError("killed")
    except RuntimeError:
        pass
    gc.collect()  # an abandoned fsspec file uploads what it holds when it is collected


def test_an_interrupted_write_leaves_the_object_as_it_was(gcs):
    url = _url(gcs, "atomic/state.json")
    storage.write_json(url, {"step": 1})
    _write_and_die(url, b'{"step": 2, "half": ')
    assert storage.read_json(url) == {"step": 1}
    _write_and_die(_url(gcs, "atomic/new.json"), b"{}")
    assert not _path(_url(gcs, "atomic/new.json")).exists()


def test_metric_rows_in_the_bucket_outlive_a_crash_up_to_the_last_flush(gcs):
    """No append on GCS: rows are rewritten as one object per flush (before each checkpoint)."""
    stage = _url(gcs, "metrics/stage1")
    # A process that dies without any clean-up (os._exit) after flushing steps 2 and 4, then
    # one that resumes from a checkpoint of step 2 and logs step 4 again.
    crashed = ("w = MetricWriter(stage, flush_secs=3600)\n"
               "w.write(2, {'loss': 2.0}); w.write(4, {'loss': 1.0})\n"
               "print((epath.Path(stage) / 'metrics.jsonl').exists(), flush=True)\n"
               "w.flush(); w.write(6, {'loss': 0.5}); os._exit(0)\n")
    resumed = ("w = MetricWriter(stage, flush_secs=3600)\n"
               "w.truncate_after(2); w.write(4, {'loss': 1.5}); w.close()\n")
    rows, printed = [], []
    for code in (crashed, resumed):
        result = subprocess.run(
            [sys.executable, "-c", "import os, sys\nfrom etils import epath\n"
             "from mta_jax.train_log import MetricWriter\nstage = sys.argv[1]\n" + code, stage],
            cwd=tiny.ROOT, env=_env(gcs), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        printed.append(result.stdout.strip())
        rows.append([(r["step"], r["loss"]) for r in _rows(f"{stage}/metrics.jsonl")])
    assert printed[0] == "False"  # rows wait in memory for the next flush
    assert rows == [[(2, 2.0), (4, 1.0)], [(2, 2.0), (4, 1.5)]]


def test_a_missing_bucket_is_one_error_line(gcs):
    result = _main(gcs, "gs://no-such-bucket/run")
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: gs://no-such-bucket does not exist, or these credentials cannot "
                      "read it (writing gs://no-such-bucket/run)"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def bucket_run(gcs):
    """One uninterrupted two-stage run into gs://<bucket>/run."""
    workdir = _url(gcs, "run")
    t0 = time.perf_counter()
    result = _main(gcs, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"two-stage run into the bucket: {time.perf_counter() - t0:.0f} s")
    return workdir


def test_both_stages_write_every_file_into_the_bucket(bucket_run):
    assert not os.path.exists(os.path.join(tiny.ROOT, "gs:")), "wrote a local ./gs: folder"
    config = json.loads(_path(f"{bucket_run}/config.json").read_text())
    assert config["stage1"]["num_train_steps"] == 12
    summary = json.loads(_path(f"{bucket_run}/summary.json").read_text())
    assert set(summary) == {"stage1", "stage2"} and summary["stage2"]["frozen_params"] > 0
    for stage, steps in STEPS.items():
        d = f"{bucket_run}/{stage}"
        assert sorted(_losses(d)) == list(range(2, steps + 1, 2))
        evals = [r for r in _rows(f"{d}/metrics.jsonl") if "eval/score" in r]
        assert [r["step"] for r in evals] == list(range(6, steps + 1, 6))
        preds = _rows(f"{d}/predictions_{steps}.jsonl")
        assert len(preds) == 12 and all({"input", "target", "prediction", "type"} <= set(p)
                                        for p in preds)
        for png in (f"routing_{steps}.png", "loss.png"):
            assert _path(f"{d}/{png}").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        events = [p for p in _path(d).iterdir() if p.name.startswith("events.out.tfevents")]
        assert len(events) == 1
        logged = dict(_scalars(events[0].read_bytes())["loss"])
        assert logged == pytest.approx(_losses(d), rel=1e-6)
        with ckpt_lib.Checkpointer(f"{d}/checkpoints") as ck:
            assert steps in ck.all_steps()


def _wait_for_checkpoint(stage_url: str, proc, timeout: float = 600) -> None:
    """Until a step is committed: on GCS, Orbax writes a step's folder in place and marks it
    complete with commit_success.txt (no atomic rename)."""
    checkpoints = _path(f"{stage_url}/checkpoints")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if checkpoints.is_dir() and any((p / "commit_success.txt").exists()
                                        for p in checkpoints.iterdir() if p.name.isdigit()):
            return
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.5)
    raise AssertionError("no checkpoint appeared in the bucket")


def test_sigkill_then_restart_from_the_bucket_ends_with_the_uninterrupted_losses(gcs, bucket_run):
    workdir = _url(gcs, "killed")
    proc = subprocess.Popen(tiny.cli_args(workdir), cwd=tiny.ROOT, env=_env(gcs),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(f"{workdir}/stage1", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _main(gcs, workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage1: resumed from step" in resumed.stderr
    for stage in STEPS:
        ours, ref = _losses(f"{workdir}/{stage}"), _losses(f"{bucket_run}/{stage}")
        assert sorted(ours) == sorted(ref)  # no duplicated or missing rows
        np.testing.assert_allclose([ours[s] for s in sorted(ours)], [ref[s] for s in sorted(ref)],
                                   rtol=1e-6)


def test_predict_reads_the_bucket_and_writes_its_predictions_there(gcs, bucket_run):
    training = _rows(f"{bucket_run}/stage1/predictions_12.jsonl")
    inputs, output = _url(gcs, "predict/in.jsonl"), _url(gcs, "predict/out.jsonl")
    _path(inputs).write_text("".join(json.dumps({k: r[k] for k in ("input", "target", "type")})
                                     + "\n" for r in training))
    result = subprocess.run(
        [sys.executable, "-m", "mta_jax.predict", f"--workdir={bucket_run}", "--stage=stage1",
         "--step=12", f"--input={inputs}", f"--output={output}"],
        cwd=tiny.ROOT, env=_env(gcs), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {output}" in result.stdout
    assert [r["prediction"] for r in _rows(output)] == [r["prediction"] for r in training]


def _upload_folder(local, url: str) -> None:
    for name in os.listdir(local):
        _path(f"{url}/{name}").write_bytes((local / name).read_bytes())


def test_init_from_a_hugging_face_folder_and_data_files_in_the_bucket(gcs, tmp_path):
    """Weights (read tensor by tensor), tokenizer and JSON-lines data all come from gs://."""
    import transformers
    local = tmp_path / "hf"
    make_hf_t5(local, "v1_0", vocab_size=384)  # ByT5's 384 ids
    transformers.ByT5Tokenizer().save_pretrained(local)
    folder = _url(gcs, "hf")
    _upload_folder(local, folder)
    fixture = os.path.join(tiny.ROOT, "tests", "fixtures", "alter_small.jsonl")
    data = _url(gcs, "data/alter_small.jsonl")
    _path(data).write_bytes(open(fixture, "rb").read())

    tensors, origin = hf.read_weights(folder)
    expected, _ = hf.read_weights(str(local))
    assert all(isinstance(t, hf.RemoteTensor) for t in tensors.values())  # nothing read yet
    assert origin["shared.weight"] == f"{folder}/model.safetensors"
    for name, array in expected.items():
        np.testing.assert_array_equal(np.asarray(tensors[name]), array, err_msg=name)

    workdir = _url(gcs, "from_hf")
    # A learning rate of 1e-9: after two Adam steps the weights are still the folder's.
    result = _main(gcs, workdir, **{
        "init_from": folder, "data.tokenizer": "", "data.source": "jsonl",
        "data.train_path": data, "data.eval_path": data, "stages": "('stage1',)",
        "stage1.num_train_steps": 2, "stage1.learning_rate": 1e-9, "eval_every_steps": 2})
    assert result.returncode == 0, result.stderr[-3000:]
    _, params = ckpt_lib.restore_params_from(f"{workdir}/stage1/checkpoints")
    np.testing.assert_allclose(np.asarray(params["shared"]["embedding"]),
                               expected["shared.weight"], atol=1e-7)
    with open(fixture) as f:
        inputs = {json.loads(line)["input"] for line in f}
    predicted = _rows(f"{workdir}/stage1/predictions_2.jsonl")
    assert predicted and {p["input"] for p in predicted} <= inputs


def test_two_processes_train_into_one_bucket_workdir(gcs, tmp_path):
    """Two hosts (processes of 2 CPU devices each) write one gs:// workdir: the first process the
    shared files, both their part of each checkpoint; the losses are one process's.

    Without dropout: each host loads every second example of a global batch, so the batch's
    rows come in another order than on one host, and dropout masks would fall on other rows."""
    workdir, port = _url(gcs, "two_hosts"), free_port()
    changes = {"stages": "('stage1',)", "stage1.num_train_steps": 4, "eval_every_steps": 4,
               "model.dropout_rate": 0.0}
    one_host = str(tmp_path / "one_host")
    result = subprocess.run(tiny.cli_args(one_host, **changes), cwd=tiny.ROOT, env=_env(gcs),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    procs = []
    for pid in range(2):
        env = _env(gcs, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid), XLA_FLAGS="--xla_force_host_platform_device_count=2 " + tiny.FAST_XLA_FLAGS)
        env.pop("MTA_JAX_DISTRIBUTED", None)
        procs.append(subprocess.Popen(tiny.cli_args(workdir, **changes), cwd=tiny.ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        for p in procs:
            _, err = p.communicate(timeout=900)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    ours, single = _losses(f"{workdir}/stage1"), _losses(f"{one_host}/stage1")
    assert sorted(ours) == [2, 4]
    np.testing.assert_allclose([ours[2], ours[4]], [single[2], single[4]], rtol=1e-5)
    assert len(_rows(f"{workdir}/stage1/predictions_4.jsonl")) == 12
    params = _path(f"{workdir}/stage1/checkpoints/4/params")
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= {p.name for p in params.iterdir()}


def test_compare_writes_its_study_into_the_bucket(gcs):
    out = _url(gcs, "study")
    overrides = {**tiny.OVERRIDES, "eval_every_steps": 100, "checkpoint_every_steps": 100}
    result = subprocess.run(
        [sys.executable, "-m", "mta_jax.experiments.compare", "--config=configs/demo.py",
         f"--out={out}", "--seeds=1", "--variants=mta_stage1", "--steps=2",
         "--compilation_cache=none", *(f"--config.{k}={v}" for k, v in overrides.items())],
        cwd=tiny.ROOT, env=_env(gcs), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = _path(f"{out}/report.md").read_text()
    assert "| mta_stage1 |" in report
    assert "![routing_mta_stage1_seed0_stage1.png](routing_mta_stage1_seed0_stage1.png)" in report
    for png in ("loss_curves.png", "routing_mta_stage1_seed0_stage1.png"):
        assert _path(f"{out}/{png}").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads(_path(f"{out}/results.json").read_text())
    assert results["variants"]["mta_stage1"]["steps"] == {"stage1": 2}
