"""The ground-truth reward: VADER's compound sentiment score, from the vaderSentiment package."""

from __future__ import annotations

from collections.abc import Callable

from preftune.errors import PreftuneError


def sentiment_judge() -> Callable[[list[str]], list[float]]:
    """A function from texts to VADER compound scores in [-1, 1]."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise PreftuneError(
            "preftune demo scores samples with VADER: pip install 'preftune[demo]'"
        ) from None
    analyzer = SentimentIntensityAnalyzer()
    return lambda texts: [analyzer.polarity_scores(text)["compound"] for text in texts]
