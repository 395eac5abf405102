"""`mta_jax.predict` reproduces the training-time predictions, with the best checkpoint by
default. (Its mistakes, checked before any weight is read, are in test_user_errors.py.)"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from mta_jax import checkpoint as ckpt_lib
from mta_jax import predict
from tests.integration import tiny

pytestmark = pytest.mark.slow


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _inputs_of(predictions, path):
    """The lines a training-time predictions file was made from, as predict's input."""
    path.write_text("".join(json.dumps({"input": r["input"], "target": r["target"],
                                        "type": r["type"]}) + "\n" for r in predictions))
    return str(path)


@pytest.mark.parametrize("stage, step", [("stage1", 12), ("stage2", 6)])
def test_predict_reproduces_training_time_predictions(reference, tmp_path, stage, step):
    training = _rows(os.path.join(reference, stage, f"predictions_{step}.jsonl"))
    fixture = _inputs_of(training, tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    scores = predict.predict_file(reference, fixture, str(out), stage=stage, step=step)
    ours = _rows(out)
    assert [r["prediction"] for r in ours] == [r["prediction"] for r in training]
    assert [r["input"] for r in ours] == [r["input"] for r in training]
    logged = [json.loads(l) for l in open(os.path.join(reference, stage, "metrics.jsonl"))
              if '"eval/score"' in l and json.loads(l)["step"] == step][0]
    assert scores["score"] == pytest.approx(logged["eval/score"], abs=1e-12)


def test_predict_cli_uses_the_best_checkpoint_not_the_latest(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    ck_dir = workdir / "stage1" / "checkpoints"
    # Two more checkpoints: step 100 holds step 6's weights and the best score; step 200,
    # the latest, holds other weights and the worst score.
    _, params = ckpt_lib.restore_params_from(ck_dir, 6)
    with ckpt_lib.Checkpointer(ck_dir, max_to_keep=None, async_save=False,
                               keep_best_metric="eval/score") as ck:
        for step, weights, score in ((100, params, 2.0), (200, jax.tree.map(np.zeros_like, params),
                                                          -1.0)):
            ck.save(step, params=weights, opt_state={"x": np.zeros(1, np.float32)},
                    data_state={}, extra={}, metrics={"eval/score": score})
        assert (ck.latest_step(), ck.best_step()) == (200, 100)
    training = _rows(workdir / "stage1" / "predictions_6.jsonl")
    out = tmp_path / "out.jsonl"
    result = subprocess.run([sys.executable, "-m", "mta_jax.predict", f"--workdir={workdir}",
                             "--stage=stage1", f"--input={_inputs_of(training, tmp_path / 'in.jsonl')}",
                             f"--output={out}"], cwd=tiny.ROOT, env=tiny.env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "predicting with stage1 step 100" in result.stderr
    assert [r["prediction"] for r in _rows(out)] == [r["prediction"] for r in training]
    logged = [r for r in _rows(workdir / "stage1" / "metrics.jsonl")
              if r["step"] == 6 and "eval/score" in r][0]
    printed = json.loads(result.stdout[:result.stdout.rindex("}") + 1])
    assert printed["score"] == pytest.approx(logged["eval/score"], abs=1e-12)
