"""Ranked rows: a ``prompt``, its ``responses`` (two or more) and their order, given either as a
``ranking`` (indices into ``responses``, best first) or as ``scores`` (one number per response,
higher is better; equal scores are a tie).

Rows are validated by the same checker as the other layouts
(:class:`~preftune.data.rows.RowChecker`), so every error names the source, the row and the
field.
"""

from __future__ import annotations

from typing import Any

from preftune.data.records import Ranked, Ranking
from preftune.data.rows import RowChecker

ORDER_FIELDS = ("ranking", "scores")


def read_ranked(check: RowChecker) -> Ranked:
    """The row of ``check`` as a :class:`Ranked` record."""
    conversational = isinstance(check.row["prompt"], list)
    prompt = check.text("prompt", conversational)
    responses = check.row["responses"]
    if not isinstance(responses, list):
        got = type(responses).__name__
        raise check.error(f"expected a list of responses, got {got}", "responses")
    if len(responses) < 2:
        raise check.error(f"needs at least 2 responses to rank, got {len(responses)}", "responses")
    texts = []
    for index, response in enumerate(responses):
        # A checker of the one item, so its errors name ``responses[i]``.
        name = f"responses[{index}]"
        item = RowChecker(check.spec, check.number, {name: response})
        texts.append(item.text(name, conversational, response=True))
    given = [field for field in ORDER_FIELDS if check.row.get(field) is not None]
    if len(given) == 2:
        raise check.error("give ranking or scores, not both", "scores")
    if not given:
        message = "missing; ranked rows need ranking (indices, best first) or scores"
        raise check.error(message, "ranking")
    order = _ranking if given[0] == "ranking" else _scores
    ranking = order(check, check.row[given[0]], len(texts))
    for column in ("margin", "chosen_probability"):
        if check.row.get(column) is not None:
            message = f"only pairs take a {column}; a ranked row's order is its ranking or scores"
            raise check.error(message, column)
    return Ranked(prompt, tuple(texts), ranking)


def _ranking(check: RowChecker, value: Any, count: int) -> Ranking:
    if not isinstance(value, list):
        raise check.error(f"expected a list of indices, got {type(value).__name__}", "ranking")
    seen: set[int] = set()
    for position, index in enumerate(value):
        if not isinstance(index, int) or isinstance(index, bool):
            got = type(index).__name__
            raise check.error(f"expected an integer index, got {got}", f"ranking[{position}]")
        if not 0 <= index < count:
            message = f"index {index} is out of range for {count} responses (0 to {count - 1})"
            raise check.error(message, f"ranking[{position}]")
        if index in seen:
            message = f"index {index} is listed twice; a ranking lists each response once"
            raise check.error(message, f"ranking[{position}]")
        seen.add(index)
    if len(seen) < count:
        missing = ", ".join(str(index) for index in range(count) if index not in seen)
        message = f"not a permutation of the {count} responses: missing {missing}"
        raise check.error(message, "ranking")
    return tuple((index,) for index in value)


def _scores(check: RowChecker, value: Any, count: int) -> Ranking:
    if not isinstance(value, list):
        raise check.error(f"expected a list of numbers, got {type(value).__name__}", "scores")
    if len(value) != count:
        raise check.error(f"{len(value)} scores for {count} responses", "scores")
    for position, score in enumerate(value):
        check.finite_number(score, f"scores[{position}]")
    levels = sorted(set(value), reverse=True)
    if len(levels) == 1:
        raise check.error("all scores are equal, so no response is preferred", "scores")
    return tuple(tuple(i for i, score in enumerate(value) if score == level) for level in levels)
