"""Adapter artifacts: the bitwise roundtrip, the backbone digest, each error's one line, and the
PyTorch runtime against the JAX model (logits, greedy and beam tokens, both stages)."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mta_jax import artifact, decoding, hf, load_adapters, load_hf_t5
from mta_jax import artifact_format as fmt
from mta_jax.errors import CheckpointFormatError
from mta_jax.models import mta as M
from tests.helpers import TORCH_REASON, make_hf_t5

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EOS, MAX_LENGTH = 1, 8
TASKS = ("a", "b", "c", "d")
DATA = {"tokenizer": "byt5", "max_source_length": 16, "max_target_length": 8,
        "start_token": False, "start_token_id": -1}
EVAL = {"decode": "beam", "beam_size": 3, "max_decode_length": MAX_LENGTH,
        "length_penalty": 0.6, "batch_size": 4}
# Temperature 2 keeps the perturbed selector's weights spread: at the released 0.1 one adapter
# takes nearly all the weight, and mistakes in the others' weights would not show.
STAGE_ONE = dict(encoder_layers="last", decoder_layers=(0,), num_adapters=3, task_types=TASKS,
                 gate_hidden_dim=8, adapter_dim=8, temperature=2.0)
STAGE_TWO = dict(STAGE_ONE, top_k=2, num_shared_adapters=1)


@dataclasses.dataclass
class Exported:
    model: object  # the JAX T5 with MTA blocks
    params: dict
    dir: str  # the artifact; its backbone/ is the --full folder


def _perturbed(params, seed: int) -> dict:
    """Every MTA leaf moved off its initialisation: copies of one FFN, a zero bottleneck `wo`
    or near-equal selector logits would hide mistakes."""
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(params)
    for k, v in flat.items():
        if "mta" in k:
            scale = 1.0 if k[-1] in ("logits", "bias") else 0.1
            flat[k] = v + jnp.asarray(scale * rng.standard_normal(v.shape), v.dtype)
    return flax.traverse_util.unflatten_dict(flat)


def _with_eos_likelier(model, params) -> dict:
    """The EOS logit scaled up until greedy decoding of _inputs ends some rows early and not
    all (a random model almost never says EOS): the decoders then differ in where they stop."""
    ids, mask, _, task_ids = _inputs(seed=2, batch=6)
    tied = model.config.tie_word_embeddings
    for factor in (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0):
        p = jax.tree.map(lambda x: x, params)
        if tied:
            p["shared"]["embedding"] = p["shared"]["embedding"].at[EOS].multiply(factor)
        else:
            p["lm_head"] = p["lm_head"].at[:, EOS].multiply(factor)
        tokens = decoding.greedy_decode(model, p, ids, mask, task_ids=task_ids,
                                        max_length=MAX_LENGTH)
        ended = np.asarray(tokens == EOS).any(axis=1)
        if ended.any() and not ended.all():
            return p
    raise AssertionError("no EOS scaling ends some rows early and not all")


def _export(root, shape: str, seed: int = 0, hf_overrides=None, eos=False, **plug) -> Exported:
    make_hf_t5(os.path.join(root, "pretrained"), shape, seed=seed, **(hf_overrides or {}))
    model, params = load_hf_t5(os.path.join(root, "pretrained"), ffn_plug=M.MTAConfig(**plug))
    params = _perturbed(params, seed)
    if eos:
        params = _with_eos_likelier(model, params)
    out = os.path.join(root, "export")
    artifact.save_adapters(out, model, params, data=DATA, eval=EVAL)
    artifact.save_backbone(os.path.join(out, fmt.BACKBONE_DIR), model, params)
    return Exported(model, params, out)


def _inputs(seed=0, batch=4):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 96, (batch, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    ids[mask == 0] = 0
    dec = rng.integers(2, 96, (batch, 6)).astype(np.int32)
    return ids, mask, dec, np.arange(batch, dtype=np.int32) % len(TASKS)


def _logits(model, params, ids, mask, dec, task_ids):
    apply = jax.jit(lambda p, ids, dec, mask, task_ids: model.apply(
        {"params": p}, ids, dec, attention_mask=mask, task_ids=task_ids))
    return np.asarray(apply(params, ids, dec, mask, task_ids))


@pytest.fixture(scope="module")
def stage_two(tmp_path_factory):
    return _export(str(tmp_path_factory.mktemp("stage_two")), "v1_1_hf5", **STAGE_TWO)


# --------------------------------------------------------------------------- JAX roundtrip

@pytest.mark.slow  # over 3 s on 2 cores
@pytest.mark.parametrize("shape, plug", [("v1_0", STAGE_ONE), ("v1_1_old", STAGE_TWO)])
def test_roundtrip_gives_the_trained_parameters_and_logits_bit_for_bit(tmp_path, shape, plug):
    ex = _export(str(tmp_path), shape, **plug)
    model, params = load_adapters(os.path.join(ex.dir, "backbone"), ex.dir)
    assert model.config == ex.model.config
    assert jax_tree_equal(params, ex.params)
    args = _inputs()
    np.testing.assert_array_equal(_logits(model, params, *args),
                                  _logits(ex.model, ex.params, *args))


def jax_tree_equal(a, b) -> bool:
    fa, fb = flax.traverse_util.flatten_dict(a), flax.traverse_util.flatten_dict(b)
    return fa.keys() == fb.keys() and all(
        np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype and np.array_equal(fa[k], fb[k])
        for k in fa)


def test_the_artifact_holds_the_mta_parameters_only(stage_two):
    tensors = hf.read_safetensors(os.path.join(stage_two.dir, fmt.ADAPTERS_FILE))
    flat = flax.traverse_util.flatten_dict(stage_two.params)
    assert set(tensors) == {"/".join(k) for k in flat if "mta" in k}
    assert {n.split("/ffn/mta/")[1] for n in tensors} == {
        "selector/logits", "adapters/wi_0", "adapters/wi_1", "adapters/wo",
        "shared_adapters/wi_0", "shared_adapters/wi_1", "shared_adapters/wo",
        "gate_hidden/kernel", "gate_hidden/bias", "gate_out/kernel", "gate_out/bias"}
    meta = fmt.read_meta(stage_two.dir)
    assert M.MTAConfig(**meta["plug"]) == stage_two.model.config.ffn_plug
    assert meta["blocks"] == {"encoder": [1], "decoder": [0]}
    assert meta["task_types"] == list(TASKS) and meta["eval"] == EVAL
    assert meta["backbone"]["config"]["d_model"] == 32 and meta["model"]["tie_word_embeddings"]
    mta_bytes = sum(v.nbytes for v in tensors.values())
    assert os.path.getsize(os.path.join(stage_two.dir, fmt.ADAPTERS_FILE)) < mta_bytes + 4096


def test_the_full_backbone_holds_the_pretrained_ffn_or_the_adapters_mean(stage_two, tmp_path):
    """Where the adapters replaced the FFN, transformers still needs one: the pretrained FFN
    when the run had one, else the mean of the block's task adapters."""
    name = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    read = lambda folder: hf.read_safetensors(os.path.join(folder, hf.WEIGHTS_FILE))
    adapters = stage_two.params["encoder"]["layers_1"]["ffn"]["mta"]["adapters"]["wo"]
    mean_folder = read(os.path.join(stage_two.dir, "backbone"))
    np.testing.assert_allclose(mean_folder[name], np.mean(adapters, axis=0).T, rtol=1e-6)
    pretrained_dir = os.path.join(os.path.dirname(stage_two.dir), "pretrained")
    tensors, origin = hf.read_weights(pretrained_dir)
    pretrained = flax.traverse_util.flatten_dict(
        hf.hf_to_backbone(tensors, stage_two.model.config, origin))
    assert artifact.save_backbone(tmp_path, stage_two.model, stage_two.params,
                                  pretrained=pretrained) == "pretrained FFN"
    np.testing.assert_array_equal(read(tmp_path)[name], tensors[name])
    np.testing.assert_array_equal(read(tmp_path)["shared.weight"], mean_folder["shared.weight"])


# --------------------------------------------------------------------------- the digest

def _rewrite(path, change):
    tensors = {k: np.array(v) for k, v in hf.read_safetensors(path).items()}
    change(tensors)
    hf.write_safetensors(path, tensors)


def _copy_backbone(ex: Exported, tmp_path) -> str:
    folder = str(tmp_path / "backbone")
    shutil.copytree(os.path.join(ex.dir, "backbone"), folder)
    return folder


def test_a_different_backbone_is_refused_and_the_flag_accepts_it(stage_two, tmp_path):
    folder = _copy_backbone(stage_two, tmp_path)
    weights = os.path.join(folder, hf.WEIGHTS_FILE)
    _rewrite(weights, lambda t: t["decoder.final_layer_norm.weight"].__setitem__(0, 1.5))
    with pytest.raises(CheckpointFormatError) as e:
        load_adapters(folder, stage_two.dir)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"{folder}: these backbone weights (sha256:")
    assert "accept_other_backbone" in str(e.value)
    _, params = load_adapters(folder, stage_two.dir, accept_other_backbone=True)
    assert float(params["decoder"]["final_layer_norm"]["scale"][0]) == 1.5


def test_the_digest_skips_the_stand_in_ffn_and_copies(stage_two, tmp_path):
    """The FFN a --full folder holds where the adapters replaced it is never read: another one
    there is the same backbone; so is a folder without the embedding copies."""
    folder = _copy_backbone(stage_two, tmp_path)

    def change(t):
        t["encoder.block.1.layer.1.DenseReluDense.wo.weight"] += 1.0
        t["decoder.block.0.layer.2.DenseReluDense.wi_0.weight"] += 1.0
        t["encoder.embed_tokens.weight"] = t["shared.weight"]

    _rewrite(os.path.join(folder, hf.WEIGHTS_FILE), change)
    _, params = load_adapters(folder, stage_two.dir)
    assert jax_tree_equal(params, stage_two.params)


def test_a_backbone_of_another_shape_names_the_field(stage_two, tmp_path):
    folder = _copy_backbone(stage_two, tmp_path)
    config = json.load(open(os.path.join(folder, "config.json")))
    config["layer_norm_epsilon"] = 1e-5
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(CheckpointFormatError, match=r"config.json has layer_norm_epsilon=1e-05; "
                       r"the adapters in .* were trained on a backbone with "
                       r"layer_norm_epsilon=1e-06$"):
        load_adapters(folder, stage_two.dir, accept_other_backbone=True)


# --------------------------------------------------------------------------- errors

ADAPTER = "encoder/layers_1/ffn/mta/adapters/wo"


def _break(kind, art):
    adapters, config = os.path.join(art, fmt.ADAPTERS_FILE), os.path.join(art, fmt.CONFIG_FILE)
    if kind in ("no adapters", "no config"):
        os.remove(adapters if kind == "no adapters" else config)
    elif kind == "version":
        meta = json.load(open(config))
        meta["format_version"] = 99
        json.dump(meta, open(config, "w"))
    elif kind == "shape":
        _rewrite(adapters, lambda t: t.__setitem__(ADAPTER, t[ADAPTER][:, :-1]))
    elif kind == "missing":
        _rewrite(adapters, lambda t: t.pop(ADAPTER))
    elif kind == "unexpected":
        _rewrite(adapters, lambda t: t.__setitem__("decoder/layers_1/ffn/mta/adapters/wo",
                                                   t[ADAPTER]))


ERRORS = [
    ("no adapters", r"/mta_adapters.safetensors: missing \(an adapter artifact holds "),
    ("no config", r"/mta_config.json: missing \(an adapter artifact holds "),
    ("version", r"/mta_config.json: format_version 99 is not one this mta_jax reads \(1\)"),
    ("shape", rf"/mta_adapters.safetensors: tensor {ADAPTER} has shape \(3, 47, 32\), the "
              r"model mta_config.json describes expects \(3, 48, 32\)$"),
    ("missing", rf"/mta_adapters.safetensors: missing tensor {ADAPTER} \(shape \(3, 48, 32\)\)$"),
    ("unexpected", r"/mta_adapters.safetensors: unexpected tensor "
                   r"decoder/layers_1/ffn/mta/adapters/wo \(not a parameter"),
]


@pytest.mark.parametrize("kind, message", ERRORS, ids=[e[0] for e in ERRORS])
def test_each_artifact_error_is_one_line_naming_the_file_and_tensor(stage_two, tmp_path, kind,
                                                                    message):
    art = str(tmp_path / "art")
    shutil.copytree(stage_two.dir, art)
    _break(kind, art)
    with pytest.raises(CheckpointFormatError, match=message) as e:
        load_adapters(os.path.join(art, "backbone"), art)
    assert "\n" not in str(e.value) and str(e.value).startswith(art)


@pytest.mark.slow  # spawns a process
def test_the_cli_prints_the_error_as_one_line(stage_two, tmp_path):
    art = str(tmp_path / "art")
    shutil.copytree(stage_two.dir, art)
    _break("shape", art)
    (tmp_path / "in.jsonl").write_text('{"input": "x", "target": "y", "type": "a"}\n')
    out = subprocess.run(
        [sys.executable, "-m", "mta_jax.predict", f"--adapters={art}",
         f"--input={tmp_path}/in.jsonl", f"--output={tmp_path}/out.jsonl"], cwd=ROOT,
        capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: {art}/mta_adapters.safetensors: tensor {ADAPTER} has shape (3, 47, 32), the "
        "model mta_config.json describes expects (3, 48, 32)")


# --------------------------------------------------------------------------- PyTorch

@pytest.mark.slow  # spawns a process
def test_mta_jax_torch_imports_no_jax():
    pytest.importorskip("torch", reason=TORCH_REASON)
    code = ("import sys, mta_jax.torch; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'flax', 'optax'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# transformers 5.24's generate sizes its key/value cache by the encoder's depth, so a deeper
# decoder fails there with or without MTA: v1_1_hf5 keeps its shape but 2 decoder blocks.
SAME_DEPTH = {"num_decoder_layers": 2}
TORCH_CASES = {  # between them, every option the PyTorch block follows
    "v1_0-stage1": ("v1_0", None, STAGE_ONE),
    "v1_1_hf5-stage2-start_token-renormalize-gather-2shared": (
        "v1_1_hf5", SAME_DEPTH, dict(STAGE_TWO, selector="start_token", renormalize=True,
                                     topk_compute="gather", num_shared_adapters=2)),
    "v1_1_old-stage2-bottleneck-top1": (
        "v1_1_old", None, dict(STAGE_TWO, adapter_kind="bottleneck", top_k=1)),
    # The released stage two (configs/alter.py:released): own adapters, a d_model-wide gate
    # without biases, several shared adapters.
    "v1_0-stage2-released-own-gate": (
        "v1_0", None, dict(STAGE_TWO, stage2_selection="own", top_k=2, gate_hidden_dim=0,
                           gate_bias=False, num_shared_adapters=3)),
}


def _hf_tokens(tokens, length):
    """Hugging Face output (start token first, maybe shorter) -> our layout, pad after EOS."""
    tokens = np.asarray(tokens)[:, 1:]
    out = np.zeros((len(tokens), length), np.int32)
    out[:, : tokens.shape[1]] = tokens
    ended = np.cumsum(out == EOS, axis=1) - (out == EOS) > 0
    return np.where(ended, 0, out)


@pytest.mark.slow  # over 3 s on 2 cores
@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_pytorch_runtime_matches_the_jax_model(tmp_path, case):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    import transformers

    pytest.importorskip("torch", reason=TORCH_REASON)
    from mta_jax.torch import load_mta_t5

    shape, hf_overrides, plug = TORCH_CASES[case]
    ex = _export(str(tmp_path), shape, seed=1, hf_overrides=hf_overrides, eos=True, **plug)
    theirs = load_mta_t5(os.path.join(ex.dir, "backbone"), ex.dir)
    assert isinstance(theirs, transformers.T5ForConditionalGeneration)
    ids, mask, dec, task_ids = _inputs(seed=2, batch=6)
    t = lambda x: torch.tensor(np.asarray(x), dtype=torch.long)
    with torch.no_grad():
        logits = theirs(input_ids=t(ids), attention_mask=t(mask), decoder_input_ids=t(dec),
                        task_ids=t(task_ids)).logits.numpy()
        greedy = theirs.generate(input_ids=t(ids), attention_mask=t(mask), task_ids=t(task_ids),
                                 num_beams=1, max_new_tokens=MAX_LENGTH, output_logits=True,
                                 return_dict_in_generate=True)
        beam = theirs.generate(input_ids=t(ids), attention_mask=t(mask), task_ids=t(task_ids),
                               num_beams=3, max_new_tokens=MAX_LENGTH, length_penalty=0.6,
                               output_scores=True, return_dict_in_generate=True)
    assert np.abs(logits - _logits(ex.model, ex.params, ids, mask, dec, task_ids)).max() <= 1e-4
    # Each cached step's logits (stage two: the gate kept from position 0) are those of one
    # full pass over the same decoder inputs.
    steps = np.stack([x.numpy() for x in greedy.logits], axis=1)  # [b, steps, vocab]
    full = _logits(ex.model, ex.params, ids, mask,
                   greedy.sequences[:, :-1].numpy().astype(np.int32), task_ids)
    assert np.abs(steps - full).max() <= 1e-4
    ours_greedy = np.asarray(decoding.greedy_decode(ex.model, ex.params, ids, mask,
                                                    task_ids=task_ids, max_length=MAX_LENGTH))
    np.testing.assert_array_equal(_hf_tokens(greedy.sequences, MAX_LENGTH), ours_greedy)
    ours_beam, ours_scores = decoding.beam_search(ex.model, ex.params, ids, mask,
                                                  task_ids=task_ids, max_length=MAX_LENGTH,
                                                  beam_size=3, length_penalty=0.6)
    np.testing.assert_array_equal(_hf_tokens(beam.sequences, MAX_LENGTH), np.asarray(ours_beam))
    np.testing.assert_allclose(beam.sequences_scores.numpy(), ours_scores, atol=1e-4, rtol=0)


def test_pytorch_top_k_keeps_the_adapters_jax_keeps_among_equal_weights():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)

    from mta_jax.torch import adapter_weights

    # Rows of the released initialisation (ties of init_base and of init_base + init_bias)
    # and a uniform row: lax.top_k keeps the lower index among equal weights.
    logits = np.asarray([[0.22, 0.22, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2, 0.22, 0.22],
                         [0.2] * 5, [0.2, 0.22, 0.2, 0.2, 0.22]], np.float32)
    for k in (1, 2, 3, 4):
        plug = {"temperature": 0.1, "top_k": k, "renormalize": True}
        theirs = adapter_weights(torch.tensor(logits), plug).numpy()
        ours = np.asarray(M.top_k_weights(jax.nn.softmax(logits / 0.1), k, True))
        np.testing.assert_array_equal(theirs > 0, ours > 0)
        np.testing.assert_allclose(theirs, ours, rtol=1e-6)


def test_pytorch_runtime_refuses_what_load_adapters_refuses(stage_two, tmp_path):
    pytest.importorskip("torch", reason=TORCH_REASON)
    from mta_jax.torch import load_mta_t5

    folder = _copy_backbone(stage_two, tmp_path)
    _rewrite(os.path.join(folder, hf.WEIGHTS_FILE),
             lambda t: t["shared.weight"].__setitem__((3, 3), 9.0))
    with pytest.raises(CheckpointFormatError, match=rf"^{folder}: these backbone weights"):
        load_mta_t5(folder, stage_two.dir)
    load_mta_t5(folder, stage_two.dir, accept_other_backbone=True)
    art = str(tmp_path / "art")
    shutil.copytree(stage_two.dir, art)
    _break("shape", art)
    with pytest.raises(CheckpointFormatError, match=ERRORS[3][1]):
        load_mta_t5(os.path.join(art, "backbone"), art)


def test_pytorch_runtime_needs_task_ids_in_range(stage_two):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)

    pytest.importorskip("torch", reason=TORCH_REASON)
    from mta_jax.torch import load_mta_t5

    model = load_mta_t5(os.path.join(stage_two.dir, "backbone"), stage_two.dir)
    ids = torch.ones((2, 5), dtype=torch.long)
    with pytest.raises(ValueError, match=r"task_ids \(int\[batch\], ids into model.task_types\) "
                                         r"is required"):
        model(input_ids=ids, decoder_input_ids=ids)
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 4\)"):
        model(input_ids=ids, decoder_input_ids=ids, task_ids=torch.tensor([0, 4]))
    assert model.task_types == TASKS and model.generation_config.num_beams == 3
