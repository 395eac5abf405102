"""tensorflow-datasets tasks through `tfds.data_source`, without TensorFlow, under mock data."""

import importlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mta_jax import data
from mta_jax.data import templates
from mta_jax.data import tfds_sources
from mta_jax.data.registry import TfdsSource

TFDS_TASKS = sorted(n for n, t in data.TASKS.items() if isinstance(t.source, TfdsSource))


def _mock(num_examples=4):
    # USE_CODE: builders' own features, random values, no files and no TensorFlow.
    return tfds.testing.mock_data(
        num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE
    )


def _builder(task):
    if task.source.module:
        importlib.import_module(task.source.module)
    return tfds.builder(task.source.name)


def test_registry_covers_the_required_families():
    types = {data.TASKS[n].task_type for n in TFDS_TASKS}
    assert {"sst2", "trec", "snli", "mnli", "squad_qg", "squad_mrc", "boolq"} <= set(TFDS_TASKS)
    assert types == set(data.TASK_TYPES)
    assert {n: data.TASKS[n].metric for n in ("sst2", "snli", "squad_qg", "squad_mrc", "dpr")} == {
        "sst2": "accuracy",
        "snli": "accuracy",
        "squad_qg": "rouge_l_char",
        "squad_mrc": "f1_char",
        "dpr": "accuracy",
    }


@pytest.mark.parametrize("name", TFDS_TASKS)
def test_builder_exists_and_label_order_matches_templates(name):
    features = _builder(data.TASKS[name]).info.features
    expected = {
        "sst2": ("label", templates.SST2_LABELS),
        "snli": ("label", templates.NLI_LABELS),
        "mnli": ("label", templates.NLI_LABELS),
        "trec": ("label-coarse", templates.TREC_COARSE_LABELS),
    }
    if name in expected:
        key, names = expected[name]
        assert tuple(features[key].names) == names


@pytest.mark.parametrize("name", TFDS_TASKS)
def test_every_tfds_task_reads_under_mock_data(name):
    task = data.TASKS[name]
    with _mock(num_examples=5):
        examples, report = tfds_sources.read_tfds_task(task, "train", task_types=data.TASK_TYPES)
        eval_examples, _ = tfds_sources.read_tfds_task(task, "eval", task_types=data.TASK_TYPES)
    assert len(examples) == 5 and len(eval_examples) == 5
    assert report.kept[name] == 5
    for e in examples:
        assert e["task"] == name and e["type"] == task.task_type and e["input"] and e["target"]
        if e["answer_choices"]:
            assert e["target"] in e["answer_choices"]


def test_max_examples_reads_only_the_first_records():
    with _mock(num_examples=9):
        examples, _ = tfds_sources.read_tfds_task(
            data.TASKS["sst2"], "train", task_types=data.TASK_TYPES, max_examples=3
        )
    assert len(examples) == 3


def test_templates_follow_the_authors_wording():
    sst2 = templates.sst2({"sentence": b"a fine film", "label": np.int64(1)})
    assert sst2.input == (
        "What kind of emotion does the next paragraph want to express? "
        "a fine film choices : positive or negative"
    )
    assert sst2.target == "positive"
    assert templates.trec({"text": "What is SVHS ?", "label-coarse": 2}).target == "abbreviation"
    nli = templates.nli({"premise": "A dog runs.", "hypothesis": "An animal moves.", "label": 0})
    assert nli.input == (
        "Determine the relationship between the following two sentences: "
        "Sentence1 :A dog runs. Sentence2 :An animal moves. choices: "
        "contradiction , entailment or neutral"
    )
    assert nli.target == "entailment"
    squad = {
        "context": "Paris is in France.",
        "question": "Where is Paris?",
        "answers": {"text": np.array(["France"]), "answer_start": np.array([12])},
    }
    qg = templates.squad_question_generation(squad)
    assert qg.input == (
        "Ask a reasonable question based on the answer: France. and the "
        "following sentence: Paris is in France."
    )
    assert qg.target == "Where is Paris?"
    assert templates.squad_extractive_qa(squad).target == "France"
    assert (
        templates.boolq({"question": "is it", "passage": "p", "answer": np.True_}).target == "yes"
    )
    dpr = templates.definite_pronoun_resolution(
        {
            "sentence": "Tom thanked Bob because he helped.",
            "pronoun": "he",
            "candidates": np.array(["Tom", "Bob"]),
            "label": 1,
        }
    )
    assert dpr.target == "Bob" and dpr.answer_choices == ("Tom", "Bob")


def test_rows_without_gold_label_are_filtered_and_counted(monkeypatch):
    records = [{"premise": "p", "hypothesis": "h", "label": label} for label in (0, -1, 2, -1)]
    monkeypatch.setattr(tfds_sources, "open_source", lambda *a, **k: records)
    examples, report = tfds_sources.read_tfds_task(
        data.TASKS["snli"], "train", task_types=data.TASK_TYPES
    )
    assert [e["target"] for e in examples] == ["entailment", "contradiction"]
    assert dict(report.filtered) == {"snli:no_gold_label": 2}


def test_bad_tfds_record_raises_or_is_counted(monkeypatch):
    squad = lambda q: {
        "context": "c",
        "question": q,
        "answers": {"text": np.array(["a"]), "answer_start": np.array([0])},
    }
    monkeypatch.setattr(tfds_sources, "open_source", lambda *a, **k: [squad("ok?"), squad(" ")])
    task = data.TASKS["squad_qg"]
    with pytest.raises(data.DataError, match=r"squad/v1.1\[train\] record 1 .*'target' is empty"):
        tfds_sources.read_tfds_task(task, "train", task_types=data.TASK_TYPES)
    examples, report = tfds_sources.read_tfds_task(
        task, "train", task_types=data.TASK_TYPES, on_bad_row="skip"
    )
    assert len(examples) == 1 and dict(report.bad_rows) == {"empty_target": 1}


def test_task_left_empty_by_filtering_is_an_error(monkeypatch):
    monkeypatch.setattr(
        tfds_sources,
        "open_source",
        lambda *a, **k: [{"premise": "p", "hypothesis": "h", "label": -1}],
    )
    with pytest.raises(data.DataError, match="task 'snli': no usable examples"):
        tfds_sources.read_tfds_task(data.TASKS["snli"], "train", task_types=data.TASK_TYPES)


def test_unknown_tfds_name_is_a_clear_error():
    task = data.Task(
        "ghost", "classify", TfdsSource("no_such_dataset_xyz", "train", "test"), templates.sst2
    )
    with pytest.raises(data.DataError, match="tfds has no dataset named 'no_such_dataset_xyz'"):
        tfds_sources.read_tfds_task(task, "train", task_types=data.TASK_TYPES)


def test_unprepared_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="cannot open tfds dataset 'trec' split 'train'"):
        tfds_sources.read_tfds_task(
            data.TASKS["trec"], "train", task_types=data.TASK_TYPES, data_dir=str(tmp_path)
        )


def test_unknown_registry_task_lists_the_registered_ones():
    cfg = data.get_data_config()
    cfg.source, cfg.tfds_tasks = "tfds", ("sst2", "nope")
    with pytest.raises(data.DataError, match="unknown task 'nope'.*registered tasks: boolq"):
        data.build_eval_set(cfg, tokenizer=data.get_tokenizer("byt5"), task_types=data.TASK_TYPES)


def test_pipeline_and_eval_set_from_tfds_tasks():
    cfg = data.get_data_config()
    cfg.source, cfg.tfds_tasks = "tfds", ("sst2", "snli", "squad_qg", "squad_mrc")
    cfg.max_source_length, cfg.max_target_length = 48, 16
    tokenizer = data.get_tokenizer("byt5")
    with _mock(num_examples=6):
        pipe = data.build_train_pipeline(
            cfg,
            tokenizer=tokenizer,
            task_types=data.TASK_TYPES,
            batch_size=8,
            seed=0,
            process_index=0,
            process_count=1,
        )
        eval_set = data.build_eval_set(cfg, tokenizer=tokenizer, task_types=data.TASK_TYPES)
    batch = next(pipe.iterator)
    assert batch["input_ids"].shape == (8, 48) and batch["labels"].shape == (8, 16)
    assert set(batch["task_ids"].tolist()) <= {0, 1, 2, 3}  # classify, nli, mrc, generate
    assert dict(pipe.report.kept) == {"sst2": 6, "snli": 6, "squad_qg": 6, "squad_mrc": 6}
    assert sum(pipe.report.truncated_inputs.values()) == 24  # templates exceed 48 bytes
    assert len(eval_set) == 24
