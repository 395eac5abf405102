"""`mta_jax.predict` reproduces the training-time predictions; its bad inputs name file and line."""
import json
import os
import subprocess
import sys

import pytest

from mta_jax import predict
from mta_jax.checkpoint import CheckpointError
from mta_jax.data import DataError
from tests.integration import tiny


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("stage, step", [("stage1", 12), ("stage2", 6)])
def test_predict_reproduces_training_time_predictions(reference, tmp_path, stage, step):
    training = _rows(os.path.join(reference, stage, f"predictions_{step}.jsonl"))
    fixture = tmp_path / "in.jsonl"
    fixture.write_text("".join(json.dumps({"input": r["input"], "target": r["target"],
                                           "type": r["type"]}) + "\n" for r in training))
    out = tmp_path / "out.jsonl"
    scores = predict.predict_file(reference, str(fixture), str(out), stage=stage, step=step)
    ours = _rows(out)
    assert [r["prediction"] for r in ours] == [r["prediction"] for r in training]
    assert [r["input"] for r in ours] == [r["input"] for r in training]
    logged = [json.loads(l) for l in open(os.path.join(reference, stage, "metrics.jsonl"))
              if '"eval/score"' in l and json.loads(l)["step"] == step][0]
    assert scores["score"] == pytest.approx(logged["eval/score"], abs=1e-12)


def test_predict_cli_uses_the_best_checkpoint_and_writes_the_file(reference, tmp_path):
    fixture = tmp_path / "in.jsonl"
    fixture.write_text(json.dumps({"input": "polarity: hot big new", "target": "positive",
                                   "type": "classify"}) + "\n")
    out = tmp_path / "out.jsonl"
    result = subprocess.run([sys.executable, "-m", "mta_jax.predict", f"--workdir={reference}",
                             f"--input={fixture}", f"--output={out}"], cwd=tiny.ROOT,
                            env=tiny.env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    row = _rows(out)[0]
    assert set(row) >= {"input", "target", "prediction", "type"}
    assert "predicting with stage2 step 6" in result.stderr


def test_workdir_without_checkpoint(tmp_path, reference):
    empty = tmp_path / "w"
    (empty / "stage2").mkdir(parents=True)
    (empty / "config.json").write_text(open(os.path.join(reference, "config.json")).read())
    with pytest.raises(CheckpointError, match=r"stage2/checkpoints: no checkpoint of stage2"):
        predict.predict_file(str(empty), "in.jsonl", str(tmp_path / "o.jsonl"))


@pytest.mark.parametrize("line, message", [
    ({"input": "polarity: hot", "target": "positive"}, r"in.jsonl:2: .*missing field"),
    ({"input": "polarity: hot", "target": "positive", "type": "poem"},
     r"in.jsonl:2: .*unknown task type 'poem'"),
])
def test_bad_lines_name_the_file_and_line(reference, tmp_path, line, message):
    fixture = tmp_path / "in.jsonl"
    good = {"input": "polarity: cold", "target": "negative", "type": "classify"}
    fixture.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError, match=message):
        predict.predict_file(reference, str(fixture), str(tmp_path / "o.jsonl"), stage="stage1")
