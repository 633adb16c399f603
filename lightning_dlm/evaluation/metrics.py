"""Text metrics of evaluation: answer normalisation, exact match, token F1, distinct-n, entropy.

ROUGE, perplexity and accuracy come from torchmetrics (see the task modules); these are the
ones torchmetrics does not have in the form the protocols need.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Iterable, List, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD / TriviaQA normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def first_line(text: str) -> str:
    """The answer part of a generation: up to the first newline, stripped."""
    return text.strip().split("\n", 1)[0].strip()


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals one of the normalised answers."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD's bag-of-words F1, best over the answers."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
        elif not pred and not gold:
            best = max(best, 1.0)
    return best


def distinct_n(tokens: Sequence[int], n: int) -> float:
    """Unique n-grams / n-grams of one sequence (0 when it has no n-gram)."""
    grams = list(zip(*(tokens[i:] for i in range(n))))
    return len(set(grams)) / len(grams) if grams else 0.0


def unigram_entropy(tokens: Iterable[int]) -> float:
    """Entropy (bits) of the token unigram distribution of one sequence."""
    counts = Counter(tokens)
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def mean(values: List[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of ``values`` (sample standard deviation / sqrt(n)); nan below 2."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def proportion_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` independent items: sqrt(p (1 - p) / n)."""
    return math.sqrt(max(0.0, p * (1 - p)) / n) if n > 0 else float("nan")
