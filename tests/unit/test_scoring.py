"""Per-type scores on hand-checked examples (the expected numbers are worked out in comments)."""
import pytest

from mta_jax import scoring as metrics

EPS = 1e-7  # the reference's Rouge-L F carries a 1e-8 in its denominator


def test_normalize_lowercases_and_collapses_whitespace():
    assert metrics.normalize("  Positive\tNEWS \n here ") == "positive news here"
    assert metrics.normalize("") == ""


def test_accuracy_after_normalising():
    # "Positive" == "positive", " negative " == "negative", "neutral" != "entailment": 2 / 3.
    assert metrics.accuracy(["Positive", " negative ", "neutral"],
                            ["positive", "negative", "entailment"]) == pytest.approx(2 / 3)


def test_lcs_f1_char():
    # LCS("abcde", "ace") = "ace" = 3 characters; F1 = 2 * 3 / (5 + 3) = 0.75.
    assert metrics.lcs_f1_char("abcde", "ace") == 0.75
    # LCS("abc", "cab") = "ab" = 2; 2 * 2 / 6.
    assert metrics.lcs_f1_char("abc", "cab") == pytest.approx(2 / 3)
    assert metrics.lcs_f1_char("", "") == 0.0
    assert metrics.lcs_f1_char("abc", "") == 0.0


def test_rouge_l_char_simple():
    # Characters a b c d against a b x d: LCS "abd" = 3, P = R = 3/4, F = 0.75.
    assert metrics.rouge_l_char("abcd", "abxd") == pytest.approx(0.75, abs=EPS)
    assert metrics.rouge_l_char("abcd", "abxd", exclusive=False) == pytest.approx(0.75, abs=EPS)
    # Identical texts: 2 * 1 / (2 + 1e-8), not exactly 1 (as the reference).
    assert metrics.rouge_l_char("abc", "abc") == pytest.approx(1.0, abs=EPS)
    assert metrics.rouge_l_char("abc", "abc") < 1.0


def test_rouge_l_char_counts_distinct_characters_like_the_reference():
    # Spaces are dropped: pred = w h a t i s i t (8), target = w h a t w a s i t (9).
    # Counting repeats: LCS = "what" + "sit" = 7, P = 7/8, R = 7/9, F = 98/119 = 14/17.
    assert metrics.rouge_l_char("what is it", "what was it", exclusive=False) == pytest.approx(14 / 17, abs=EPS)
    # The `rouge` package's default counts distinct characters: {w,h,a,t,i,s} on both sides
    # and the LCS covers all six, so P = R = 1.
    assert metrics.rouge_l_char("what is it", "what was it") == pytest.approx(1.0, abs=EPS)


def test_rouge_l_char_periods_split_sentences():
    # "ab.cd" -> sentences "a b", "c d"; union LCS with "a b c d" is 2 + 2 = 4 of 4: F = 1.
    assert metrics.rouge_l_char("ab.cd", "abcd", exclusive=False) == pytest.approx(1.0, abs=EPS)


def test_rouge_l_char_empty_texts_score_zero():
    assert metrics.rouge_l_char("", "abc") == 0.0
    assert metrics.rouge_l_char("abc", "") == 0.0
    assert metrics.rouge_l_char(".", "abc") == 0.0  # nothing left after the '.'-split


def test_squad_metrics():
    assert metrics.squad_exact_match("The Eiffel Tower!", "eiffel  tower") == 1.0
    assert metrics.squad_exact_match("Eiffel", "eiffel tower") == 0.0
    # "cat sat on mat" vs "cat on mat": 3 shared tokens, P = 3/4, R = 1, F1 = 6/7.
    assert metrics.squad_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    assert metrics.squad_f1("dog", "cat") == 0.0
    assert metrics.squad_f1("the", "") == 1.0  # both empty after normalising
    assert metrics.squad_f1("cat", "") == 0.0


def test_score_mixed_types():
    preds = ["Positive", "neutral", "", "abcd", "abcde"]
    targets = ["positive", "entailment", "contradiction", "abxd", "ace"]
    types = ["classify", "nli", "nli", "generate", "mrc"]
    out = metrics.score(preds, targets, types)
    assert out["classify/score"] == 1.0 and out["classify/count"] == 1
    assert out["nli/score"] == 0.0 and out["nli/count"] == 2
    assert out["generate/score"] == pytest.approx(0.75, abs=EPS)   # see test_rouge_l_char_simple
    assert out["mrc/score"] == 0.75 and out["mrc/exact_match"] == 0.0  # see test_lcs_f1_char
    # Mean over the four types present: (1 + 0 + 0.75 + 0.75) / 4.
    assert out["score"] == pytest.approx(0.625, abs=EPS)
    assert "anaphora_resolution/score" not in out


def test_score_empty_prediction_becomes_none_as_in_the_reference():
    # "" -> "None" (capital N, not normalised again) against "none": distinct characters
    # {N,o,n,e} (4) and {n,o,e} (3); LCS "one" covers 3: P = 3/4, R = 1, F = 6/7.
    out = metrics.score([""], ["none"], ["generate"])
    assert out["generate/score"] == pytest.approx(6 / 7, abs=EPS)
    # ... and never matches a classification target, even an empty one.
    assert metrics.score([""], [""], ["classify"])["classify/score"] == 0.0


def test_score_pool_anaphora():
    preds, targets = ["a", "b", "x"], ["a", "c", "x"]
    types = ["classify", "anaphora_resolution", "nli"]
    out = metrics.score(preds, targets, types)
    assert out["classify/score"] == 1.0 and out["anaphora_resolution/score"] == 0.0
    assert out["score"] == pytest.approx(2 / 3)  # (1 + 0 + 1) / 3
    pooled = metrics.score(preds, targets, types, pool_anaphora=True)
    assert pooled["classify/score"] == 0.5 and pooled["classify/count"] == 2
    assert "anaphora_resolution/score" not in pooled
    assert pooled["score"] == pytest.approx(0.75)  # (0.5 + 1) / 2


def test_score_list_target_joined_with_fullwidth_comma():
    out = metrics.score(["Red，Blue"], [["red", "blue"]], ["classify"])
    assert out["classify/score"] == 1.0


def test_score_unknown_type_names_it_and_the_known_ones():
    with pytest.raises(ValueError, match=r"'summarize'.*classify.*nli.*generate.*mrc"):
        metrics.score(["a", "b"], ["a", "b"], ["classify", "summarize"])


def test_score_length_mismatch():
    with pytest.raises(ValueError, match=r"predictions has 3.*targets has 2.*types has 3"):
        metrics.score(["a", "b", "c"], ["a", "b"], ["nli"] * 3)
    with pytest.raises(ValueError, match="length mismatch"):
        metrics.accuracy(["a"], [])


def test_score_needs_examples():
    with pytest.raises(ValueError, match="no examples"):
        metrics.score([], [], [])


def test_metric_for_type_table():
    assert metrics.METRIC_BY_TYPE == {"classify": "accuracy", "nli": "accuracy",
                                       "anaphora_resolution": "accuracy",
                                       "generate": "rouge_l_char", "mrc": "f1_char"}
