"""Text-to-text templates for tensorflow-datasets records, in the authors' style.

The wording copies the released English data (english_val.jsonl) where it has the
task (sentiment, TREC question type, SNLI, SQuAD question generation) and follows
its pattern ("<instruction> <text> choices : a or b") where it does not.
Each template takes one decoded tfds record (numpy scalars, str or bytes) and
returns a RawExample, or Filtered when the record has no usable label (e.g. SNLI
rows without a gold label), which the reader counts.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence


class RawExample(NamedTuple):
    input: str
    target: str
    answer_choices: tuple[str, ...] = ()


class Filtered(NamedTuple):
    reason: str  # a short snake_case reason, counted in the DataReport


NO_GOLD_LABEL = Filtered("no_gold_label")
NO_ANSWER = Filtered("no_answer")

# ClassLabel order of each builder; tests check these against the builders' info.
SST2_LABELS = ("negative", "positive")
NLI_LABELS = ("entailment", "neutral", "contradiction")  # snli and glue/mnli
TREC_COARSE_LABELS = ("DESC", "ENTY", "ABBR", "HUM", "NUM", "LOC")
# The authors' names for the TREC coarse classes.
TREC_NAMES = {
    "ABBR": "abbreviation",
    "ENTY": "entity",
    "DESC": "description and abstract concept",
    "HUM": "human",
    "LOC": "position",
    "NUM": "value",
}
_TREC_CHOICES = (
    "abbreviation",
    "entity",
    "description and abstract concept",
    "human",
    "position",
    "value",
)


def text(value: Any) -> str:
    """A tfds text feature as str: data sources may return bytes or numpy strings."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _label(record: Mapping, key: str, num_classes: int) -> int | None:
    label = int(record[key])
    return label if 0 <= label < num_classes else None  # -1 = no gold label


def sst2(record: Mapping) -> RawExample | Filtered:
    label = _label(record, "label", 2)
    if label is None:
        return NO_GOLD_LABEL
    return RawExample(
        "What kind of emotion does the next paragraph want to express? "
        f"{text(record['sentence'])} choices : positive or negative",
        SST2_LABELS[label],
        SST2_LABELS,
    )


def trec(record: Mapping) -> RawExample | Filtered:
    label = _label(record, "label-coarse", len(TREC_COARSE_LABELS))
    if label is None:
        return NO_GOLD_LABEL
    choices = ",".join(f"'{c}'" for c in _TREC_CHOICES)
    return RawExample(
        f"What kind of category is the following question? {text(record['text'])} "
        f"choices : {choices}",
        TREC_NAMES[TREC_COARSE_LABELS[label]],
        _TREC_CHOICES,
    )


def nli(record: Mapping) -> RawExample | Filtered:
    label = _label(record, "label", 3)
    if label is None:
        return NO_GOLD_LABEL
    return RawExample(
        "Determine the relationship between the following two sentences: "
        f"Sentence1 :{text(record['premise'])} Sentence2 :{text(record['hypothesis'])} "
        "choices: contradiction , entailment or neutral",
        NLI_LABELS[label],
        tuple(sorted(NLI_LABELS)),
    )


def _first_answer(record: Mapping) -> str | None:
    answers: Sequence = record["answers"]["text"]
    return text(answers[0]) if len(answers) else None


def squad_question_generation(record: Mapping) -> RawExample | Filtered:
    answer = _first_answer(record)
    if answer is None:
        return NO_ANSWER
    return RawExample(
        f"Ask a reasonable question based on the answer: {answer}. and the following "
        f"sentence: {text(record['context'])}",
        text(record["question"]),
    )


def squad_extractive_qa(record: Mapping) -> RawExample | Filtered:
    answer = _first_answer(record)
    if answer is None:
        return NO_ANSWER
    return RawExample(
        f"Answer the question based on the passage: {text(record['context'])} "
        f"question: {text(record['question'])}",
        answer,
    )


def boolq(record: Mapping) -> RawExample | Filtered:
    return RawExample(
        f"Read the passage and answer the question with yes or no. passage: "
        f"{text(record['passage'])} question: {text(record['question'])}? choices : yes or no",
        "yes" if bool(record["answer"]) else "no",
        ("no", "yes"),
    )


def definite_pronoun_resolution(record: Mapping) -> RawExample | Filtered:
    candidates = tuple(text(c) for c in record["candidates"])
    label = _label(record, "label", len(candidates))
    if label is None:
        return NO_GOLD_LABEL
    return RawExample(
        f"Who does the pronoun refer to? {text(record['sentence'])} pronoun: "
        f"{text(record['pronoun'])} choices : {' or '.join(candidates)}",
        candidates[label],
        candidates,
    )
