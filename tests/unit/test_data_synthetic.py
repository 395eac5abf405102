"""The embedded synthetic mixture: deterministic, small, rule-following, conflicting."""

import collections

import pytest

from mta_jax import data
from mta_jax.data import synthetic


def test_deterministic_by_seed_and_split():
    assert data.synthetic_examples("train", 200, 3) == data.synthetic_examples("train", 200, 3)
    assert data.synthetic_examples("train", 200, 3) != data.synthetic_examples("train", 200, 4)
    train = {e["input"] for e in data.synthetic_examples("train", 2000, 0)}
    evals = {e["input"] for e in data.synthetic_examples("eval", 400, 0)}
    assert not train & evals  # eval measures rules, not memorised phrases


def test_task_types_sizes_and_lengths():
    examples = data.synthetic_examples("train", 1000, 0)
    counts = collections.Counter(e["task"] for e in examples)
    assert counts == {
        "synthetic/polarity": 350,
        "synthetic/relation": 300,
        "synthetic/lookup": 150,
        "synthetic/opposite": 200,
    }
    assert {e["type"] for e in examples} == {"classify", "nli", "mrc", "generate"}
    assert max(len(e["input"].encode()) for e in examples) <= 48
    assert max(len(e["target"].encode()) for e in examples) <= 16
    for e in examples:
        assert data.TASKS[e["task"]].task_type == e["type"]


def test_targets_follow_the_rules():
    for e in data.synthetic_examples("train", 400, 1):
        head, _, rest = e["input"].partition(": ")
        words, _, arg = rest.partition(" ; ")
        words = words.split()
        if head == "polarity":
            positives = sum(synthetic.POLARITY[w] == "positive" for w in words)
            assert e["target"] == ("positive" if positives >= 2 else "negative")
        elif head == "relation":
            expected = (
                "entailment"
                if arg in words
                else "contradiction"
                if synthetic.OPPOSITE[arg] in words
                else "neutral"
            )
            assert e["target"] == expected
        elif head == "lookup":
            assert [w for w in words if w[0] == arg] == [e["target"]]
        else:
            assert e["target"].split() == [synthetic.OPPOSITE[w] for w in words]


def test_tasks_demand_conflicting_mappings_of_the_same_words():
    # One word, three tasks, three answers: the shared FFN is pulled three ways.
    by_body = collections.defaultdict(dict)
    for e in data.synthetic_examples("train", 3000, 0):
        head, _, rest = e["input"].partition(": ")
        if " ; " not in rest:
            by_body[rest][head] = e["target"]
    shared = [answers for answers in by_body.values() if {"polarity", "opposite"} <= set(answers)]
    assert len(shared) > 20
    assert all(a["polarity"] != a["opposite"] for a in shared)


def test_bad_arguments_are_errors():
    with pytest.raises(data.DataError, match="synthetic split 'test'"):
        data.synthetic_examples("test", 10, 0)
    with pytest.raises(data.DataError, match="synthetic_train_size is 2"):
        data.synthetic_examples("train", 2, 0)
