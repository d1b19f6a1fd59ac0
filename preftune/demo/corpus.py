"""A synthetic corpus of short English movie reviews with varied sentiment, built offline.

It stands in for IMDb in the offline reproduction of the DPO paper's controlled-sentiment
experiment (Rafailov et al., 2023, §6.1): a tiny byte-level model learns to write reviews from
this corpus, is prompted with a review opening, and its continuations are scored by VADER.

Design choices that the experiment depends on:

* a small vocabulary and a regular structure, so a ~1M-parameter model learns it in minutes;
* openings ("I watched this film", "The director's latest") that carry no sentiment and are
  shared by positive, negative, mixed and neutral reviews, so the prompt does not decide the
  sentiment of the continuation;
* sentences that are positive, negative, mixed ("the acting was great but the plot was dull")
  or neutral, so samples span the whole range of VADER's compound score;
* 1-3 sentences, 80-250 ASCII characters per review.

Words were checked against the VADER lexicon: openings and neutral sentences avoid words it
scores (it rates "friend", "novel" and "comedy" as positive, so none appears).
"""

from __future__ import annotations

import random

MIN_CHARS = 80
MAX_CHARS = 250

# Openings are either a noun phrase the first sentence predicates on, or a clause it extends.
NOUN_OPENINGS = (
    "This movie",
    "This film",
    "The director's latest",
    "The new mystery",
    "This western",
    "The sequel",
    "This drama",
    "The remake",
)
CLAUSE_OPENINGS = (
    "I watched this film",
    "I saw this movie",
    "We watched this one",
    "I finally saw this",
    "I caught this one",
    "I watched this movie",
)

ASPECTS = (
    "acting", "plot", "story", "script", "dialogue", "music", "ending", "pacing",
    "camera work", "lead actor", "humor", "soundtrack", "cast", "direction", "editing",
)  # fmt: skip
POSITIVE = (
    "great", "wonderful", "excellent", "brilliant", "beautiful", "amazing", "superb",
    "fantastic", "lovely", "charming", "clever", "fun", "strong", "perfect", "delightful",
)  # fmt: skip
NEGATIVE = (
    "terrible", "awful", "boring", "dull", "weak", "bad", "horrible", "poor", "stupid",
    "lame", "painful", "ugly", "messy", "dreadful", "annoying", "disappointing",
)  # fmt: skip

# The text after an opening that ends the first sentence, by opening kind and sentiment.
FIRST_SENTENCE_TAILS = {
    "noun": {
        "pos": (
            " is {pos} from start to finish.",
            " was {pos} and {pos2}, and I loved it.",
            " was {pos}, and the {aspect} was {pos2}.",
        ),
        "neg": (
            " is {neg} from start to finish.",
            " was {neg} and {neg2}, and I hated it.",
            " was {neg}, and the {aspect} was {neg2}.",
        ),
        "mix": (
            " was {pos}, but the {aspect} was {neg}.",
            " was {neg}, but the {aspect} was {pos}.",
        ),
        "neu": (
            " has a large cast and a simple story.",
            " came out last year and follows a family in the city.",
            " is about a man who moves back to his home town.",
        ),
    },
    "clause": {
        "pos": (
            " last night and it was {pos}.",
            " on Friday and thought it was {pos}.",
            " at home and I really enjoyed it.",
        ),
        "neg": (
            " last night and it was {neg}.",
            " on Friday and thought it was {neg}.",
            " at home and I really did not like it.",
        ),
        "mix": (
            " last night, and the {aspect} was {pos} but the {aspect2} was {neg}.",
            " on Friday, and the {aspect} was {neg} but the {aspect2} was {pos}.",
        ),
        "neu": (
            " last night with my brother.",
            " on Friday after work.",
            " at home over the weekend.",
        ),
    },
}

SENTENCES = {
    "pos": (
        "The {aspect} was {pos}.",
        "The {aspect} was {pos} and the {aspect2} was {pos2}.",
        "I loved the {aspect}.",
        "The {aspect} is {pos} and so is the {aspect2}.",
    ),
    "neg": (
        "The {aspect} was {neg}.",
        "The {aspect} was {neg} and the {aspect2} was even worse.",
        "I hated the {aspect}.",
        "The {aspect} is {neg} and so is the {aspect2}.",
    ),
    "mix": (
        "The {aspect} was {pos} but the {aspect2} was {neg}.",
        "The {aspect} was {neg} but the {aspect2} was {pos}.",
        "I liked the {aspect}, but the {aspect2} was {neg}.",
    ),
    "neu": (
        "It runs about two hours.",
        "Most of it takes place at night.",
        "The story is set in a small town.",
        "It was filmed in the winter.",
        "The {aspect} is what most people talk about.",
    ),
    "verdict_pos": (
        "I would recommend it to anyone.",
        "I would happily watch it again.",
        "One of the best films of the year.",
    ),
    "verdict_neg": (
        "I would not recommend it.",
        "What a waste of time.",
        "One of the worst films of the year.",
    ),
}

# Sentence kinds per review mood: the first kind is the tail of the opening sentence.
PLANS = {
    "positive": (("pos", "pos"), ("pos", "verdict_pos"), ("neu", "pos", "verdict_pos"),
                 ("pos", "neu", "pos"), ("mix", "pos", "verdict_pos")),
    "negative": (("neg", "neg"), ("neg", "verdict_neg"), ("neu", "neg", "verdict_neg"),
                 ("neg", "neu", "neg"), ("mix", "neg", "verdict_neg")),
    "mixed": (("mix", "neu"), ("neu", "mix"), ("pos", "neg"), ("neg", "pos"), ("mix", "mix")),
    "neutral": (("neu", "neu"), ("neu", "neu", "neu")),
}  # fmt: skip
MOOD_WEIGHTS = {"positive": 0.34, "negative": 0.36, "mixed": 0.16, "neutral": 0.14}


def _fill(template: str, rng: random.Random) -> str:
    """Fill a template's slots with two distinct aspects and two distinct words per polarity."""
    aspect, aspect2 = rng.sample(ASPECTS, 2)
    pos, pos2 = rng.sample(POSITIVE, 2)
    neg, neg2 = rng.sample(NEGATIVE, 2)
    return template.format(aspect=aspect, aspect2=aspect2, pos=pos, pos2=pos2, neg=neg, neg2=neg2)


def _draw_opening(rng: random.Random) -> tuple[str, str]:
    """Draw an opening and its kind ("noun" or "clause"), each opening equally likely."""
    kind = rng.choices(("noun", "clause"), weights=(len(NOUN_OPENINGS), len(CLAUSE_OPENINGS)))[0]
    return rng.choice(NOUN_OPENINGS if kind == "noun" else CLAUSE_OPENINGS), kind


def _draw_review(rng: random.Random) -> str:
    """Draw one review of any length: a mood, a plan for it, then one sentence per kind."""
    mood = rng.choices(tuple(MOOD_WEIGHTS), weights=tuple(MOOD_WEIGHTS.values()))[0]
    first_kind, *rest_kinds = rng.choice(PLANS[mood])
    opening, opening_kind = _draw_opening(rng)
    first = opening + _fill(rng.choice(FIRST_SENTENCE_TAILS[opening_kind][first_kind]), rng)
    # Shuffled pools popped without replacement, so no template repeats within a review.
    pools = {
        kind: rng.sample(SENTENCES[kind], len(SENTENCES[kind]))
        for kind in dict.fromkeys(rest_kinds)
    }
    rest = [_fill(pools[kind].pop(), rng) for kind in rest_kinds]
    return " ".join([first, *rest])


def generate_reviews(n: int, seed: int) -> list[str]:
    """Return ``n`` reviews, deterministic in ``seed``, each ``MIN_CHARS``-``MAX_CHARS`` long.

    Reviews outside the length bounds are redrawn, so every review starts with an opening
    from ``NOUN_OPENINGS`` or ``CLAUSE_OPENINGS``.
    """
    rng = random.Random(seed)
    reviews: list[str] = []
    while len(reviews) < n:
        review = _draw_review(rng)
        if MIN_CHARS <= len(review) <= MAX_CHARS:
            reviews.append(review)
    return reviews


def review_openings(n: int, seed: int) -> list[str]:
    """Return ``n`` sentiment-neutral review openings drawn as ``generate_reviews`` draws them."""
    rng = random.Random(seed)
    return [_draw_opening(rng)[0] for _ in range(n)]


def split_opening(review: str) -> tuple[str, str]:
    """Split a review into its opening and the rest, so that ``opening + rest == review``.

    Raises ``ValueError`` when the review starts with none of the corpus openings.
    """
    matches = [o for o in (*NOUN_OPENINGS, *CLAUSE_OPENINGS) if review.startswith(o)]
    if not matches:
        raise ValueError(f"review starts with no known opening: {review[:40]!r}")
    opening = max(matches, key=len)
    return opening, review[len(opening) :]
