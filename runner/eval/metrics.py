"""VQA answer metrics, computed one way everywhere.

BLEU-1 and token F1 follow Med-PaLM M; closed-question accuracy and open-question recall are
the field's usual VQA-RAD metrics. Only nltk code is used that needs no downloaded data.
"""

import math
import re
import string
from collections import Counter

from nltk.tokenize import wordpunct_tokenize
from nltk.translate.bleu_score import corpus_bleu, sentence_bleu

METRIC_NAMES: tuple[str, ...] = (
    "bleu1",
    "corpus_bleu1",
    "token_f1",
    "exact_match",
    "closed_accuracy",
    "open_recall",
    "n",
    "n_closed",
    "n_open",
)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def tokens(text: str) -> list[str]:
    """Lowercased word/punctuation tokens for BLEU (wordpunct needs no nltk data download)."""
    return wordpunct_tokenize(text.lower())


def _overlap(prediction: list[str], reference: list[str]) -> int:
    """Clipped count of prediction tokens found in the reference (multiset intersection)."""
    return sum((Counter(prediction) & Counter(reference)).values())


def bleu1(prediction: str, reference: str) -> float:
    """Sentence BLEU-1 (clipped unigram precision times brevity penalty), in [0, 1]."""
    hyp, ref = tokens(prediction), tokens(reference)
    # No shared unigram (which covers either side empty) means BLEU is 0; returning early
    # keeps nltk off the degenerate path, which warns in some nltk versions.
    if _overlap(hyp, ref) == 0:
        return 0.0
    return float(sentence_bleu([ref], hyp, weights=(1.0,)))


def corpus_bleu1(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-1: clipped counts and lengths summed over all pairs before dividing."""
    _check_lengths(predictions, references)
    hyps = [tokens(p) for p in predictions]
    refs = [tokens(r) for r in references]
    if sum(_overlap(h, r) for h, r in zip(hyps, refs)) == 0:
        return 0.0
    return float(corpus_bleu([[r] for r in refs], hyps, weights=(1.0,)))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 over normalised tokens; both empty -> 1.0, one empty -> 0.0."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = _overlap(pred, ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def open_recall(prediction: str, reference: str) -> float:
    """Fraction of normalised reference tokens (as a multiset) present in the prediction."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not ref:
        return float(not pred)
    return _overlap(ref, pred) / len(ref)


def _check_lengths(predictions: list[str], references: list[str], *more: list) -> None:
    lengths = [len(predictions), len(references), *(len(m) for m in more)]
    if len(set(lengths)) != 1:
        raise ValueError(f"metric inputs differ in length: {lengths}")
    if lengths[0] == 0:
        raise ValueError("metric inputs are empty: nothing to score")


def _mean(values: list[float]) -> float:
    # nan, not 0: with no questions of a kind there is nothing to measure.
    return math.fsum(values) / len(values) if values else float("nan")


def score(predictions: list[str], references: list[str], closed: list[bool]) -> dict[str, float]:
    """All metrics, keyed as in METRIC_NAMES.

    closed_accuracy is exact match over closed questions, open_recall is the mean over open
    ones; either is nan when there are no such questions. Counts (n, n_closed, n_open) are
    floats too, so every value can be logged to MLflow as is. Raises ValueError when the
    three lists differ in length or are empty.
    """
    _check_lengths(predictions, references, closed)
    pairs = list(zip(predictions, references))
    closed_pairs = [pair for pair, c in zip(pairs, closed) if c]
    open_pairs = [pair for pair, c in zip(pairs, closed) if not c]
    return {
        "bleu1": _mean([bleu1(p, r) for p, r in pairs]),
        "corpus_bleu1": corpus_bleu1(predictions, references),
        "token_f1": _mean([token_f1(p, r) for p, r in pairs]),
        "exact_match": _mean([exact_match(p, r) for p, r in pairs]),
        "closed_accuracy": _mean([exact_match(p, r) for p, r in closed_pairs]),
        "open_recall": _mean([open_recall(p, r) for p, r in open_pairs]),
        "n": float(len(pairs)),
        "n_closed": float(len(closed_pairs)),
        "n_open": float(len(open_pairs)),
    }
