"""Statistics of a pairwise win-rate evaluation of a policy against a baseline under a judge.

Each held-out prompt gives one verdict: the judge's probability ``p`` in [0, 1] that the policy's
response beats the baseline's (0.5 is a tie), and the lengths (tokens or characters) of the two
responses. The *hard* verdict of a prompt is 1 if p > 0.5, 0.5 if p == 0.5 and 0 otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from preftune.errors import ConfigError

Array = NDArray[np.float64]
Values = Sequence[float] | NDArray[Any]  # a list or a numpy array of numbers
BUCKETS = ("shorter", "equal", "longer")


def mean(values: Values) -> float:
    """The arithmetic mean, ``sum(values) / len(values)``: the default bootstrap statistic."""
    return float(np.mean(np.asarray(values, dtype=np.float64)))


def hard_verdicts(probs: Values) -> Array:
    """Each probability thresholded: 1.0 if p > 0.5, 0.5 if p == 0.5, 0.0 if p < 0.5."""
    p = np.asarray(probs, dtype=np.float64)
    return np.where(p > 0.5, 1.0, np.where(p == 0.5, 0.5, 0.0))


def wilson_interval(wins: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a proportion of ``wins`` out of ``n`` (ties count 0.5).

    With p = wins / n: ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``, clipped to [0, 1].
    """
    if n < 1:
        raise ConfigError(f"wilson_interval: n must be at least 1, got {n}")
    if not 0 <= wins <= n:
        raise ConfigError(f"wilson_interval: wins must lie in [0, n={n}], got {wins}")
    p, z2 = wins / n, z * z
    center = p + z2 / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    scale = 1 + z2 / n
    low = 0.0 if wins == 0 else max(0.0, (center - half) / scale)  # exact at the edges, where
    high = 1.0 if wins == n else min(1.0, (center + half) / scale)  # rounding would miss 0 or 1
    return low, high


def bootstrap_interval(
    values: Values,
    statistic: Callable[[Array], float] = mean,
    rounds: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(values)``.

    Draws ``rounds`` resamples of ``values`` with replacement (numpy's generator seeded with
    ``seed``, so the interval is deterministic for a seed) and returns the ``(1-level)/2`` and
    ``(1+level)/2`` quantiles of the statistic over the resamples.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ConfigError("bootstrap_interval: values must be a non-empty 1-D sequence")
    if rounds < 1 or not 0 < level < 1:
        raise ConfigError(f"bootstrap_interval: need rounds >= 1, 0 < level < 1: {rounds}, {level}")
    samples = x[np.random.default_rng(seed).integers(0, x.size, size=(rounds, x.size))]
    if statistic is mean:
        stats = samples.mean(axis=1)
    else:
        stats = np.array([statistic(row) for row in samples], dtype=np.float64)
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _vector(values: Values, what: str) -> Array:
    """``values`` as a 1-D float64 array, or a one-line error that names ``what``."""
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"win rate: {what} are not numbers: {e}") from None
    if x.ndim != 1:
        raise ConfigError(f"win rate: {what} must be one-dimensional, got shape {x.shape}")
    return x


def _check(
    probs: Values, policy_lengths: Values, baseline_lengths: Values
) -> tuple[Array, Array, Array]:
    """The probabilities and the two lengths as float64 arrays, checked."""
    p = _vector(probs, "probabilities")
    policy = _vector(policy_lengths, "policy lengths")
    baseline = _vector(baseline_lengths, "baseline lengths")
    if p.size == 0:
        raise ConfigError("win rate: no verdicts (empty probabilities)")
    if not p.size == policy.size == baseline.size:
        raise ConfigError(
            f"win rate: mismatched lengths: {p.size} probabilities, "
            f"{policy.size} policy lengths, {baseline.size} baseline lengths"
        )
    bad = np.flatnonzero(~((p >= 0) & (p <= 1)))  # NaN fails both comparisons
    if bad.size:
        raise ConfigError(f"win rate: probability {p[bad[0]]} at index {bad[0]} not in [0, 1]")
    lengths = np.concatenate([policy, baseline])
    if not np.all(np.isfinite(lengths) & (lengths >= 0)):
        raise ConfigError("win rate: lengths must be finite and non-negative")
    return p, policy, baseline


def length_controlled(
    probs: Values,
    policy_lengths: Values,
    baseline_lengths: Values,
    penalty: float = 1e-2,
) -> float:
    """Length-controlled win rate: the win rate the judge would give at zero length difference.

    Fits ``logit P(win) = a + b·x`` with ``x = d / rms(d)``, the *plain* standardized length
    difference ``d = len_policy - len_baseline`` (divided by its root mean square, not centred,
    so that x = 0 still means equal lengths; x = 0 for all if every d is 0). Each p is a soft
    label in the cross-entropy ``Σ softplus(z) - p·z`` (z = a + b·x), plus ``penalty/2·(a²+b²)``
    so the fit converges when the outcomes are separable. Minimized by damped Newton steps in
    float64. Returns ``sigmoid(a)``.
    """
    y, policy, baseline = _check(probs, policy_lengths, baseline_lengths)
    d = policy - baseline
    rms = math.sqrt(float(np.mean(d * d)))
    x = np.column_stack([np.ones_like(d), d / rms if rms > 0 else np.zeros_like(d)])

    def loss(beta: Array) -> float:
        z = x @ beta
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + penalty / 2 * beta @ beta)

    beta = np.zeros(2)
    current = loss(beta)
    for _ in range(100):
        s = 1 / (1 + np.exp(-(x @ beta)))
        grad = x.T @ (s - y) + penalty * beta
        hess = (x * (s * (1 - s))[:, None]).T @ x + penalty * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while loss(beta - t * step) > current and t > 1e-8:  # backtrack if Newton overshoots
            t /= 2
        beta = beta - t * step
        current = loss(beta)
        if float(np.max(np.abs(t * step))) < 1e-10:
            break
    return 1 / (1 + math.exp(-float(beta[0])))


@dataclass
class Bucket:
    """The verdicts whose length difference fell in one bucket: their count and hard win rate."""

    n: int
    win_rate: float | None  # None for an empty bucket


def by_length_bucket(
    probs: Values,
    policy_lengths: Values,
    baseline_lengths: Values,
    tolerance: float = 0.1,
) -> dict[str, Bucket]:
    """The hard win rate and count per bucket of the length difference d = policy - baseline.

    ``equal``: |d| <= tolerance · max(len_policy, len_baseline) (relative tolerance, 10% by
    default); otherwise ``shorter`` (d < 0) or ``longer`` (d > 0). Every verdict lands in exactly
    one bucket.
    """
    p, policy, baseline = _check(probs, policy_lengths, baseline_lengths)
    d = policy - baseline
    equal = np.abs(d) <= tolerance * np.maximum(policy, baseline)
    masks = {"shorter": ~equal & (d < 0), "equal": equal, "longer": ~equal & (d > 0)}
    hard = hard_verdicts(p)
    return {
        name: Bucket(int(mask.sum()), float(hard[mask].mean()) if mask.any() else None)
        for name, mask in masks.items()
    }


@dataclass
class WinRate:
    """A win-rate evaluation summarized; rates are fractions in [0, 1]."""

    n: int
    wins: float  # sum of hard verdicts
    win_rate: float  # wins / n
    mean_probability: float  # mean of p
    interval: tuple[float, float]  # 95% Wilson interval of win_rate
    probability_interval: tuple[float, float]  # 95% percentile bootstrap of mean_probability
    length_controlled: float
    buckets: dict[str, Bucket]

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (intervals as two-element lists)."""
        out = dataclasses.asdict(self)
        out["interval"] = list(self.interval)
        out["probability_interval"] = list(self.probability_interval)
        return out


def summarize(
    probs: Values,
    policy_lengths: Values,
    baseline_lengths: Values,
    seed: int = 0,
) -> WinRate:
    """All the statistics of one evaluation; ``seed`` seeds the bootstrap. The
    length-controlled rate is fitted to the hard verdicts, so that it reads beside the win
    rate."""
    p, policy, baseline = _check(probs, policy_lengths, baseline_lengths)
    wins = float(hard_verdicts(p).sum())
    return WinRate(
        n=p.size,
        wins=wins,
        win_rate=wins / p.size,
        mean_probability=mean(p),
        interval=wilson_interval(wins, p.size),
        probability_interval=bootstrap_interval(p, seed=seed),
        length_controlled=length_controlled(hard_verdicts(p), policy, baseline),
        buckets=by_length_bucket(p, policy, baseline),
    )


def table(rows: dict[str, WinRate]) -> str:
    """A plain-text table, one line per method: win rate, its 95% interval, LC win rate, n."""
    header = ("method", "win rate", "95% interval", "LC win rate", "n")
    lines = [header] + [
        (
            name,
            f"{100 * r.win_rate:.1f}%",
            f"[{100 * r.interval[0]:.1f}, {100 * r.interval[1]:.1f}]",
            f"{100 * r.length_controlled:.1f}%",
            str(r.n),
        )
        for name, r in rows.items()
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def render(line: tuple[str, ...]) -> str:
        cells = [
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return "\n".join(render(line) for line in lines)
