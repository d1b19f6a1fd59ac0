"""Several datasets read as one: ``data.train`` (or ``data.eval``) given as a list of sources.

Without ``data.weights`` (and always for ``data.eval``), the sources are concatenated, each in
its own order. With them (one positive number per ``data.train`` source), the sources are mixed
in those proportions, exactly:

- the mixture holds as many examples as its sources together, N;
- source i's share is N * w_i / sum(w), rounded down, the examples left over going one each to
  the sources with the largest remainders (the earlier source on a tie), so the shares add up
  to N;
- a source fills its share with all of its examples as many whole times as fit, then a random
  subset of them, without repeats, for the rest;
- the mixture is then shuffled.

Both draws come from one generator (NumPy's ``default_rng``) seeded by the run's ``seed``, so
every build of the same sources, weights and seed gives the same examples in the same order: a
resumed run trains on what the run it resumes did. Weights are proportions of examples (rows
kept after truncation; a ranked row counts as the examples it gives), not of rows or tokens.

A mixture is a view (:class:`Mixture`): indexing it indexes its sources, so examples kept in
Arrow stay on disk. Its ``content_digest`` (what :func:`~preftune.data.digest.examples_digest`
returns for it) covers its sources' digests and the order it takes their examples in, so it
changes whenever a source's examples, the weights or the seed change what is trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from fractions import Fraction
from functools import cached_property
from typing import Any, TypeVar, overload

import numpy as np

from preftune.data.digest import examples_digest

T = TypeVar("T")


def source_list(value: str | list[str] | None) -> list[str]:
    """The sources a ``data.train`` or ``data.eval`` value names: none, one, or a list's."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def mixed(parts: Sequence[Sequence[T]], weights: Sequence[float] | None, seed: int) -> Sequence[T]:
    """The sources ``parts`` as one sequence: a single unweighted source as it is (so a list of
    one source is that source, digest included), else their :class:`Mixture`."""
    if len(parts) == 1 and weights is None:
        return parts[0]
    return Mixture(parts, weights, seed)


def shares(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split in proportion to ``weights`` by largest remainders: each share rounded
    down, then one more to each of the largest remainders (the earlier on a tie) until the
    shares add up to ``total``. Computed in exact fractions, so no rounding error decides."""
    whole = sum(Fraction(weight) for weight in weights)
    exact = [total * Fraction(weight) / whole for weight in weights]
    counts = [int(share) for share in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def plan(
    sizes: Sequence[int], weights: Sequence[float] | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The source and the index within it of each example of the mixture of sources of
    ``sizes``, in the mixture's order (see the module's docstring)."""
    sources = np.arange(len(sizes), dtype=np.int64)
    if weights is None:
        counts = list(sizes)
        picks = [np.arange(size, dtype=np.int64) for size in sizes]
        return np.repeat(sources, counts), np.concatenate(picks)
    if not all(sizes):
        raise ValueError("each source of a weighted mixture needs at least one example")
    rng = np.random.default_rng(seed)
    counts = shares(sum(sizes), weights)
    picks = []
    for size, count in zip(sizes, counts, strict=True):
        repeats, rest = divmod(count, size)
        subset = np.sort(rng.choice(size, rest, replace=False)).astype(np.int64)
        picks.append(np.concatenate([np.tile(np.arange(size, dtype=np.int64), repeats), subset]))
    order = rng.permutation(sum(counts))
    return np.repeat(sources, counts)[order], np.concatenate(picks)[order]


class Mixture(Sequence[T]):
    """The sources ``parts`` concatenated (``weights`` None) or mixed in the proportions of
    ``weights`` with the generator seeded by ``seed``; ``counts`` is how many examples each
    source gives."""

    def __init__(
        self, parts: Sequence[Sequence[T]], weights: Sequence[float] | None, seed: int
    ) -> None:
        self.parts = list(parts)
        self.weights = None if weights is None else list(weights)
        self._source, self._index = plan([len(part) for part in parts], weights, seed)
        self.counts = np.bincount(self._source, minlength=len(parts)).tolist()

    @cached_property
    def content_digest(self) -> str:
        """A digest of the sources' digests and of which example of which source comes where."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"preftune mixture {len(self)};".encode())
        for part in self.parts:
            digest.update(f"{examples_digest(part)};".encode())
        digest.update(self._source.astype("<i8").tobytes())
        digest.update(self._index.astype("<i8").tobytes())
        return digest.hexdigest()

    def describe(self, key: str, names: Sequence[str]) -> str:
        """One line on what the mixture of the sources ``names`` (``key``'s) takes from each."""
        if self.weights is None:
            return f"{key}: {len(self.parts)} sources concatenated, {len(self)} examples"
        taken = [
            f"{name}: {count} of its {len(part)} (weight {weight:g})"
            for name, part, count, weight in zip(
                names, self.parts, self.counts, self.weights, strict=True
            )
        ]
        return f"{key}: a mixture of {len(self)} examples; " + "; ".join(taken)

    def __len__(self) -> int:
        return len(self._source)

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.parts[int(self._source[index])][int(self._index[index])]
