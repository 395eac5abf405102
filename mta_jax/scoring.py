"""Per-type scores of the released MTA evaluation, plus SQuAD-style QA extras.

Follows the authors' evaluation: alibaba/EasyNLP `examples/mta`, function
`evaluate_pclue_fn_no_mrc` of `script/eval.py` (imported by `train.py`). It is the pCLUE
script `evaluate_pclue_fn` with its `mrc` branch removed; that branch (`f1_sim`, still
defined in the file) is the source of the `mrc` score here:

    normalize(text)        = ' '.join(text.lower().split())
    empty prediction       -> the string "None" (after normalising, before scoring)
    classify, nli,
    anaphora_resolution    : exact match of the normalised strings
    generate               : Rouge().get_scores(' '.join(list(pred)),
                                                ' '.join(list(target)))[0]['rouge-l']['f']
                             with the `rouge` package (pltrdy, 1.0.1)
    mrc                    : f1_sim = 2 * LCS(pred, target) / (len(pred) + len(target)),
                             LCS over characters (`pylcs.lcs`)
    overall                : the mean of the per-type scores

Scores are fractions in [0, 1], as the reference computes them (it prints them with
'%.6f'); multiply by 100 for the percentages papers quote.

Rouge-L over characters reproduces the `rouge` package exactly, quirks included (checked
against rouge 1.0.1 on random strings): the text is cut into "sentences" at '.', spaces
are dropped, and by default (`exclusive=True`, the package's default) lengths and the
union-LCS are counted over *distinct* characters, so "what is it" against "what was it"
scores 1.0 - 5e-9 (F = 2PR / (P + R + 1e-8)). `exclusive=False` counts repeated
characters (the textbook Rouge-L F1 for single-sentence texts).

Deliberate differences from the reference, all on inputs where it crashes or stops:
an unknown type raises ValueError (the reference prints and stops scoring); a text with
no characters left after the '.'-split scores 0.0 in `rouge_l_char` (the package raises);
a type absent from the data is left out of the mean (the reference averages an empty
list into NaN). The reference also pools anaphora_resolution into the classify score;
`score(..., pool_anaphora=True)` does the same, the default keeps it a type of its own.
The reference's `replace("，", ",")` on raw target JSON lines is a JSON-loading
workaround and is not applied: targets are taken as given.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Sequence, Union

from mta_jax.task_types import METRIC_BY_TYPE

KNOWN_TYPES = tuple(METRIC_BY_TYPE)

# What the reference scores an empty prediction as (it never equals a lower-cased target).
EMPTY_PREDICTION = "None"

Target = Union[str, Sequence[str]]


def normalize(text: str) -> str:
    """Lower case and collapse every run of whitespace to one space (the reference's)."""
    return " ".join(text.lower().split())


def _target_text(target: Target) -> str:
    # The reference joins list targets (keyword generation) with a full-width comma.
    if isinstance(target, str):
        return target
    return "，".join(target)


def _check_lengths(**seqs: Sequence) -> int:
    lengths = {name: len(s) for name, s in seqs.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError("length mismatch: " + ", ".join(f"{k} has {v}" for k, v in lengths.items()))
    return next(iter(lengths.values()))


def accuracy(preds: Sequence[str], targets: Sequence[Target]) -> float:
    """Fraction of predictions equal to their target after `normalize`; 0.0 when empty."""
    n = _check_lengths(preds=preds, targets=targets)
    if n == 0:
        return 0.0
    hits = sum(normalize(p) == normalize(_target_text(t)) for p, t in zip(preds, targets))
    return hits / n


# ----------------------------------------------------------------- longest common subsequence

def _lcs_table(x: Sequence[str], y: Sequence[str]) -> list[list[int]]:
    # table[i][j] = LCS length of x[:i] and y[:j]
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        row, prev, xi = table[i], table[i - 1], x[i - 1]
        for j in range(1, len(y) + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    return table


def _lcs_length(x: Sequence[str], y: Sequence[str]) -> int:
    # Two rows suffice when only the length is needed.
    prev = [0] * (len(y) + 1)
    for xi in x:
        row = [0] * (len(y) + 1)
        for j in range(1, len(y) + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
        prev = row
    return prev[-1]


def _lcs_tokens(x: Sequence[str], y: Sequence[str]) -> set[str]:
    """Distinct tokens of the LCS that `rouge` reconstructs (its tie-breaking, no recursion)."""
    table = _lcs_table(x, y)
    i, j, out = len(x), len(y), set()
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out


def _rouge_sentences(text: str) -> list[str]:
    # `rouge` 1.0.1 Rouge._get_scores: sentences at '.', whitespace runs collapsed; a piece
    # of only spaces survives as the empty sentence (the filter runs before the collapse).
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def rouge_l_char(pred: str, target: str, *, exclusive: bool = True) -> float:
    """Rouge-L F of `pred` against `target` over characters, as the reference computes it.

    Equals `rouge.Rouge(exclusive=exclusive).get_scores(' '.join(pred), ' '.join(target))
    [0]['rouge-l']['f']` (summary-level union LCS). No normalisation is applied here.
    Returns 0.0 where the package raises (no sentence left in `pred` or `target`).
    """
    hyp = _rouge_sentences(" ".join(pred))
    ref = _rouge_sentences(" ".join(target))
    if not hyp or not ref:
        return 0.0
    hyp_words = [s.split(" ") for s in hyp]
    ref_words = [s.split(" ") for s in ref]
    if exclusive:
        m = len({w for s in ref_words for w in s})
        n = len({w for s in hyp_words for w in s})
        union: set[str] = set()
        for r in ref_words:
            for c in hyp_words:
                union |= _lcs_tokens(r, c)
        llcs = len(union)
    else:
        m = sum(len(s) for s in ref_words)
        n = sum(len(s) for s in hyp_words)
        llcs = sum(_lcs_length(r, c) for r in ref_words for c in hyp_words)
    r_lcs, p_lcs = llcs / m, llcs / n
    return 2.0 * ((p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8))


def lcs_f1_char(pred: str, target: str) -> float:
    """2 * LCS / (len(pred) + len(target)) over characters (pCLUE's `f1_sim`); 0.0 if both empty."""
    if not pred and not target:
        return 0.0
    return 2.0 * _lcs_length(pred, target) / (len(pred) + len(target))


# ----------------------------------------------------------------------------- SQuAD extras

_PUNCTUATION = frozenset(string.punctuation)


def _squad_normalize(text: str) -> str:
    # The official SQuAD v1.1 normalize_answer.
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_exact_match(pred: str, target: str) -> float:
    """1.0 if the SQuAD-normalised strings are equal, else 0.0."""
    return float(_squad_normalize(pred) == _squad_normalize(target))


def squad_f1(pred: str, target: str) -> float:
    """Token-level F1 of the SQuAD-normalised strings.

    When either side has no tokens the score is 1.0 if both are empty, else 0.0 (the SQuAD
    v2 rule; v1.1 gave 0.0 for two empty strings).
    """
    p, t = _squad_normalize(pred).split(), _squad_normalize(target).split()
    if not p or not t:
        return float(p == t)
    same = sum((collections.Counter(p) & collections.Counter(t)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------- score

def score(predictions: Sequence[str], targets: Sequence[Target], types: Sequence[str], *,
          rouge_exclusive: bool = True, pool_anaphora: bool = False) -> dict[str, float | int]:
    """Per-type and overall scores of decoded predictions, the reference's way.

    Args:
      predictions: decoded strings, one per example.
      targets: reference strings (a list of strings is joined with '，', as the reference does).
      types: each example's task type, one of `KNOWN_TYPES`.
      rouge_exclusive: passed to `rouge_l_char` for `generate` (True: the reference's numbers).
      pool_anaphora: score anaphora_resolution inside classify, as the released code does.

    Returns:
      {"<type>/score": float in [0, 1], "<type>/count": int} for every type present,
      "mrc/exact_match" when mrc is present, and "score": the mean of the per-type scores.
    """
    n = _check_lengths(predictions=predictions, targets=targets, types=types)
    if n == 0:
        raise ValueError("score() got no examples: predictions, targets and types are empty")
    per_type: dict[str, list[float]] = {}
    mrc_em: list[float] = []
    for i, (pred, target, kind) in enumerate(zip(predictions, targets, types)):
        if kind not in METRIC_BY_TYPE:
            raise ValueError(f"example {i}: unknown task type {kind!r}; known types: {', '.join(KNOWN_TYPES)}")
        target = normalize(_target_text(target))
        pred = normalize(pred) or EMPTY_PREDICTION
        metric = METRIC_BY_TYPE[kind]
        if metric == "accuracy":
            value = float(pred == target)
        elif metric == "rouge_l_char":
            value = rouge_l_char(pred, target, exclusive=rouge_exclusive)
        else:
            value = lcs_f1_char(pred, target)
            mrc_em.append(float(pred == target))
        if pool_anaphora and kind == "anaphora_resolution":
            kind = "classify"
        per_type.setdefault(kind, []).append(value)
    out: dict[str, float | int] = {}
    for kind in KNOWN_TYPES:
        if kind in per_type:
            out[f"{kind}/score"] = sum(per_type[kind]) / len(per_type[kind])
            out[f"{kind}/count"] = len(per_type[kind])
    if mrc_em:
        out["mrc/exact_match"] = sum(mrc_em) / len(mrc_em)
    type_scores = [out[f"{kind}/score"] for kind in KNOWN_TYPES if kind in per_type]
    out["score"] = sum(type_scores) / len(type_scores)
    return out
