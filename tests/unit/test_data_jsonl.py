"""The authors' JSON-lines reader: the fixture, list targets, and every kind of bad line."""

import json
import pathlib

import pytest

from mta_jax import data
from mta_jax.data import examples as ex

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "alter_small.jsonl"
# The authors' released validation file, in the shared/ folder beside the checkout (as in CI).
RELEASED = pathlib.Path(__file__).parents[3] / "shared" / "data" / "alter" / "english_val.jsonl"
GOOD = {"input": "a good line", "target": "yes", "answer_choices": "[]", "type": "nli"}


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_reads_fixture_with_every_type():
    examples, report = data.read_jsonl(FIXTURE)
    counts = {t: sum(e["type"] == t for e in examples) for t in data.TASK_TYPES}
    assert counts == {"classify": 10, "nli": 8, "mrc": 3, "generate": 6, "anaphora_resolution": 3}
    assert dict(report.kept) == counts  # without a "task" field, the task is the type
    assert not report.bad_rows and not report.filtered
    first = examples[0]
    assert first["target"] == "entailment" and first["answer_choices"] == ()
    assert first["input"].startswith("Determine the relationship between the following two")
    json.dumps(report.as_dict())  # the report travels with checkpoints and logs


def test_list_target_is_joined_as_the_reference_evaluation_joins_it():
    examples, _ = data.read_jsonl(FIXTURE)
    keywords = [e["target"] for e in examples if e["input"].startswith("Extract the keywords")]
    assert keywords == [
        "Eiffel Tower，Paris，1889",
        "Marie Curie，Nobel Prizes，physics，chemistry",
    ]


def test_answer_choices_accepts_lists_and_json_strings():
    examples, _ = data.read_jsonl(FIXTURE)
    anaphora = [e for e in examples if e["type"] == "anaphora_resolution"]
    assert anaphora[0]["answer_choices"] == ("the trophy", "the suitcase")
    assert anaphora[2]["answer_choices"] == ("Joan", "Susan")  # stored as a JSON string


def test_whitespace_is_collapsed_as_the_reference_code_does(tmp_path):
    line = dict(GOOD, input="  two\tspaces  and\nnewline ", target=" yes  ")
    (example,), _ = data.read_jsonl(_write(tmp_path, [json.dumps(line)]))
    assert example["input"] == "two spaces and newline" and example["target"] == "yes"


def test_optional_task_field_names_the_task(tmp_path):
    lines = [json.dumps(dict(GOOD, type="classify", task="sst2")), json.dumps(GOOD)]
    examples, report = data.read_jsonl(_write(tmp_path, lines))
    assert [e["task"] for e in examples] == ["sst2", "nli"]
    assert dict(report.kept) == {"sst2": 1, "nli": 1}


BAD_LINES = [
    ('{"input": "a", "target": ', ex.INVALID_JSON, "invalid JSON"),
    ('["input", "target"]', ex.NOT_AN_OBJECT, "JSON object"),
    ('{"input": "a", "type": "nli"}', ex.MISSING_FIELD, "'target'"),
    (
        '{"input": "a", "target": "b", "type": "poetry"}',
        ex.UNKNOWN_TYPE,
        "classify, nli, mrc, generate, anaphora_resolution",
    ),
    ('{"input": "   ", "target": "b", "type": "nli"}', ex.EMPTY_INPUT, "'input' is empty"),
    ('{"input": "a", "target": "", "type": "nli"}', ex.EMPTY_TARGET, "'target' is empty"),
    ('{"input": 3, "target": "b", "type": "nli"}', ex.NON_STRING_FIELD, "'input' must be a string"),
    ('{"input": "a", "target": ["b", 1], "type": "nli"}', ex.NON_STRING_FIELD, "'target[]'"),
    ('{"input": "a", "target": "b", "type": ["nli"]}', ex.NON_STRING_FIELD, "'type'"),
    (
        '{"input": "a", "target": "b", "type": "nli", "answer_choices": "x"}',
        ex.BAD_ANSWER_CHOICES,
        "answer_choices",
    ),
]


@pytest.mark.parametrize("line,reason,fragment", BAD_LINES, ids=[b[1] for b in BAD_LINES])
def test_bad_line_raises_naming_file_and_line(tmp_path, line, reason, fragment):
    path = _write(tmp_path, [json.dumps(GOOD), line, json.dumps(GOOD)])
    with pytest.raises(data.DataError) as err:
        data.read_jsonl(path)
    assert f"{path}:2:" in str(err.value) and fragment in str(err.value)


@pytest.mark.parametrize("line,reason,fragment", BAD_LINES, ids=[b[1] for b in BAD_LINES])
def test_bad_line_is_skipped_and_counted(tmp_path, line, reason, fragment):
    path = _write(tmp_path, [json.dumps(GOOD), line, json.dumps(GOOD)])
    examples, report = data.read_jsonl(path, on_bad_row="skip")
    assert len(examples) == 2
    assert dict(report.bad_rows) == {reason: 1}
    assert f"{path}:2:" in report.bad_row_messages[0]
    assert f"{reason}" in report.summary()


def test_blank_lines_are_counted_not_errors(tmp_path):
    path = _write(tmp_path, [json.dumps(GOOD), "", "   ", json.dumps(GOOD)])
    examples, report = data.read_jsonl(path)
    assert len(examples) == 2 and report.blank_lines == 2


def test_no_usable_example_after_skipping_is_an_error(tmp_path):
    path = _write(tmp_path, ['{"input": "a"}', "not json"])
    with pytest.raises(data.DataError, match="no usable examples"):
        data.read_jsonl(path, on_bad_row="skip")


def test_missing_file_and_bad_policy_are_errors(tmp_path):
    with pytest.raises(data.DataError, match="not found.*nope.jsonl"):
        data.read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(data.DataError, match="on_bad_row"):
        data.read_jsonl(FIXTURE, on_bad_row="ignore")


def test_type_outside_the_run_task_types_is_unknown():
    with pytest.raises(data.DataError, match="unknown task type 'mrc'; known types: classify, nli"):
        data.read_jsonl(FIXTURE, task_types=("classify", "nli", "generate", "anaphora_resolution"))


@pytest.mark.skipif(not RELEASED.exists(), reason="the released validation file is not here")
def test_reads_the_released_validation_file():
    examples, report = data.read_jsonl(RELEASED)
    assert dict(report.kept) == {"nli": 940, "classify": 889, "generate": 171}
    assert not report.bad_rows and len(examples) == 2000


def test_prediction_input_may_omit_type_and_target(tmp_path):
    path = _write(tmp_path, ['{"input": "only an input"}', json.dumps(GOOD)])
    with pytest.raises(data.DataError, match=r":1: missing field\(s\) \['target', 'type'\]"):
        data.read_jsonl(path)
    examples, _ = data.read_jsonl(path, split="predict", default_type="classify")
    assert [(e["type"], e["target"]) for e in examples] == [("classify", ""), ("nli", "yes")]
