"""Tests for the synthetic movie-review corpus behind the controlled-sentiment demo."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import preftune
from preftune.demo.corpus import (
    CLAUSE_OPENINGS,
    MAX_CHARS,
    MIN_CHARS,
    NOUN_OPENINGS,
    generate_reviews,
    review_openings,
    split_opening,
)

OPENINGS = (*NOUN_OPENINGS, *CLAUSE_OPENINGS)


@pytest.fixture(scope="module")
def reviews() -> list[str]:
    return generate_reviews(2000, seed=0)


def test_same_seed_gives_same_reviews_and_openings() -> None:
    assert generate_reviews(50, seed=3) == generate_reviews(50, seed=3)
    assert review_openings(50, seed=3) == review_openings(50, seed=3)


def test_different_seed_gives_different_reviews() -> None:
    assert generate_reviews(50, seed=3) != generate_reviews(50, seed=4)
    assert review_openings(50, seed=3) != review_openings(50, seed=4)


def test_reviews_do_not_depend_on_hash_seed() -> None:
    code = "from preftune.demo.corpus import generate_reviews; print(generate_reviews(200, 1))"
    repo_root = str(Path(preftune.__file__).resolve().parents[1])
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": repo_root},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for hash_seed in ("1", "2")
    }
    assert len(outputs) == 1


def test_count_length_and_ascii(reviews: list[str]) -> None:
    assert len(reviews) == 2000
    assert generate_reviews(0, seed=0) == []
    assert all(MIN_CHARS <= len(review) <= MAX_CHARS for review in reviews)
    assert all(review.isascii() for review in reviews)
    assert all(1 <= review.count(".") <= 3 for review in reviews)


def test_reviews_split_into_known_opening_and_rest(reviews: list[str]) -> None:
    for review in reviews:
        opening, rest = split_opening(review)
        assert opening in OPENINGS
        assert opening + rest == review


def test_split_opening_rejects_unknown_opening() -> None:
    with pytest.raises(ValueError, match="no known opening"):
        split_opening("Nobody starts a review like this.")


def test_openings_are_short_and_all_used_by_corpus(reviews: list[str]) -> None:
    openings = review_openings(500, seed=0)
    assert len(openings) == 500
    assert all(2 <= len(opening.split()) <= 5 for opening in openings)
    assert set(openings) == {split_opening(review)[0] for review in reviews} == set(OPENINGS)


def test_every_opening_starts_positive_and_negative_reviews(reviews: list[str]) -> None:
    vader = pytest.importorskip("vaderSentiment.vaderSentiment").SentimentIntensityAnalyzer()
    by_opening: dict[str, list[float]] = {opening: [] for opening in OPENINGS}
    for review in reviews:
        by_opening[split_opening(review)[0]].append(vader.polarity_scores(review)["compound"])
    for scores in by_opening.values():
        assert max(scores) > 0.5
        assert min(scores) < -0.5


def test_sentiment_spread(reviews: list[str]) -> None:
    # Bounds leave slack around the measured values (mean 0.07, 42% above 0.5, 38% below -0.3,
    # 19% within 0.3 of zero): balanced overall, with both poles and a neutral band populated.
    vader = pytest.importorskip("vaderSentiment.vaderSentiment").SentimentIntensityAnalyzer()
    scores = [vader.polarity_scores(review)["compound"] for review in reviews]
    assert -0.3 <= statistics.mean(scores) <= 0.3
    assert sum(score > 0.5 for score in scores) >= 0.25 * len(scores)
    assert sum(score < -0.3 for score in scores) >= 0.25 * len(scores)
    assert sum(abs(score) < 0.3 for score in scores) >= 0.10 * len(scores)


def test_openings_are_sentiment_neutral() -> None:
    vader = pytest.importorskip("vaderSentiment.vaderSentiment").SentimentIntensityAnalyzer()
    openings = review_openings(500, seed=0)
    scores = [abs(vader.polarity_scores(opening)["compound"]) for opening in openings]
    assert statistics.mean(scores) < 0.1
