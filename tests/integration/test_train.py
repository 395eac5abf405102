"""The training driver end to end: files, freezing, TensorBoard, resume after SIGKILL and
SIGTERM, the NaN guard, relaunching a workdir. Every run is `python -m mta_jax.main` on a
shrunk demo config (tests/integration/tiny.py), dropout on."""
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import flax
import jax
import numpy as np
import pytest

from mta_jax import checkpoint as ckpt_lib
from tests.helpers import assert_trees_close
from tests.integration import tiny

pytestmark = pytest.mark.slow


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _losses(stage_dir):
    """[(step, loss)] in file order: a duplicated or missing row shows."""
    return [(r["step"], r["loss"]) for r in _rows(os.path.join(stage_dir, "metrics.jsonl"))
            if "loss" in r]


def _evals(stage_dir):
    """[(step, {eval/...: score})] in file order."""
    return [(r["step"], {k: v for k, v in r.items() if k.startswith("eval/")})
            for r in _rows(os.path.join(stage_dir, "metrics.jsonl")) if "eval/score" in r]


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_same_run(ours, reference, resumed=None):
    """Two workdirs trained the same: the final parameters of each stage, every loss and
    eval row, the final predictions. resumed=(stage, step): the run restarted there, so the
    loss row whose window straddles that step averages fewer steps and is left out."""
    for stage, steps in (("stage1", 12), ("stage2", 6)):
        mine, ref = os.path.join(ours, stage), os.path.join(reference, stage)
        a, b = _losses(mine), _losses(ref)
        assert [s for s, _ in a] == [s for s, _ in b] == list(range(2, steps + 1, 2))
        keep = [i for i, (s, _) in enumerate(b)
                if not (resumed and resumed[0] == stage and s - 2 < resumed[1] < s)]
        np.testing.assert_allclose([a[i][1] for i in keep], [b[i][1] for i in keep], rtol=1e-6)
        assert [s for s, _ in _evals(mine)] == [s for s, _ in _evals(ref)]
        for (_, x), (_, y) in zip(_evals(mine), _evals(ref)):
            assert x.keys() == y.keys()
            np.testing.assert_allclose([x[k] for k in sorted(x)], [y[k] for k in sorted(y)],
                                       rtol=1e-6)
        name = f"predictions_{steps}.jsonl"
        assert _rows(os.path.join(mine, name)) == _rows(os.path.join(ref, name))
        final = [ckpt_lib.restore_params_from(os.path.join(d, "checkpoints"), steps)[1]
                 for d in (mine, ref)]
        assert_trees_close(*final, rtol=1e-5, atol=1e-7)


def test_both_stages_write_their_files_and_loss_falls(reference):
    assert os.path.exists(os.path.join(reference, "config.json"))
    for stage, steps in (("stage1", 12), ("stage2", 6)):
        d = os.path.join(reference, stage)
        losses = _losses(d)
        assert [s for s, _ in losses] == list(range(2, steps + 1, 2))
        rows = _rows(os.path.join(d, "metrics.jsonl"))
        train_row = next(r for r in rows if "loss" in r)
        for key in ("learning_rate", "examples_per_sec", "tokens_per_sec", "grad_norm",
                    "router/adapter_usage", "router/confidence"):
            assert key in train_row, key
        assert len(train_row["router/adapter_usage"]) == 5
        # Stage one mixes all five adapters; stage two keeps the top 2 (not renormalised).
        usage = sum(train_row["router/adapter_usage"])
        assert usage == pytest.approx(1.0, abs=1e-4) if stage == "stage1" else 0.4 < usage < 1
        evals = _evals(d)
        assert [s for s, _ in evals] == list(range(6, steps + 1, 6))
        assert {"eval/classify/score", "eval/nli/score", "eval/generate/score",
                "eval/mrc/score"} <= set(evals[-1][1])
        preds = _rows(os.path.join(d, f"predictions_{steps}.jsonl"))
        assert {p["type"] for p in preds} == {"classify", "nli", "generate", "mrc"}
        assert all(set(p) >= {"input", "target", "prediction", "type"} for p in preds)
        for name in (f"routing_{steps}.png", "loss.png"):
            with open(os.path.join(d, name), "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert steps in ckpt_lib.Checkpointer(os.path.join(d, "checkpoints")).all_steps()
    stage1 = dict(_losses(os.path.join(reference, "stage1")))
    assert stage1[12] < stage1[2] - 0.5
    # Stage two mixes the kept adapters with one shared adapter through the gate.
    gate = [r["router/gate"] for r in _rows(os.path.join(reference, "stage2", "metrics.jsonl"))
            if "loss" in r]
    assert gate and all(len(g) == 2 and sum(g) == pytest.approx(1.0, abs=1e-4) for g in gate)
    with open(os.path.join(reference, "summary.json")) as f:
        summary = json.load(f)
    assert summary["stage2"]["eval/score"] == pytest.approx(_evals(
        os.path.join(reference, "stage2"))[-1][1]["eval/score"], abs=1e-12)


def _tensorboard_scalars(directory, tag):
    """{step: value} of `tag` in the TensorBoard event files of `directory` (TFRecord framing:
    length u64, its CRC u32, the Event proto, its CRC u32)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for name in sorted(os.listdir(directory)):
        if not name.startswith("events.out.tfevents"):
            continue
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.tag == tag:
                    out[event.step] = value.simple_value
    return out


def test_tensorboard_holds_the_logged_scalars(reference):
    for stage in ("stage1", "stage2"):
        d = os.path.join(reference, stage)
        for tag, rows in (("loss", _losses(d)),
                          ("eval/score", [(s, e["eval/score"]) for s, e in _evals(d)])):
            logged = _tensorboard_scalars(d, tag)
            assert sorted(logged) == [s for s, _ in rows], (stage, tag)
            # TensorBoard stores float32.
            np.testing.assert_allclose([logged[s] for s, _ in rows], [v for _, v in rows],
                                       rtol=1e-6)


def test_stage_two_changes_only_mta_leaves(reference):
    _, p1 = ckpt_lib.restore_params_from(os.path.join(reference, "stage1", "checkpoints"))
    _, p2 = ckpt_lib.restore_params_from(os.path.join(reference, "stage2", "checkpoints"))
    f1, f2 = flax.traverse_util.flatten_dict(p1), flax.traverse_util.flatten_dict(p2)
    outside = [k for k in f1 if "mta" not in k]
    inside = [k for k in f1 if "mta" in k]
    assert outside and inside
    for k in outside:
        np.testing.assert_array_equal(np.asarray(f2[k]), np.asarray(f1[k]), err_msg="/".join(k))
    changed = {k for k in inside if not np.array_equal(np.asarray(f2[k]), np.asarray(f1[k]))}
    adapters = {k for k in inside if "adapters" in k}
    assert adapters and adapters <= changed
    assert {k[-2] for k in f2 if k not in f1} >= {"gate_hidden", "gate_out"}
    assert any("shared_adapters" in k for k in f2 if k not in f1)


def test_stage_two_optimizer_state_holds_nothing_for_frozen_leaves(reference):
    with open(os.path.join(reference, "summary.json")) as f:
        summary = json.load(f)
    s2 = summary["stage2"]
    assert s2["frozen_params"] > 0
    # Adam: two float32 moments per trainable parameter, plus a few scalar counters.
    assert 0 <= s2["opt_state_bytes"] - 8 * s2["trainable_params"] <= 64
    s1 = summary["stage1"]
    assert s1["frozen_params"] == 0


def _checkpoint_steps(stage_dir):
    ck = os.path.join(stage_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(ck) if n.isdigit()) if os.path.isdir(ck) else []


def _logged_steps(stage_dir):
    path = os.path.join(stage_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def _start(workdir, log):
    """`python -m mta_jax.main` on the tiny config in the background, stderr into `log`."""
    with open(log, "w") as err:
        return subprocess.Popen(tiny.cli_args(workdir), cwd=tiny.ROOT, env=tiny.env(),
                                stdout=subprocess.DEVNULL, stderr=err, text=True)


def _wait_until(proc, log, condition, what, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        assert proc.poll() is None, open(log).read()[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_then_restart_ends_with_the_uninterrupted_run(reference, tmp_path):
    workdir = str(tmp_path / "killed")
    stage1 = os.path.join(workdir, "stage1")
    log = str(tmp_path / "killed.log")
    proc = _start(workdir, log)
    # Kill while metrics.jsonl holds rows past the newest checkpoint (the evaluation at step
    # 6 logs its row, then decodes for seconds before saving): the restart must drop them.
    _wait_until(proc, log, lambda: _checkpoint_steps(stage1) and
                max(_logged_steps(stage1), default=0) > max(_checkpoint_steps(stage1)),
                "a logged row after a checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(_logged_steps(stage1)) > max(_checkpoint_steps(stage1))
    resumed = tiny.run_main(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"stage1: resumed from step \d+", resumed.stderr)
    assert_same_run(workdir, reference)


def test_sigterm_saves_the_step_it_names_and_a_rerun_ends_where_an_uninterrupted_run_ends(
        reference, tmp_path):
    workdir = str(tmp_path / "term")
    log = str(tmp_path / "term.log")
    proc = _start(workdir, log)
    # Stage two's folder appears as it starts; the signal lands while it builds and compiles,
    # so the run stops after stage two's step 1: neither a checkpoint nor an eval step.
    _wait_until(proc, log, lambda: os.path.isdir(os.path.join(workdir, "stage2")),
                "stage two to start")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    err = open(log).read()
    assert proc.returncode == 0, err[-3000:]
    found = re.search(r"(stage[12]): SIGTERM at step (\d+): checkpoint saved", err)
    assert found, err[-3000:]
    stage, step = found.group(1), int(found.group(2))
    assert (stage, step) == ("stage2", 1)
    # The step named is on disk, the newest one, and readable.
    steps = ckpt_lib.Checkpointer(os.path.join(workdir, stage, "checkpoints")).all_steps()
    assert steps and steps[-1] == step, steps
    restored, _ = ckpt_lib.restore_params_from(os.path.join(workdir, stage, "checkpoints"))
    assert restored == step
    resumed = tiny.run_main(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{stage}: resumed from step {step}" in resumed.stderr
    assert_same_run(workdir, reference, resumed=(stage, step))


def test_non_finite_loss_stops_and_names_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan")
    one_stage = {"stages": "('stage1',)", "stage1.num_train_steps": 4}
    first = tiny.run_main(workdir, **one_stage)
    assert first.returncode == 0, first.stderr[-3000:]
    # The learning rate may change on a relaunch: 1e38 diverges within two steps of step 4.
    result = tiny.run_main(workdir, **{**one_stage, "stage1.num_train_steps": 12,
                                       "stage1.learning_rate": 1e38})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = _error_lines(result.stderr)
    ck = os.path.join(workdir, "stage1", "checkpoints")
    assert len(lines) == 1 and re.fullmatch(
        rf"error: stage1: non-finite loss -?(nan|inf) at or before step 6; the last good "
        rf"checkpoint is step 4 in {re.escape(ck)}", lines[0]), result.stderr[-2000:]
    assert ckpt_lib.Checkpointer(ck).all_steps() == [4]
    step, params = ckpt_lib.restore_params_from(ck, 4)
    assert step == 4 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_bad_config_flags_are_one_error_line(tmp_path):
    for flag, message in [
        ("--config.train.batch_size=0", "error: config.train.batch_size must be >= 1; got 0"),
        ("--config.mta.top_kk=1", "error: --config.mta.top_kk: config.mta has no field 'top_kk'; "
                                  "did you mean config.mta.top_k?"),
    ]:
        result = subprocess.run(tiny.cli_args(str(tmp_path / "w")) + [flag], cwd=tiny.ROOT,
                                env=tiny.env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 1, result.stderr[-2000:]
        assert _error_lines(result.stderr) == [message], result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "w")


def test_configs_load_from_another_working_directory(tmp_path):
    """`configs/*.py` import `configs.default`: found from the config file's own path."""
    site = tmp_path / "site"  # mta_jax importable, the repository root not on sys.path
    site.mkdir()
    os.symlink(os.path.join(tiny.ROOT, "mta_jax"), site / "mta_jax")
    env = {**tiny.env(), "PYTHONPATH": str(site)}
    for config in (os.path.join(tiny.ROOT, "configs", "demo.py"),
                   os.path.relpath(os.path.join(tiny.ROOT, "configs", "demo.py"), tmp_path)):
        result = subprocess.run(
            [sys.executable, "-m", "mta_jax.main", f"--config={config}", f"--workdir={tmp_path / 'w'}",
             "--config.train.batch_size=0"], cwd=tmp_path, env=env, capture_output=True,
            text=True, timeout=300)
        # The config loaded and the override applied: the check of the value speaks.
        assert _error_lines(result.stderr) == [
            "error: config.train.batch_size must be >= 1; got 0"], result.stderr[-2000:]


def test_relaunch_with_another_model_is_refused_and_the_workdir_kept(reference, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(reference, workdir)
    before = {p: open(os.path.join(workdir, p), "rb").read()
              for p in ("config.json", "summary.json", "stage1/metrics.jsonl")}
    result = tiny.run_main(workdir, **{"model.d_model": 64, "mta.num_adapters": 4})
    assert result.returncode == 1, result.stderr[-2000:]
    assert _error_lines(result.stderr) == [
        f"error: {workdir} holds checkpoints of a different model (stage1, stage2): "
        "model.d_model 32 -> 64; mta.num_adapters 5 -> 4. Relaunch with the values in "
        f"{workdir}/config.json, or use a new --workdir"], result.stderr[-2000:]
    assert {p: open(os.path.join(workdir, p), "rb").read() for p in before} == before
    # A rerun of the finished run trains nothing and keeps the scores in summary.json.
    again = tiny.run_main(workdir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "stage2: already finished (step 6)" in again.stderr
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(reference, "summary.json")) as f:
        assert {k: v for k, v in summary["stage2"].items() if k.startswith("eval/")} == {
            k: v for k, v in json.load(f)["stage2"].items() if k.startswith("eval/")} != {}
    assert open(os.path.join(workdir, "config.json"), "rb").read() == before["config.json"]


def test_resume_with_another_batch_size_names_the_change_and_the_way_out(reference, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(reference, workdir)
    metrics = open(os.path.join(workdir, "stage1", "metrics.jsonl")).read()
    longer = {"stages": "('stage1',)", "stage1.num_train_steps": 14, "train.batch_size": 16}
    result = tiny.run_main(workdir, **longer)
    assert result.returncode == 1, result.stderr[-2000:]
    ck = os.path.join(workdir, "stage1", "checkpoints")
    lines = _error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(
        f"error: stage1: cannot resume {ck}/12: the saved data iterator state comes from a "
        "different input pipeline (saved -> now: batch_size 8 -> 16)"), result.stderr[-2000:]
    assert lines[0].endswith("Start a new --workdir, or add "
                             "--config.train.reset_data_iterator=True to restart the data "
                             "iterator from the beginning of the data")
    assert open(os.path.join(workdir, "stage1", "metrics.jsonl")).read() == metrics
    # The way out it names works: the stage resumes at 12 and trains on to 14.
    result = tiny.run_main(workdir, **longer, **{"train.reset_data_iterator": True})
    assert result.returncode == 0, result.stderr[-2000:]
    assert [s for s, _ in _losses(os.path.join(workdir, "stage1"))] == [2, 4, 6, 8, 10, 12, 14]
