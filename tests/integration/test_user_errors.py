"""Every mistake a user can make ends in one line `error: ...`, exit status 1, and leaves the
workdir as it was. In process: the entry points' own wrapping (cli.one_line_errors,
cli.parse_flags) around train.train_and_evaluate and predict.predict_file; no training runs
(the end-to-end runs of the same entry points are in test_train.py and test_predict.py)."""
import json
import os
import sys

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from mta_jax import cli, hf, predict, train
from mta_jax import checkpoint as ckpt_lib
from mta_jax.models import t5 as t5_lib
from tests.helpers import TINY_T5
from tests.integration import tiny


def one_error_line(capsys, fn, *args, **kwargs) -> str:
    """Runs fn under cli.one_line_errors; asserts exit status 1 and exactly one line on
    stderr, `error: ...`; returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        with cli.one_line_errors():
            fn(*args, **kwargs)
    assert exited.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _files(folder) -> dict:
    """{relative path: bytes} of every file under `folder`."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


# ----------------------------------------------------------------------- config values

@pytest.mark.parametrize("changes, message", [
    ({"train.batch_size": 0}, "config.train.batch_size must be >= 1; got 0"),
    ({"mta.top_k": 9}, "mta.top_k must be None or an integer in [1, num_adapters=5]; got 9"),
    ({"mta.encoder_layers": "7"},
     "mta.encoder_layers must be block indices in [-1, 0] (the encoder has 1 blocks); got (7,)"),
    ({"stages": ("stage3",)},
     "config.stages must be a non-empty ordered subset of ('stage1', 'stage2'); got ('stage3',)"),
    ({"data.source": "csv"},
     "config.data.source is 'csv'; expected one of ('synthetic', 'jsonl', 'tfds')"),
    ({"stage1.num_train_steps": 0}, "config.stage1.num_train_steps must be >= 1; got 0"),
    ({"stage2.num_train_steps": -5}, "config.stage2.num_train_steps must be >= 1; got -5"),
    ({"stage1.learning_rate": 0.0}, "config.stage1.learning_rate must be > 0; got 0.0"),
    ({"stage2.learning_rate": -1e-3}, "config.stage2.learning_rate must be > 0; got -0.001"),
    ({"train.grad_accum_steps": 3},
     "config.train.grad_accum_steps must be >= 1 and a divisor of train.batch_size=8; got 3"),
    ({"model.vocab_size": 100}, "config.model.vocab_size must be >= the tokenizer's size 384; "
                                "got 100"),
    ({"stage1.trainable": "nothing_matches"},
     "config.stage1.trainable must be a regex that matches at least one parameter path; "
     "got 'nothing_matches'"),
    # Token ids outside the vocabulary: a [START] id past the tokenizer (and so the model).
    ({"data.start_token": True, "data.start_token_id": 1000},
     "config.data.start_token_id 1000 is outside the tokenizer's 384 ids"),
])
def test_bad_config_value_is_one_line_before_anything_is_written(capsys, tmp_path, changes,
                                                                  message):
    workdir = tmp_path / "w"
    line = one_error_line(capsys, train.train_and_evaluate, tiny.tiny_config(**changes),
                          str(workdir))
    assert line == f"error: {message}"
    assert not os.path.exists(workdir / "config.json")


def test_stage_two_without_a_stage_one_checkpoint(capsys, tmp_path):
    workdir = tmp_path / "w"
    line = one_error_line(capsys, train.train_and_evaluate, tiny.tiny_config(stages=("stage2",)),
                          str(workdir))
    assert line == (f"error: stage two starts from stage one's checkpoint, but {workdir}/stage1/"
                    "checkpoints does not exist: run stage1 first or set "
                    "config.stage2.init_checkpoint")
    empty = tmp_path / "empty"
    empty.mkdir()
    config = tiny.tiny_config(stages=("stage2",), **{"stage2.init_checkpoint": str(empty)})
    line = one_error_line(capsys, train.train_and_evaluate, config, str(tmp_path / "w2"))
    assert line == f"error: no checkpoint in {empty}"


def test_every_checkpoint_unreadable_is_one_line_and_nothing_is_rewritten(capsys, tmp_path):
    workdir = tmp_path / "w"
    config = tiny.tiny_config(stages=("stage1",))
    ck_dir = workdir / "stage1" / "checkpoints"
    with ckpt_lib.Checkpointer(ck_dir, max_to_keep=None, async_save=False) as ck:
        for step in (2, 4):  # not this model's parameters: neither step can be restored
            ck.save(step, params={"x": np.zeros(3, np.float32)},
                    opt_state={"x": np.zeros(3, np.float32)}, data_state={}, extra={})
    (workdir / "config.json").write_text(config.to_json_best_effort())
    (workdir / "stage1" / "metrics.jsonl").write_text('{"step": 2, "loss": 1.0}\n'
                                                     '{"step": 4, "loss": 0.5}\n')
    before = _files(workdir)
    line = one_error_line(capsys, train.train_and_evaluate, config, str(workdir))
    assert line.startswith(f"error: no readable checkpoint in {ck_dir}: step 4: ")
    assert "; step 2: " in line
    assert _files(workdir) == before


def _tiny_hf_folder(folder) -> str:
    """A Hugging Face T5 folder of TINY_T5 (vocabulary 64), written by our exporter."""
    model = t5_lib.T5(TINY_T5)
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), hf.abstract_params(model))
    hf.save_hf_t5(str(folder), model, zeros)
    return str(folder)


def test_tokenizer_larger_than_the_pretrained_vocabulary(capsys, tmp_path):
    folder = _tiny_hf_folder(tmp_path / "t5")
    config = tiny.tiny_config(init_from=folder)  # the byte tokenizer: 384 ids
    line = one_error_line(capsys, train.train_and_evaluate, config, str(tmp_path / "w"))
    assert line == (f"error: config.data.tokenizer has 384 tokens but the model of "
                    f"config.init_from={folder!r} has vocab_size 64; use a tokenizer of at most "
                    "that many tokens (the folder's own: data.tokenizer='')")


def test_pretrained_folder_with_bad_config_or_a_missing_shard(capsys, tmp_path):
    folder = _tiny_hf_folder(tmp_path / "t5")
    config_path = os.path.join(folder, "config.json")
    good = open(config_path).read()
    with open(config_path, "w") as f:
        f.write(good[:40])  # cut mid-way
    line = one_error_line(capsys, train.train_and_evaluate, tiny.tiny_config(init_from=folder),
                          str(tmp_path / "w"))
    assert line.startswith(f"error: {config_path}: invalid JSON (")
    with open(config_path, "w") as f:
        f.write(good)
    os.rename(os.path.join(folder, "model.safetensors"), os.path.join(folder, "part-1.safetensors"))
    tensors = hf.read_safetensors(os.path.join(folder, "part-1.safetensors"))
    names = sorted(tensors)
    index = {"weight_map": {n: "part-1.safetensors" if i % 2 else "part-2.safetensors"
                            for i, n in enumerate(names)}}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    line = one_error_line(capsys, train.train_and_evaluate, tiny.tiny_config(init_from=folder),
                          str(tmp_path / "w"))
    assert line == (f"error: {folder}/model.safetensors.index.json: lists "
                    "part-2.safetensors, which does not exist")


def test_jsonl_training_file_not_utf8_or_empty(capsys, tmp_path):
    good = tmp_path / "eval.jsonl"
    good.write_text(json.dumps({"input": "polarity: hot", "target": "positive",
                                "type": "classify"}) + "\n")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"input": "caf\xe9", "target": "x", "type": "classify"}\n'.encode("latin-1"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    for path, message in ((latin, f"error: {latin}:1: not UTF-8 (invalid continuation byte at "
                                  "byte 14) (set config.data.on_bad_row='skip' to skip and count "
                                  "such rows)"),
                          (empty, f"error: {empty}: no usable examples (bad rows skipped: {{}}, "
                                  "blank lines: 1)")):
        config = tiny.tiny_config(**{"data.source": "jsonl", "data.train_path": str(path),
                                     "data.eval_path": str(good)})
        assert one_error_line(capsys, train.train_and_evaluate, config,
                              str(tmp_path / "w")) == message


# ------------------------------------------------------------------ relaunching a workdir

def _fake_trained_workdir(tmp_path, **changes):
    """A workdir with config.json and checkpoint folders of both stages (nothing inside)."""
    workdir = tmp_path / "w"
    for stage in ("stage1", "stage2"):
        (workdir / stage / "checkpoints" / "6").mkdir(parents=True)
    (workdir / "config.json").write_text(tiny.tiny_config(**changes).to_json_best_effort())
    return workdir


def test_relaunch_with_another_model_is_refused_naming_the_fields(capsys, tmp_path):
    workdir = _fake_trained_workdir(tmp_path)
    before = _files(workdir)
    config = tiny.tiny_config(**{"model.d_ff": 128, "stage2.trainable": "mta|shared",
                                 "mta.task_types": ("classify", "nli", "mrc", "generate", "qa")})
    line = one_error_line(capsys, train.train_and_evaluate, config, str(workdir))
    assert line == (
        f"error: {workdir} holds checkpoints of a different model (stage1, stage2): "
        "model.d_ff 64 -> 128; mta.task_types ['classify', 'nli', 'mrc', 'generate', "
        "'anaphora_resolution'] -> ['classify', 'nli', 'mrc', 'generate', 'qa']; "
        "stage2.trainable 'mta' -> 'mta|shared'. Relaunch with the values in "
        f"{workdir}/config.json, or use a new --workdir")
    assert _files(workdir) == before


def test_relaunch_may_change_steps_learning_rate_evaluation_and_dropout(tmp_path):
    workdir = _fake_trained_workdir(tmp_path)
    config = tiny.tiny_config(**{"stage1.num_train_steps": 100, "stage2.learning_rate": 1.0,
                                 "eval.beam_size": 2, "eval_every_steps": 3,
                                 "model.dropout_rate": 0.3, "train.batch_size": 4})
    train.check_relaunch(config, str(workdir))  # no error
    # A stage without checkpoints may still change its own fields.
    for name in os.listdir(workdir / "stage2" / "checkpoints"):
        os.rmdir(workdir / "stage2" / "checkpoints" / name)
    train.check_relaunch(tiny.tiny_config(**{"stage2.trainable": "gate"}), str(workdir))


# ------------------------------------------------------------------------------ predict

@pytest.fixture
def untrained(tmp_path):
    """A workdir with the run's config.json and no checkpoint: anything read from the model
    would fail with 'no checkpoint', so these errors prove the order of the checks."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(tiny.tiny_config().to_json_best_effort())
    return workdir


def _input(tmp_path, content: bytes, name="in.jsonl"):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


GOOD_LINE = (json.dumps({"input": "polarity: hot", "target": "positive", "type": "classify"})
             + "\n").encode()


def test_predict_checks_the_input_before_the_model(capsys, tmp_path, untrained):
    out = str(tmp_path / "out.jsonl")
    for content, message in [
        (b'{"input": "polarity: hot", "target": "positive"}\n',
         ":1: missing field(s) ['type']"),
        ('{"input": "caf\xe9", "type": "classify"}\n'.encode("latin-1"),
         ":1: not UTF-8 (invalid continuation byte at byte 14)"),
        (b"", ": no usable examples (bad rows skipped: {}, blank lines: 0)"),
        # The column of a line cut short is its end, not the next line's start.
        (GOOD_LINE + b'{"input": "polarity: hot", "target": "positive", "type": "classify"\n',
         ":2: invalid JSON (Expecting ',' delimiter at column 68)"),
        (b'\xef\xbb\xbf{"input": "x", "type": "poem"}\n', ":1: unknown task type 'poem'"),
    ]:
        path = _input(tmp_path, content)
        line = one_error_line(capsys, predict.predict_file, str(untrained), path, out)
        assert line.startswith(f"error: {path}{message}"), line
    line = one_error_line(capsys, predict.predict_file, str(untrained),
                          str(tmp_path / "nope.jsonl"), out)
    assert line == f"error: JSON-lines file not found: {str(tmp_path / 'nope.jsonl')!r}"
    assert not os.path.exists(out)


def test_predict_output_stage_step_and_workdir_mistakes(capsys, tmp_path, untrained):
    path = _input(tmp_path, GOOD_LINE)
    missing = tmp_path / "no" / "such"
    assert one_error_line(capsys, predict.predict_file, str(untrained), path,
                          str(missing / "out.jsonl")) == (
        f"error: --output {missing / 'out.jsonl'}: the folder {missing} does not exist")
    assert one_error_line(capsys, predict.predict_file, str(untrained), path, str(tmp_path)) == (
        f"error: --output {tmp_path} is a folder; give a file name")
    out = str(tmp_path / "out.jsonl")
    assert one_error_line(capsys, predict.predict_file, str(untrained), path, out,
                          stage="stage3") == (
        "error: --stage must be one of this run's stages ('stage1', 'stage2'); got 'stage3'")
    assert one_error_line(capsys, predict.predict_file, str(untrained), path, out,
                          batch_size=0) == "error: --batch_size must be >= 1; got 0"
    assert one_error_line(capsys, predict.predict_file, str(untrained), path, out) == (
        f"error: {untrained}/stage2/checkpoints: no checkpoint of stage2 in this workdir")
    assert one_error_line(capsys, predict.predict_file, str(tmp_path / "nowhere"), path, out) == (
        f"error: {tmp_path}/nowhere/config.json does not exist: --workdir must be a training "
        "workdir")
    ck_dir = untrained / "stage2" / "checkpoints"
    with ckpt_lib.Checkpointer(ck_dir, max_to_keep=None, async_save=False) as ck:
        ck.save(6, params={"x": np.zeros(3, np.float32)}, opt_state={"x": np.zeros(3, np.float32)},
                data_state={}, extra={})
    assert one_error_line(capsys, predict.predict_file, str(untrained), path, out, step=7) == (
        f"error: --step 7: no checkpoint of that step in {ck_dir}; steps there: [6]")
    assert not os.path.exists(out)


# ------------------------------------------------------------------ flags and config files

def _parse(capsys, monkeypatch, *args):
    """cli.parse_flags over a fresh flag set shaped like main's (--config, --workdir, --step);
    -> (flag values, None) or (None, the one error line)."""
    argv = ["main", *args]
    monkeypatch.setattr(sys, "argv", argv)
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values)
    flags.DEFINE_string("workdir", None, "workdir", flag_values=values)
    flags.DEFINE_integer("step", None, "step", flag_values=values)
    capsys.readouterr()
    try:
        cli.parse_flags(argv, flag_values=values)
    except SystemExit as e:
        assert e.code == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return None, lines[0]
    return values, None


DEMO = os.path.join(tiny.ROOT, "configs", "demo.py")


@pytest.mark.parametrize("args, message", [
    ([f"--config={DEMO}", "--config.mta.top_kk=1"],
     "error: --config.mta.top_kk: config.mta has no field 'top_kk'; did you mean config.mta.top_k?"),
    ([f"--config={DEMO}", "--config.stage1.learning_rat=1e-3"],
     "error: --config.stage1.learning_rat: config.stage1 has no field 'learning_rat'; did you "
     "mean config.stage1.learning_rate?"),
    ([f"--config={DEMO}", "--config.mtaa.top_k=1"],
     "error: --config.mtaa.top_k: config has no field 'mtaa'; did you mean config.mta?"),
    ([f"--config={DEMO}", "--config.mta.top_k.x=1"],
     "error: --config.mta.top_k.x: config.mta.top_k is 2, which has no fields"),
    ([f"--config={DEMO}", "--config.train.batch_size=eight"],
     "error: flag --config.train.batch_size=eight: invalid literal for int() with base 10: "
     "'eight'"),
    (["--config=configs/nope.py"], "error: --config=configs/nope.py: no such file "
                                   f"{os.path.abspath('configs/nope.py')} (a config file, e.g. "
                                   "configs/demo.py)"),
    ([f"--config={DEMO}", "--step=abc"],
     "error: flag --step=abc: invalid literal for int() with base 10: 'abc'"),
])
def test_flag_mistakes_are_one_line_naming_the_flag(capsys, monkeypatch, args, message):
    values, line = _parse(capsys, monkeypatch, *args)
    assert line == message


def test_a_config_file_that_raises_is_one_line_naming_it(capsys, monkeypatch, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    return undefined_name\n")
    _, line = _parse(capsys, monkeypatch, f"--config={broken}")
    assert line == (f"error: --config={broken}: loading {broken} failed: NameError: name "
                    "'undefined_name' is not defined")


def test_configs_load_from_any_working_directory(capsys, monkeypatch, tmp_path):
    """configs/demo.py imports `configs.default`: found beside the file, whatever the cwd."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path
                                      if os.path.abspath(p or ".") != tiny.ROOT])
    for name in [m for m in sys.modules if m == "configs" or m.startswith("configs.")]:
        monkeypatch.delitem(sys.modules, name)
    values, line = _parse(capsys, monkeypatch, f"--config={os.path.relpath(DEMO)}",
                          "--config.mta.top_k=1")
    assert line is None
    assert values.config.model.d_model == 128 and values.config.mta.top_k == 1
    assert sys.modules["configs.default"].__file__ == os.path.join(tiny.ROOT, "configs",
                                                                   "default.py")
