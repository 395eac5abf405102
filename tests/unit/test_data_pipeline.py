"""The training iterator and the eval set: layout, static shapes, resumption, host split."""

import json
import logging
import pathlib

import numpy as np
import pytest
import transformers

from mta_jax import data

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "alter_small.jsonl"
KEYS = {
    "input_ids",
    "attention_mask",
    "decoder_input_ids",
    "labels",
    "decoder_attention_mask",
    "task_ids",
}
PREFIX_TYPE = {
    "polarity:": "classify",
    "relation:": "nli",
    "lookup:": "mrc",
    "opposite:": "generate",
}


@pytest.fixture(scope="module")
def tokenizer():
    return data.get_tokenizer("byt5")


def _cfg(**overrides):
    cfg = data.get_data_config()
    cfg.synthetic_train_size, cfg.synthetic_eval_size = 40, 10
    cfg.update(overrides)
    return cfg


def _pipeline(tokenizer, cfg=None, batch_size=8, seed=0, process_index=0, process_count=1):
    return data.build_train_pipeline(
        cfg or _cfg(),
        tokenizer=tokenizer,
        task_types=data.TASK_TYPES,
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )


def _text(ids):
    """ByT5 ids -> text, without pad, EOS or sentinels."""
    return bytes(int(i) - 3 for i in ids if 3 <= i < 259).decode("utf-8")


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _inputs(batches):
    return [_text(row) for b in batches for row in b["input_ids"]]


def test_batch_layout_follows_hugging_face_t5(tokenizer):
    batches = _take(_pipeline(tokenizer).iterator, 7)  # crosses the 5-batch epoch
    for b in batches:
        assert set(b) == KEYS
        assert all(v.dtype == np.int32 for v in b.values())
        assert b["input_ids"].shape == b["attention_mask"].shape == (8, 40)
        assert b["labels"].shape == b["decoder_input_ids"].shape == (8, 16)
        assert b["decoder_attention_mask"].shape == (8, 16) and b["task_ids"].shape == (8,)
        np.testing.assert_array_equal(b["attention_mask"], b["input_ids"] != 0)
        np.testing.assert_array_equal(b["decoder_input_ids"][:, 0], 0)  # start = pad id
        np.testing.assert_array_equal(b["decoder_input_ids"][:, 1:], b["labels"][:, :-1])
        lengths = b["decoder_attention_mask"].sum(1)
        np.testing.assert_array_equal(b["labels"][np.arange(8), lengths - 1], 1)  # EOS
        np.testing.assert_array_equal(b["decoder_attention_mask"], b["labels"] != 0)
        for text, task_id in zip(_inputs([b]), b["task_ids"]):
            assert data.TASK_TYPES[task_id] == PREFIX_TYPE[text.split()[0]]


def test_infinite_and_reshuffled_every_epoch(tokenizer):
    train = sorted(e["input"] for e in data.synthetic_examples("train", 40, 0))
    epochs = [
        _inputs(_take(_pipeline(tokenizer).iterator, 15)[5 * k : 5 * k + 5]) for k in range(3)
    ]
    for epoch in epochs:
        assert sorted(epoch) == train  # every example exactly once per epoch
    assert len({tuple(epoch) for epoch in epochs}) == 3  # three different orders
    assert _inputs(_take(_pipeline(tokenizer, seed=1).iterator, 5)) != epochs[0]


def test_restored_iterator_yields_exactly_the_uninterrupted_batches(tokenizer):
    uninterrupted = _pipeline(tokenizer).iterator
    _take(uninterrupted, 3)
    state = json.loads(json.dumps(uninterrupted.get_state()))  # as a checkpoint stores it
    expected = _take(uninterrupted, 9)  # crosses two epoch boundaries
    resumed = _pipeline(tokenizer).iterator
    resumed.set_state(state)
    for want, got in zip(expected, _take(resumed, 9)):
        for key in KEYS:
            np.testing.assert_array_equal(want[key], got[key])


def test_state_from_another_pipeline_is_refused(tokenizer):
    state = _pipeline(tokenizer, seed=0).iterator.get_state()
    other = _pipeline(tokenizer, seed=1).iterator
    with pytest.raises(data.DataError, match="different input pipeline .*seed 0 -> 1"):
        other.set_state(state)
    with pytest.raises(data.DataError, match="not a data iterator state"):
        other.set_state({"next_index": 3})


def test_processes_split_the_global_batch(tokenizer):
    global_batches = _take(_pipeline(tokenizer, batch_size=8).iterator, 6)
    shards = [
        _take(_pipeline(tokenizer, batch_size=8, process_index=p, process_count=2).iterator, 6)
        for p in range(2)
    ]
    for k, whole in enumerate(global_batches):
        assert shards[0][k]["input_ids"].shape == (4, 40)
        for p in range(2):
            np.testing.assert_array_equal(shards[p][k]["input_ids"], whole["input_ids"][p::2])
    with pytest.raises(data.DataError, match="multiple of the process count 3"):
        _pipeline(tokenizer, batch_size=8, process_index=0, process_count=3)


def _expected_rates(sizes, kind, temperature=1.0, cap=0):
    n = np.array([min(s, cap) if cap else s for s in sizes.values()], float)
    w = {"proportional": n, "equal": np.ones_like(n), "temperature": n ** (1 / temperature)}[kind]
    return dict(zip(sizes, w / w.sum()))


@pytest.mark.parametrize(
    "kind,temperature,cap",
    [
        ("proportional", 1.0, 0),
        ("equal", 1.0, 0),
        ("temperature", 3.0, 0),
        ("proportional", 1.0, 45),
    ],
)
def test_realised_mixture_rates_match_the_requested_ones(tokenizer, kind, temperature, cap):
    cfg = _cfg(
        synthetic_train_size=200, mixture=kind, mixture_temperature=temperature, mixture_cap=cap
    )
    pipe = _pipeline(tokenizer, cfg, batch_size=10)
    sizes = dict(pipe.report.kept)
    assert sizes == {
        "synthetic/polarity": 70,
        "synthetic/relation": 60,
        "synthetic/lookup": 30,
        "synthetic/opposite": 40,
    }
    want = _expected_rates(sizes, kind, temperature, cap)
    assert pipe.report.mixture["rates"] == pytest.approx(want)
    type_of = {t: data.TASKS[t].task_type for t in sizes}
    task_ids = np.concatenate([b["task_ids"] for b in _take(pipe.iterator, 47)])  # 470 examples
    for task, rate in want.items():
        realised = np.mean(task_ids == data.TASK_TYPES.index(type_of[task]))
        assert realised == pytest.approx(rate, abs=0.03), task
    epoch = pipe.report.mixture["epoch_size"]
    assert epoch == sum(min(n, cap) if cap else n for n in sizes.values())
    assert sum(pipe.report.mixture["epoch_counts"].values()) == epoch


def test_truncation_is_counted_and_eos_kept(tokenizer):
    cfg = _cfg(max_source_length=12, max_target_length=5)
    pipe = _pipeline(tokenizer, cfg)
    train = data.synthetic_examples("train", 40, 0)
    long_inputs = sum(len(e["input"].encode()) > 11 for e in train)
    long_targets = sum(len(e["target"].encode()) > 4 for e in train)
    assert sum(pipe.report.truncated_inputs.values()) == long_inputs > 0
    assert sum(pipe.report.truncated_targets.values()) == long_targets > 0
    batch = next(pipe.iterator)
    assert batch["input_ids"].shape == (8, 12) and batch["labels"].shape == (8, 5)
    assert (batch["labels"].max(1) > 0).all()
    full = batch["decoder_attention_mask"].sum(1) == 5
    np.testing.assert_array_equal(batch["labels"][full, -1], 1)


def test_start_token_is_prepended(tokenizer):
    batch = next(_pipeline(tokenizer, _cfg(start_token=True)).iterator)
    np.testing.assert_array_equal(batch["input_ids"][:, 0], 383)  # <extra_id_124>, ByT5's last
    batch = next(_pipeline(tokenizer, _cfg(start_token=True, start_token_id=300)).iterator)
    np.testing.assert_array_equal(batch["input_ids"][:, 0], 300)
    assert all(text.split()[0] in PREFIX_TYPE for text in _inputs([batch]))


def test_eval_batches_have_fixed_shapes_and_masked_padding(tokenizer):
    eval_set = data.build_eval_set(_cfg(), tokenizer=tokenizer, task_types=data.TASK_TYPES)
    assert len(eval_set) == 10
    batches = list(eval_set.batches(4))
    assert [b["example_mask"].tolist() for b, _ in batches] == [[1] * 4, [1] * 4, [1, 1, 0, 0]]
    assert [e for _, chunk in batches for e in chunk] == eval_set.examples
    for batch, chunk in batches:
        assert batch["input_ids"].shape == (4, 40) and batch["labels"].shape == (4, 16)
        for row, example in zip(batch["labels"], chunk):
            assert _text(row) == example["target"]
    train_inputs = {e["input"] for e in data.synthetic_examples("train", 40, 0)}
    assert not train_inputs & {e["input"] for e in eval_set.examples}


def test_eval_max_examples_caps_each_task(tokenizer):
    eval_set = data.build_eval_set(
        _cfg(eval_max_examples=1), tokenizer=tokenizer, task_types=data.TASK_TYPES
    )
    assert sorted(e["task"] for e in eval_set.examples) == sorted(data.synthetic.TASKS)
    assert eval_set.report.filtered["over_max_examples"] == 6


def test_jsonl_source_end_to_end(tokenizer):
    cfg = _cfg(
        source="jsonl",
        train_path=str(FIXTURE),
        eval_path=str(FIXTURE),
        max_source_length=64,
        max_target_length=32,
    )
    pipe = _pipeline(tokenizer, cfg, batch_size=6)
    ids = np.concatenate([b["task_ids"] for b in _take(pipe.iterator, 5)])
    assert set(ids.tolist()) == set(range(5))  # one epoch holds every type
    assert pipe.report.truncated_inputs["nli"] == 8
    eval_set = data.build_eval_set(cfg, tokenizer=tokenizer, task_types=data.TASK_TYPES)
    batch, chunk = next(eval_set.batches(30))
    keywords = [i for i, e in enumerate(chunk) if e["input"].startswith("Extract the keywords")]
    assert _text(batch["labels"][keywords[0]]) == "Eiffel Tower，Paris，1889"


def test_report_is_logged(tokenizer, caplog):
    caplog.set_level(logging.INFO)
    pipe = _pipeline(tokenizer)
    assert "synthetic/polarity: kept 14/14" in caplog.text
    assert pipe.report.summary() in caplog.text


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("source", "csv", "config.data.source is 'csv'"),
        ("mixture", "zipf", "config.data.mixture is 'zipf'"),
        ("on_bad_row", "ignore", "config.data.on_bad_row"),
        ("mixture_temperature", 0.0, "config.data.mixture_temperature"),
        ("max_target_length", 1, "max_target_length 1 leaves no room"),
        ("train_path", "", "config.data.train_path is empty"),
    ],
)
def test_bad_config_names_the_field(tokenizer, field, value, match):
    cfg = _cfg(source="jsonl" if field == "train_path" else "synthetic")
    cfg[field] = value
    with pytest.raises(data.DataError, match=match):
        data.validate_data_config(cfg)  # as build.validate_config runs it, before any data
        _pipeline(tokenizer, cfg)


def test_config_missing_a_field_is_named(tokenizer):
    cfg = _cfg()
    del cfg["num_workers"]
    with pytest.raises(data.DataError, match=r"lacks fields \['num_workers'\]"):
        data.validate_data_config(cfg)


def test_every_config_field_has_a_comment():
    source = pathlib.Path(data.config.__file__).read_text()
    for key in data.get_data_config():
        line = next(l for l in source.splitlines() if l.strip().startswith(f"c.{key} ="))
        assert "#" in line, key


def test_tokenizer_by_path_and_clear_error(tmp_path):
    transformers.ByT5Tokenizer().save_pretrained(tmp_path / "tok")
    assert len(data.get_tokenizer(str(tmp_path / "tok"))) == 384
    with pytest.raises(data.DataError, match="tokenizer directory '/nonexistent/t5' .* not exist"):
        data.get_tokenizer("/nonexistent/t5")


_WORKERS_SCRIPT = """
import json, sys
import numpy as np
from absl import flags
from mta_jax import data
flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
tok = data.get_tokenizer("byt5")
def iterator(workers):
  cfg = data.get_data_config()
  cfg.synthetic_train_size, cfg.num_workers = 40, workers
  return data.build_train_pipeline(cfg, tokenizer=tok, task_types=data.TASK_TYPES, batch_size=8,
                                   seed=0, process_index=0, process_count=1).iterator
plain = iterator(0)
expected = [next(plain)["input_ids"] for _ in range(8)]
it = iterator(2)
got = [next(it)["input_ids"] for _ in range(3)]
state = json.loads(json.dumps(it.get_state()))
got += [next(it)["input_ids"] for _ in range(5)]
resumed = iterator(2)
resumed.set_state(state)
again = [next(resumed)["input_ids"] for _ in range(5)]
it.close(); resumed.close()
print("SAME", all((a == b).all() for a, b in zip(expected, got)),
      all((a == b).all() for a, b in zip(got[3:], again)))
"""


@pytest.mark.slow  # grain worker processes, in a subprocess
def test_worker_processes_give_the_same_resumable_stream():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _WORKERS_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=pathlib.Path(__file__).parents[2],
    )
    assert "SAME True True" in out.stdout, out.stderr[-2000:]
