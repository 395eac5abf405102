"""The released code's variant (configs/alter.py:released) pinned to the released formulas.

tests/released_torch.py transcribes the authors' classes in PyTorch (the stage-one mixture of
`MTA_noisegate`, the stage two of `MTA_sharemoe4`); fed the weights of our Flax MTABlock, they
must give its outputs. The data tests call the tokenizer the way the released train.py and
predict.py call it, and compare.
"""
import json
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import alter
from mta_jax import build, data, decoding, evaluation, load_hf_t5, scoring
from mta_jax.data import tokenize
from mta_jax.errors import ConfigError
from mta_jax.models import mta as M
from mta_jax.models import t5 as t5_lib
from tests.helpers import TORCH_REASON, TINY_T5, init_params, make_hf_t5, random_inputs
from tests.integration import tiny

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "alter_small.jsonl"
RELU_T5 = TINY_T5.replace(feed_forward_proj="relu")  # the released T5-base FFN
TEMPERATURE = 0.1


# ----------------------------------------------------------------------------- the block

def _block(plug: M.MTAConfig, types, seed=0):
    """(jitted apply(params, x, task_ids), params, x [6, 5, 16], task ids) of one MTABlock."""
    block = M.MTABlock(RELU_T5, plug)
    x = jax.random.normal(jax.random.PRNGKey(seed), (6, 5, RELU_T5.d_model))
    task_ids = jnp.asarray([plug.task_types.index(t) for t in types], jnp.int32)
    ctx = lambda ids: t5_lib.FfnContext(ids, None, False, None)
    init = jax.jit(lambda rng: block.init(rng, x, ctx(task_ids), deterministic=True))
    params = flax.linen.unbox(init(jax.random.PRNGKey(seed + 1)))["params"]
    # Learned-looking selector logits: around the biased start, the order of adapters changed.
    noise = jax.random.normal(jax.random.PRNGKey(seed + 2), params["selector"]["logits"].shape)
    params["selector"]["logits"] = params["selector"]["logits"] + 0.1 * noise
    apply = jax.jit(lambda p, x, ids: block.apply({"params": p}, x, ctx(ids), deterministic=True))
    return apply, jax.tree.map(np.asarray, params), x, task_ids


def _torch_out(module, x, types):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)

    with torch.no_grad():
        return module(torch.tensor(np.asarray(x)), list(types)).numpy()


def test_stage_one_is_the_released_noisegate_mixture():
    types = ["classify", "nli", "generate", "generate", "classify", "nli"]  # the released three
    apply, params, x, task_ids = _block(M.MTAConfig(), types)
    table = params["selector"]["logits"]
    rows = {t: table[M.MTAConfig().task_types.index(t)] for t in set(types)}
    pytest.importorskip("torch", reason=TORCH_REASON)
    from tests import released_torch

    ours = np.asarray(apply(params, x, task_ids))
    released = released_torch.ReleasedStageOne(params, rows, TEMPERATURE)
    np.testing.assert_allclose(ours, _torch_out(released, x, types), atol=1e-5, rtol=0)


@pytest.mark.slow  # over 3 s on 2 cores
@pytest.mark.parametrize("compute", ["dense", "gather"])
@pytest.mark.parametrize("num_shared", [1, 3])
def test_stage_two_own_selection_and_gate_are_the_released_sharemoe(compute, num_shared):
    pytest.importorskip("torch", reason=TORCH_REASON)
    from tests import released_torch

    plug = M.MTAConfig(num_adapters=4, task_types=released_torch.SHAREMOE4_TYPES, top_k=2,
                       stage2_selection="own", num_shared_adapters=num_shared,
                       gate_hidden_dim=0, gate_bias=False, topk_compute=compute)
    types = ["classify", "nli", "generate", "nli", "generate", "classify"]
    apply, params, x, task_ids = _block(plug, types)
    d = RELU_T5.d_model
    assert params["gate_hidden"]["kernel"].shape == ((1 + num_shared) * d, d)
    assert set(params["gate_hidden"]) == set(params["gate_out"]) == {"kernel"}
    weights = jax.nn.softmax(params["selector"]["logits"] / TEMPERATURE)[np.asarray(task_ids)]
    top2 = np.argsort(-np.asarray(weights), axis=1)[:, :2]
    own = plug.own_adapters()[np.asarray(task_ids)]
    assert any(set(a) != set(b) for a, b in zip(top2, own)), "top-k must differ from own here"

    ours = np.asarray(apply(params, x, task_ids))
    released = _torch_out(released_torch.ReleasedShareMoE(
        params, params["selector"]["logits"], TEMPERATURE), x, types)
    np.testing.assert_allclose(ours, released, atol=1e-5, rtol=0)


def test_defaults_keep_the_top_k_selection_and_the_biased_gate_of_width_128():
    plug = M.MTAConfig(top_k=2, num_shared_adapters=1)
    _, params, _, _ = _block(plug, ["classify"] * 6)
    assert params["gate_hidden"]["kernel"].shape == (2 * RELU_T5.d_model, 128)
    assert params["gate_hidden"]["bias"].shape == (128,)
    assert params["gate_out"]["bias"].shape == (2,)
    w = np.asarray(jax.nn.softmax(jnp.asarray([[0.1, 0.5, 0.2, 0.4, 0.3]]) / TEMPERATURE))
    kept = np.asarray(M.select_adapters(jnp.asarray(w), jnp.asarray([0]), plug))
    assert set(np.flatnonzero(kept[0])) == {1, 3}  # top-2, not classify's own {0, 1}
    own = np.asarray(M.select_adapters(jnp.asarray(w), jnp.asarray([0]),
                                       M.MTAConfig(top_k=2, stage2_selection="own")))
    np.testing.assert_array_equal(own[0], [w[0, 0], w[0, 1], 0, 0, 0])  # not renormalised


@pytest.mark.parametrize("changes, field", [
    (dict(stage2_selection="mine"), "mta.stage2_selection"),
    (dict(stage2_selection="own", top_k=3), "mta.top_k"),
    (dict(stage2_selection="own", selector="start_token"), "mta.selector"),
    (dict(gate_hidden_dim=-1), "mta.gate_hidden_dim"),
])
def test_bad_released_options_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        M.MTAConfig(**changes)


@pytest.mark.slow  # over 3 s on 2 cores
def test_own_selection_decodes_as_full_passes_with_dense_and_gather():
    ids, _, task_ids = random_inputs(batch=4, seed=3)
    decoded = {}
    for compute in ("dense", "gather"):
        plug = M.MTAConfig(encoder_layers="last", decoder_layers="last", top_k=2,
                           stage2_selection="own", num_shared_adapters=1, gate_hidden_dim=0,
                           gate_bias=False, topk_compute=compute)
        model = t5_lib.T5(TINY_T5.replace(ffn_plug=plug))
        params = init_params(model)
        tokens = np.asarray(decoding.greedy_decode(model, params, ids, task_ids=task_ids,
                                                   max_length=6))
        # A greedy sequence is the argmax of one teacher-forced pass over itself (up to its
        # EOS): the cached steps, the gate read once at position 0, computed a full pass.
        start = np.zeros((len(tokens), 1), np.int32)
        logits = jax.jit(model.apply)({"params": params}, ids,
                                      np.concatenate([start, tokens[:, :-1]], 1), task_ids=task_ids)
        after_eos = np.cumsum(tokens == 1, axis=1) - (tokens == 1) > 0
        np.testing.assert_array_equal(np.where(after_eos, 0, np.argmax(logits, -1)), tokens)
        decoded[compute] = tokens
    np.testing.assert_array_equal(decoded["dense"], decoded["gather"])


# ----------------------------------------------------------------------------- data, decoding

def _released_lengths_config():
    config = alter.get_config("released,steps=1")
    config.data.tokenizer = "byt5"
    return config


def test_lengths_cut_where_the_released_scripts_cut():
    config = _released_lengths_config()
    tok = data.get_tokenizer("byt5")
    words = " ".join(f"w{i}" for i in range(400))  # 1,889 bytes: beyond 512 and 768
    examples = [dict(input=words, target=words[:300], type="classify", task="t"),
                dict(input="short input", target="short", type="nli", task="t")]
    report = data.DataReport("train", "test")
    train = tokenize.tokenize_with_config(examples, tok, config.data, data.TASK_TYPES, report)
    infer = tokenize.tokenize_with_config(examples, tok, config.data, data.TASK_TYPES, report,
                                               inference=True)
    start = tok.convert_tokens_to_ids("<e>")
    for row, ex in enumerate(examples):
        ours, ours_infer = train.features(row), infer.features(row)
        # train.py: source max_length 512 padded; target max_length 64 - 1, then <e> in front.
        source = tok([ex["input"]], max_length=512, truncation=True, padding="max_length")
        np.testing.assert_array_equal(ours["input_ids"], source["input_ids"][0])
        np.testing.assert_array_equal(ours["attention_mask"], source["attention_mask"][0])
        target = tok([ex["target"]], max_length=63, truncation=True, padding="max_length")
        y = np.concatenate([[start], target["input_ids"][0]])
        np.testing.assert_array_equal(ours["decoder_input_ids"], y[:-1])
        labels = np.where(y[1:] == tok.pad_token_id, -100, y[1:])  # train.py's lm_labels
        np.testing.assert_array_equal(
            np.where(ours["decoder_attention_mask"] == 1, ours["labels"], -100), labels)
        # predict.py: max_length 768, padding to the batch's longest (one example a batch).
        source = tok([ex["input"]], max_length=768, truncation=True, padding=True)["input_ids"][0]
        n = int(ours_infer["attention_mask"].sum())
        np.testing.assert_array_equal(ours_infer["input_ids"][:n], source)
        assert n == len(source) and not ours_infer["input_ids"][n:].any()
        assert ours_infer["decoder_input_ids"][0] == tok.pad_token_id
    assert len(train.features(0)["input_ids"]) == 512 and len(infer.features(0)["input_ids"]) == 768


def test_decode_length_counts_as_generate_max_length_minus_the_start_token(tmp_path):
    """The released generate(max_length=128, num_beams=4, length_penalty=0.6) is our beam
    search with max_decode_length 127: checked at a length a tiny model reaches."""
    config = _released_lengths_config()
    assert config.eval.max_decode_length == 128 - 1
    torch = pytest.importorskip("torch", reason=TORCH_REASON)

    hf = make_hf_t5(str(tmp_path), "v1_0", seed=2)
    model, params = load_hf_t5(str(tmp_path))
    ids = np.random.default_rng(0).integers(2, 96, (3, 7)).astype(np.int32)
    with torch.no_grad():
        theirs = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long), max_length=6,
                             num_beams=4, length_penalty=0.6).numpy()
    assert theirs.shape[1] == 6 and (theirs[:, 1:] != 1).all(), "no early EOS at this seed"
    decode = decoding.make_decoder(model, method=config.eval.decode, max_length=6 - 1,
                                   beam_size=config.eval.beam_size,
                                   length_penalty=config.eval.length_penalty)
    np.testing.assert_array_equal(np.asarray(decode(params, ids, np.ones_like(ids))),
                                  theirs[:, 1:])


@pytest.fixture(scope="module")
def released_setup(tmp_path_factory):
    """A tiny run with the released decoder start and anaphora pooling, on the JSON fixture."""
    config = tiny.tiny_config(**{
        "data.source": "jsonl", "data.train_path": str(FIXTURE), "data.eval_path": str(FIXTURE),
        "data.train_decoder_start": "<e>", "eval.pool_anaphora": True,
        "data.eval_max_examples": 0, "stages": ("stage1",)})
    setup = build.make_setup(config)
    return setup, setup.stage("stage1"), tmp_path_factory.mktemp("run")


def test_training_starts_the_decoder_from_e_and_decoding_from_pad(released_setup):
    setup, stage, _ = released_setup
    tok, config = setup.tokenizer, setup.config
    e = tok.convert_tokens_to_ids("<e>")
    assert setup.train_decoder_start_id == e == 384 and len(tok) == 385  # ByT5 had 384 ids
    assert stage.model.config.vocab_size > e  # the random model is sized with <e>
    batch = next(data.build_train_pipeline(config.data, tokenizer=tok, task_types=setup.task_types,
                                           batch_size=8, seed=0, process_index=0,
                                           process_count=1).iterator)
    assert (batch["decoder_input_ids"][:, 0] == e).all()
    assert not (batch["labels"] == e).any()
    np.testing.assert_array_equal(batch["decoder_input_ids"][:, 1:], batch["labels"][:, :-1])
    eval_batch, _ = next(data.build_eval_set(config.data, tokenizer=tok,
                                             task_types=setup.task_types).batches(4))
    assert (eval_batch["decoder_input_ids"][:, 0] == tok.pad_token_id).all()
    assert stage.model.config.decoder_start_token_id == tok.pad_token_id  # decoding's first input
    # The model has rows the tokenizer has no id for (512 > 385): they decode to nothing.
    assert decoding.decode_texts(np.array([[e, 104, 400, 105, 1, 106]]), tok) == ["ef"]


@pytest.mark.slow  # over 3 s on 2 cores
def test_evaluation_pools_anaphora_into_classify_when_configured(released_setup):
    setup, stage, workdir = released_setup
    params = build.initial_params(setup, stage, str(workdir))
    evaluator = evaluation.Evaluator.for_config(setup.config, stage.model, setup.tokenizer,
                                                out_dir=str(workdir), name="stage1")
    scores = evaluator.run(params, 0)
    assert "eval/anaphora_resolution/score" not in scores
    assert scores["eval/classify/count"] == 10 + 3  # the fixture's classify and anaphora lines
    rows = [json.loads(line) for line in
            open(workdir / "predictions_0.jsonl", encoding="utf-8")]
    expected = scoring.score([r["prediction"] for r in rows], [r["target"] for r in rows],
                             [r["type"] for r in rows], pool_anaphora=True)
    assert scores["eval/score"] == pytest.approx(expected["score"], abs=1e-12)


def test_a_decoder_start_outside_the_vocabulary_names_the_field():
    config = tiny.tiny_config(**{"data.train_decoder_start": "600", "stages": ("stage1",)})
    setup = build.make_setup(config)  # ByT5: 384 ids, a random model of 384 rows
    with pytest.raises(ConfigError, match="data.train_decoder_start"):
        setup.stage("stage1")


# ----------------------------------------------------------------------------- the config

def test_released_config_turns_every_option_on_with_steps_from_the_file(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(line for line in open(FIXTURE, encoding="utf-8")) + "\n")  # 30 + blank
    config = alter.get_config(f"released,train={train},eval={FIXTURE}")
    assert config.stage1.num_train_steps == config.stage2.num_train_steps == 8  # ceil(30 / 4)
    assert (config.init_from, config.train.batch_size, config.stage1.learning_rate) == (
        "t5-base", 4, 1e-4)
    assert (config.stage1.optimizer, config.stage1.schedule, config.stage1.weight_decay) == (
        "adamw", "constant", 0.0)
    d, e = config.data, config.eval
    assert (d.max_source_length, d.eval_max_source_length, d.max_target_length) == (512, 768, 63)
    assert (d.train_decoder_start, e.max_decode_length, e.pool_anaphora) == ("<e>", 127, True)
    plug = build.validate_config(config)["stage2"]
    assert (plug.stage2_selection, plug.top_k, plug.renormalize) == ("own", 2, False)
    assert (plug.num_shared_adapters, plug.gate_hidden_dim, plug.gate_bias) == (3, 0, False)
    large = alter.get_config(f"released,train={train},model=t5-large")
    assert (large.init_from, large.train.batch_size, large.stage1.learning_rate) == (
        "t5-large", 1, 3e-5)
    assert large.stage1.num_train_steps == 10 * 30  # 10 epochs at batch 1
    assert alter.get_config(f"released,train={train},epochs=3").stage1.num_train_steps == 24
    assert alter.get_config("released,steps=7").stage2.num_train_steps == 7
    with pytest.raises(ValueError, match="train=<file>"):
        alter.get_config("released")
    with pytest.raises(ValueError, match="epoch"):
        alter.get_config("released,epoch=2")
