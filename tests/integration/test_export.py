"""`python -m mta_jax.export` on a trained run of the demo's shape: the artifact predicts what the
workdir predicts, loads bitwise, and serves from PyTorch with the JAX model's logits and tokens."""
import json
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import TORCH_REASON

from mta_jax import artifact_format as fmt
from mta_jax import decoding, load_adapters, predict
from tests.integration import tiny

pytestmark = pytest.mark.slow

# configs/demo.py's model (d_model 128, 2 + 2 blocks, gated GELU, untied head, byte vocabulary
# 384, MTA in the last block of each stack), trained a few steps per stage.
DEMO_SHAPE = {"model.d_model": 128, "model.d_kv": 32, "model.d_ff": 256, "model.num_heads": 4,
              "model.num_layers": 2, "model.num_decoder_layers": 2, "mta.gate_hidden_dim": 128,
              "stage1.num_train_steps": 4, "stage2.num_train_steps": 4,
              "checkpoint_every_steps": 2, "eval_every_steps": 4, "data.eval_max_examples": 2}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(workdir, artifact folder): a demo-shaped run and its `export --full`."""
    workdir = str(tmp_path_factory.mktemp("demo_shape"))
    result = tiny.run_main(workdir, **DEMO_SHAPE)
    assert result.returncode == 0, result.stderr[-3000:]
    out = os.path.join(workdir, "export")
    cli = subprocess.run([sys.executable, "-m", "mta_jax.export", f"--workdir={workdir}",
                          f"--out={out}", "--full"], cwd=tiny.ROOT, env=tiny.env(),
                         capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "the adapters of stage2 step 4" in cli.stdout
    return workdir, out


def _fixture(workdir, tmp_path):
    """The stage-two evaluation examples, as a JSON-lines input for predict."""
    with open(os.path.join(workdir, "stage2", "predictions_4.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({k: r[k] for k in ("input", "target", "type")}) + "\n"
                            for r in rows))
    return str(path), rows


def test_export_writes_the_artifact_and_a_backbone_transformers_reads(exported):
    pytest.importorskip("torch", reason=TORCH_REASON)  # transformers loads the backbone with it
    import transformers

    _, out = exported
    assert sorted(os.listdir(out)) == sorted([fmt.ADAPTERS_FILE, fmt.CONFIG_FILE, fmt.BACKBONE_DIR])
    meta = fmt.read_meta(out)
    assert meta["source"]["stage"] == "stage2" and meta["source"]["step"] == 4
    assert meta["blocks"] == {"encoder": [1], "decoder": [1]}
    assert meta["data"]["tokenizer"] == "byt5" and meta["eval"]["decode"] == "greedy"
    backbone = os.path.join(out, fmt.BACKBONE_DIR)
    assert transformers.AutoTokenizer.from_pretrained(backbone).decode([104, 108]) == "ei"
    model = transformers.T5ForConditionalGeneration.from_pretrained(backbone)
    assert model.config.d_model == 128 and model.config.vocab_size == 384


def test_the_artifact_gives_the_checkpoints_logits_bit_for_bit(exported):
    workdir, out = exported
    _, built, trained, step = predict.load_model(workdir, "stage2", 4)
    model, params = load_adapters(os.path.join(out, fmt.BACKBONE_DIR), out)
    assert step == 4 and model.config == built.model.config
    rng = np.random.default_rng(0)
    ids, dec = (jnp.asarray(rng.integers(3, 384, shape), jnp.int32) for shape in ((6, 20), (6, 9)))
    task_ids = jnp.arange(6, dtype=jnp.int32) % 5
    apply = jax.jit(lambda p: model.apply({"params": p}, ids, dec, task_ids=task_ids))
    np.testing.assert_array_equal(apply(params), apply(trained))
    leaves = lambda p: flax.traverse_util.flatten_dict(jax.device_get(p))
    assert all(np.array_equal(a, leaves(trained)[k]) for k, a in leaves(params).items())


def test_predict_from_the_artifact_equals_predict_from_the_workdir(exported, tmp_path):
    workdir, out = exported
    fixture, training = _fixture(workdir, tmp_path)
    from_workdir = predict.predict_file(workdir, fixture, str(tmp_path / "w.jsonl"))
    cli = subprocess.run([sys.executable, "-m", "mta_jax.predict", f"--adapters={out}",
                          f"--input={fixture}", f"--output={tmp_path / 'a.jsonl'}"],
                         cwd=tiny.ROOT, env=tiny.env(), capture_output=True, text=True,
                         timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in training]
    assert json.loads(cli.stdout[:cli.stdout.rindex("}") + 1]) == from_workdir


def test_pytorch_serves_the_demo_model_with_its_logits_and_greedy_tokens(exported, tmp_path):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)

    pytest.importorskip("torch", reason=TORCH_REASON)
    from mta_jax.torch import load_mta_t5

    workdir, out = exported
    model, params = load_adapters(os.path.join(out, fmt.BACKBONE_DIR), out)
    theirs = load_mta_t5(os.path.join(out, fmt.BACKBONE_DIR), out)
    p = predict.load_artifact(out)
    _, rows = _fixture(workdir, tmp_path)
    ids = np.asarray(p.tokenizer([r["input"] for r in rows], padding=True)["input_ids"], np.int32)
    mask = (ids != 0).astype(np.int32)
    task_ids = np.asarray([p.task_types.index(r["type"]) for r in rows], np.int32)
    dec = np.concatenate([np.zeros((len(ids), 1), np.int32), ids[:, :7]], axis=1)
    t = lambda x: torch.tensor(np.asarray(x), dtype=torch.long)
    with torch.no_grad():
        logits = theirs(input_ids=t(ids), attention_mask=t(mask), decoder_input_ids=t(dec),
                        task_ids=t(task_ids)).logits.numpy()
        generated = theirs.generate(input_ids=t(ids), attention_mask=t(mask),
                                    task_ids=t(task_ids)).numpy()[:, 1:]
    ours = model.apply({"params": params}, ids, dec, attention_mask=mask, task_ids=task_ids)
    assert np.abs(logits - np.asarray(ours)).max() <= 1e-4
    tokens = np.asarray(decoding.greedy_decode(model, params, ids, mask, task_ids=task_ids,
                                               max_length=p.eval.max_decode_length))
    padded = np.zeros_like(tokens)
    padded[:, :generated.shape[1]] = generated
    np.testing.assert_array_equal(padded, tokens)
