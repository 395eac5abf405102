"""The training driver end to end: files, freezing, resume after SIGKILL, SIGTERM, NaN guard,
bad configs. Every run is `python -m mta_jax.main` on a shrunk demo config (tests/integration/tiny.py)."""
import json
import os
import signal
import subprocess
import time

import flax
import numpy as np
import pytest

from mta_jax import checkpoint as ckpt_lib
from tests.integration import tiny


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _losses(stage_dir):
    return {r["step"]: r["loss"] for r in _rows(os.path.join(stage_dir, "metrics.jsonl")) if "loss" in r}


def test_both_stages_write_their_files_and_loss_falls(reference):
    assert os.path.exists(os.path.join(reference, "config.json"))
    for stage, steps in (("stage1", 12), ("stage2", 6)):
        d = os.path.join(reference, stage)
        losses = _losses(d)
        assert sorted(losses) == list(range(2, steps + 1, 2))
        rows = _rows(os.path.join(d, "metrics.jsonl"))
        train_row = next(r for r in rows if "loss" in r)
        for key in ("learning_rate", "examples_per_sec", "tokens_per_sec", "grad_norm",
                    "router/adapter_usage", "router/confidence"):
            assert key in train_row, key
        assert len(train_row["router/adapter_usage"]) == 5
        evals = [r for r in rows if "eval/score" in r]
        assert [r["step"] for r in evals] == list(range(6, steps + 1, 6))
        assert {"eval/classify/score", "eval/nli/score", "eval/generate/score",
                "eval/mrc/score"} <= set(evals[-1])
        preds = _rows(os.path.join(d, f"predictions_{steps}.jsonl"))
        assert {p["type"] for p in preds} == {"classify", "nli", "generate", "mrc"}
        assert all(set(p) >= {"input", "target", "prediction", "type"} for p in preds)
        for name in (f"routing_{steps}.png", "loss.png"):
            with open(os.path.join(d, name), "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert any(n.startswith("events.out.tfevents") for n in os.listdir(d))
        assert steps in ckpt_lib.Checkpointer(os.path.join(d, "checkpoints")).all_steps()
    stage1 = _losses(os.path.join(reference, "stage1"))
    assert stage1[12] < stage1[2] - 0.5
    assert "gate_weights" in "".join(open(os.path.join(reference, "stage2", "metrics.jsonl")).read()) or \
        "router/gate" in _rows(os.path.join(reference, "stage2", "metrics.jsonl"))[0]


def test_stage_two_changes_only_mta_leaves(reference):
    _, p1 = ckpt_lib.restore_params_from(os.path.join(reference, "stage1", "checkpoints"))
    _, p2 = ckpt_lib.restore_params_from(os.path.join(reference, "stage2", "checkpoints"))
    f1, f2 = flax.traverse_util.flatten_dict(p1), flax.traverse_util.flatten_dict(p2)
    outside = [k for k in f1 if not any("mta" in str(p) for p in k)]
    inside = [k for k in f1 if any("mta" in str(p) for p in k)]
    assert outside and inside
    for k in outside:
        np.testing.assert_array_equal(np.asarray(f2[k]), np.asarray(f1[k]), err_msg="/".join(k))
    changed = [k for k in inside if k[-1] != "logits" or True
               if not np.array_equal(np.asarray(f2[k]), np.asarray(f1[k]))]
    assert any("adapters" in k for k in changed)
    assert any(("gate_hidden" in k or "shared_adapters" in k) for k in f2 if k not in f1)


def test_stage_two_optimizer_state_holds_nothing_for_frozen_leaves(reference):
    with open(os.path.join(reference, "summary.json")) as f:
        summary = json.load(f)
    s2 = summary["stage2"]
    assert s2["frozen_params"] > 0
    # Adam: two float32 moments per trainable parameter, plus a few scalar counters.
    assert 0 <= s2["opt_state_bytes"] - 8 * s2["trainable_params"] <= 64
    s1 = summary["stage1"]
    assert s1["frozen_params"] == 0


def _wait_for_checkpoint(stage_dir, proc, timeout=300):
    ck = os.path.join(stage_dir, "checkpoints")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isdir(ck) and any(n.isdigit() for n in os.listdir(ck)):
            return
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def test_sigkill_then_restart_ends_with_the_uninterrupted_loss(reference, tmp_path):
    workdir = str(tmp_path / "killed")
    proc = subprocess.Popen(tiny.cli_args(workdir), cwd=tiny.ROOT, env=tiny.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(os.path.join(workdir, "stage1"), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = tiny.run_main(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stderr
    for stage in ("stage1", "stage2"):
        ours = _losses(os.path.join(workdir, stage))
        ref = _losses(os.path.join(reference, stage))
        assert sorted(ours) == sorted(ref)  # no duplicated or missing rows
        np.testing.assert_allclose([ours[s] for s in sorted(ours)], [ref[s] for s in sorted(ref)],
                                   rtol=1e-6)


def test_sigterm_saves_and_exits_zero(tmp_path):
    workdir = str(tmp_path / "term")
    changes = {"stage1.num_train_steps": 400, "checkpoint_every_steps": 2, "eval_every_steps": 1000}
    proc = subprocess.Popen(tiny.cli_args(workdir, **changes), cwd=tiny.ROOT, env=tiny.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_checkpoint(os.path.join(workdir, "stage1"), proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM at step" in err
    steps = ckpt_lib.Checkpointer(os.path.join(workdir, "stage1", "checkpoints")).all_steps()
    assert steps and max(steps) < 400


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan")
    result = tiny.run_main(workdir, **{"stage1.learning_rate": 1e38, "stage1.num_train_steps": 12,
                                       "stages": "('stage1',)"})
    assert result.returncode == 2
    line = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert line and "non-finite loss" in line[0] and "step" in line[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag, message", [
    ("--config.train.batch_size=0", "config.train.batch_size must be >= 1; got 0"),
    ("--config.mta.top_k=9", "mta.top_k must be None or an integer in [1, num_adapters=5]; got 9"),
    ("--config.mta.encoder_layers=7", "mta.encoder_layers must be block indices in [-1, 0]"),
    ("--config.stages=('stage3',)", "config.stages must be a non-empty ordered subset"),
    ("--config.data.source=csv", "config.data.source is 'csv'"),
])
def test_bad_config_is_one_error_line(tmp_path, flag, message):
    args = [a for a in tiny.cli_args(str(tmp_path)) if not a.startswith(flag.split("=")[0] + "=")]
    result = subprocess.run(args + [flag], cwd=tiny.ROOT, env=tiny.env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
