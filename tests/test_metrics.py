"""Metrics checked against hand-computed values (arithmetic in the comments)."""

import math

import pytest

from runner.eval.metrics import (
    METRIC_NAMES,
    bleu1,
    corpus_bleu1,
    exact_match,
    normalize,
    open_recall,
    score,
    token_f1,
    tokens,
)

# Any warning (nltk's zero-count warnings included) fails these tests.
pytestmark = pytest.mark.filterwarnings("error")


def approx(x: float) -> object:
    return pytest.approx(x, abs=1e-9)


def test_normalize_drops_case_punctuation_articles_and_extra_space() -> None:
    assert normalize("  The Heart, is   ENLARGED! ") == "heart is enlarged"
    assert normalize("An X-ray of a lung") == "xray of lung"
    # Articles only as whole words: "theater" and "atelectasis" keep their letters.
    assert normalize("theater atelectasis") == "theater atelectasis"


def test_tokens_lowercase_and_split_punctuation() -> None:
    assert tokens("Left-sided, EFFUSION") == ["left", "-", "sided", ",", "effusion"]


def test_bleu1_perfect_match_is_one() -> None:
    # Case differs only; tokens are lowercased. p = 3/3, c = r = 3 -> BP = 1.
    assert bleu1("Right lower lobe", "right lower lobe") == approx(1.0)


def test_bleu1_brevity_penalty() -> None:
    # hyp [red, circle], ref [a, red, circle]: p = 2/2 = 1; c = 2 < r = 3,
    # BP = exp(1 - 3/2) = exp(-0.5) = 0.6065306597...
    assert bleu1("red circle", "a red circle") == approx(math.exp(-0.5))
    assert bleu1("red circle", "a red circle") == pytest.approx(0.6065306597, abs=1e-9)


def test_a_short_answer_pays_the_brevity_penalty() -> None:
    # hyp [pneumonia], ref [left, lower, lobe, pneumonia]: precision 1/1 = 1, but
    # BLEU-1 = 1 * exp(1 - 4/1) = exp(-3) = 0.0497870684...
    assert bleu1("pneumonia", "left lower lobe pneumonia") == approx(math.exp(-3))


def test_clipping() -> None:
    # "the" occurs 3 times in hyp but once in ref: clipped count min(3, 1) = 1, p = 1/3;
    # c = 3 > r = 2 -> BP = 1, so BLEU-1 = 1/3.
    assert bleu1("the the the", "the cat") == approx(1 / 3)


def test_bleu1_no_shared_word_is_zero() -> None:
    assert bleu1("no", "yes") == 0.0


def test_empty_strings() -> None:
    for prediction, reference in [("", "yes"), ("yes", ""), ("", "")]:
        assert bleu1(prediction, reference) == 0.0
    assert token_f1("", "") == 1.0
    assert token_f1("", "yes") == 0.0
    assert token_f1("yes", "") == 0.0
    # "the" normalises to "", so both sides are empty.
    assert token_f1("the", "") == 1.0
    assert exact_match("", "") == 1.0
    assert exact_match("", "yes") == 0.0
    assert open_recall("", "") == 1.0
    assert open_recall("yes", "") == 0.0
    assert open_recall("", "yes") == 0.0


def test_token_f1_partial_overlap() -> None:
    # [left, lung] vs [right, lung]: common 1, p = 1/2, r = 1/2, F1 = 2*.25/1 = 0.5.
    assert token_f1("left lung", "right lung") == approx(0.5)
    # [mass, in, left, lung] vs [left, lung]: common 2, p = 2/4, r = 2/2,
    # F1 = 2 * 0.5 * 1 / 1.5 = 2/3.
    assert token_f1("mass in left lung", "left lung") == approx(2 / 3)


def test_token_f1_and_exact_match_use_normalisation() -> None:
    # "The left lung." and "left LUNG" both normalise to "left lung".
    assert token_f1("The left lung.", "left LUNG") == approx(1.0)
    assert exact_match("The left lung.", "left LUNG") == 1.0
    assert exact_match("left lung", "right lung") == 0.0


def test_open_recall_partial() -> None:
    # ref [mass, in, left, lung]; pred has mass, in, lung: 3/4.
    assert open_recall("mass in lung", "a mass in the left lung") == approx(0.75)
    # Multiset: ref [left, left] has two "left", pred only one: min(1, 2) / 2 = 1/2.
    assert open_recall("left", "left left") == approx(0.5)
    # Extra predicted words do not hurt recall: 2/2.
    assert open_recall("big mass in left lung", "left lung") == approx(1.0)


def test_corpus_bleu1_two_pairs() -> None:
    # ("red circle", "a red circle"): clipped 2, c 2, r 3.  ("yes", "yes"): clipped 1, c 1, r 1.
    # p = (2+1)/(2+1) = 1; c = 3 < r = 4, BP = exp(1 - 4/3) = exp(-1/3) = 0.7165313106...
    # (The mean of sentence scores would be (exp(-0.5) + 1)/2 = 0.8033; corpus BLEU differs.)
    value = corpus_bleu1(["red circle", "yes"], ["a red circle", "yes"])
    assert value == approx(math.exp(-1 / 3))
    # ("red circle", "a red circle") and ("the the the", "the cat"): clipped 2 + 1 = 3 over
    # c = 2 + 3 = 5 -> p = 3/5; r = 3 + 2 = 5 = c -> BP = 1, so 0.6.
    assert corpus_bleu1(["red circle", "the the the"], ["a red circle", "the cat"]) == approx(0.6)


def test_corpus_bleu1_no_shared_word_is_zero() -> None:
    assert corpus_bleu1(["no", ""], ["yes", "left"]) == 0.0


def test_score_mixed_closed_and_open() -> None:
    predictions = ["yes", "No.", "left lung", "red circle"]
    references = ["Yes", "no", "right lung", "a red circle"]
    closed = [True, True, False, False]
    result = score(predictions, references, closed)
    assert tuple(result) == METRIC_NAMES
    assert all(isinstance(v, float) for v in result.values())
    # Sentence BLEU-1:
    #   yes/yes          -> 1
    #   [no, .]/[no]     -> p = 1/2, c = 2 > r = 1, BP = 1 -> 0.5
    #   left lung/right  -> p = 1/2, BP = 1 -> 0.5
    #   red circle/a ... -> exp(-0.5)
    #   mean = (2 + exp(-0.5)) / 4 = 0.6516326649...
    assert result["bleu1"] == approx((2 + math.exp(-0.5)) / 4)
    # Corpus: clipped 1 + 1 + 1 + 2 = 5, c = 1 + 2 + 2 + 2 = 7, r = 1 + 1 + 2 + 3 = 7,
    # BP = 1 -> 5/7 = 0.7142857...
    assert result["corpus_bleu1"] == approx(5 / 7)
    # Token F1 (normalised): 1, 1 ("No." -> "no"), 0.5, 1 ("a red circle" -> "red circle").
    assert result["token_f1"] == approx(3.5 / 4)
    # Exact match: 1, 1, 0, 1 -> 3/4.
    assert result["exact_match"] == approx(0.75)
    # Closed questions are the first two: 1, 1 -> 1.0.
    assert result["closed_accuracy"] == approx(1.0)
    # Open recall: [right, lung] has 1/2 in pred; [red, circle] 2/2 -> (0.5 + 1) / 2.
    assert result["open_recall"] == approx(0.75)
    assert (result["n"], result["n_closed"], result["n_open"]) == (4.0, 2.0, 2.0)


def test_score_nan_when_no_closed_or_no_open_questions() -> None:
    only_open = score(["left lung"], ["right lung"], [False])
    assert math.isnan(only_open["closed_accuracy"])
    assert only_open["open_recall"] == approx(0.5)
    assert (only_open["n_closed"], only_open["n_open"]) == (0.0, 1.0)

    only_closed = score(["yes"], ["no"], [True])
    assert math.isnan(only_closed["open_recall"])
    assert only_closed["closed_accuracy"] == 0.0


def test_length_mismatch_raises_with_lengths() -> None:
    with pytest.raises(ValueError, match=r"\[2, 1, 2\]"):
        score(["a", "b"], ["a"], [True, False])
    with pytest.raises(ValueError, match=r"\[1, 1, 2\]"):
        score(["a"], ["a"], [True, False])
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        corpus_bleu1(["a"], ["a", "b"])


def test_empty_input_raises() -> None:
    with pytest.raises(ValueError, match="empty"):
        score([], [], [])
    with pytest.raises(ValueError, match="empty"):
        corpus_bleu1([], [])


def test_values_in_unit_interval() -> None:
    pairs = [("a b c d e f", "a"), ("x", "x y z"), ("yes yes", "yes"), ("!!", "?")]
    for prediction, reference in pairs:
        for metric in (bleu1, token_f1, exact_match, open_recall):
            assert 0.0 <= metric(prediction, reference) <= 1.0
