"""Win-rate statistics: Wilson and bootstrap intervals (values and coverage), the
length-controlled win rate against judges with and without a length bias, buckets, errors."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from preftune.errors import ConfigError
from preftune.winrate import (
    BUCKETS,
    WinRate,
    bootstrap_interval,
    by_length_bucket,
    length_controlled,
    summarize,
    table,
    wilson_interval,
)


def sigmoid(z: Any) -> Any:
    return 1 / (1 + np.exp(-z))


def biased_lengths(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Baseline lengths of 100-400 tokens; the policy's longer by about 150 ± 150 tokens."""
    rng = np.random.default_rng(seed)
    baseline = rng.integers(100, 400, n).astype(float)
    policy = np.maximum(baseline + rng.normal(150, 150, n), 1.0)
    return policy, baseline


@pytest.mark.parametrize(
    ("wins", "n", "expected"),
    [
        (50, 100, (0.403832, 0.596168)),
        (0, 10, (0.0, 0.277533)),
        (10, 10, (0.722467, 1.0)),
        (2.5, 4, (0.219427, 0.908101)),  # a tie counts half a win
    ],
)
def test_wilson_matches_hand_computed_values(
    wins: float, n: int, expected: tuple[float, float]
) -> None:
    low, high = wilson_interval(wins, n)
    assert low == pytest.approx(expected[0], abs=1e-4)
    assert high == pytest.approx(expected[1], abs=1e-4)
    if wins == 0:
        assert low == 0.0
    if wins == n:
        assert high == 1.0


def test_wilson_is_wider_for_larger_z_and_fewer_verdicts() -> None:
    narrow, wide = wilson_interval(30, 100, z=1.0), wilson_interval(30, 100)
    assert wide[0] < narrow[0] < 0.3 < narrow[1] < wide[1]
    few = wilson_interval(3, 10)
    assert few[1] - few[0] > wide[1] - wide[0]


@pytest.mark.parametrize("q", [0.3, 0.6])
def test_wilson_covers_the_true_rate_about_95_percent_of_the_time(q: float) -> None:
    covered = 0
    for seed in range(400):
        wins = int(np.random.default_rng(seed).binomial(200, q))
        low, high = wilson_interval(wins, 200)
        covered += low <= q <= high
    assert 0.92 <= covered / 400 <= 0.98


@pytest.mark.parametrize("q", [0.3, 0.6])
def test_bootstrap_covers_the_true_rate_about_95_percent_of_the_time(q: float) -> None:
    covered = 0
    for seed in range(400):
        verdicts = (np.random.default_rng(10_000 + seed).random(200) < q).astype(float)
        low, high = bootstrap_interval(verdicts, rounds=500, seed=seed)
        covered += low <= q <= high
    assert 0.90 <= covered / 400 <= 0.98


def test_bootstrap_is_deterministic_for_a_seed_and_takes_any_statistic() -> None:
    values = np.random.default_rng(0).random(50).tolist()
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)
    assert bootstrap_interval(values, seed=3) != bootstrap_interval(values, seed=4)
    low, high = bootstrap_interval(values, statistic=lambda x: float(np.median(x)), rounds=300)
    assert low < float(np.median(values)) < high
    wide, narrow = bootstrap_interval(values, level=0.99), bootstrap_interval(values, level=0.5)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_length_bias_alone_is_removed_by_length_control() -> None:
    # The judge likes length and nothing else: P(win) = 0.5 + 0.45·tanh(d/150), not the
    # logistic form the fit assumes, so this is not the model checking itself.
    policy, baseline = biased_lengths(4000, seed=1)
    probs = 0.5 + 0.45 * np.tanh((policy - baseline) / 150)
    assert probs.mean() > 0.7
    assert summarize(probs, policy, baseline).win_rate > 0.75
    assert length_controlled(probs, policy, baseline) == pytest.approx(0.5, abs=0.05)
    # The same with hard 0/1 verdicts drawn from a logistic length preference.
    rng = np.random.default_rng(2)
    hard = (rng.random(4000) < sigmoid((policy - baseline) / 100)).astype(float)
    assert hard.mean() > 0.7
    assert length_controlled(hard, policy, baseline) == pytest.approx(0.5, abs=0.05)


def test_length_control_keeps_a_real_advantage_under_a_length_bias() -> None:
    policy, baseline = biased_lengths(2000, seed=3)
    probs = sigmoid(1.0 + (policy - baseline) / 100)  # quality worth sigmoid(1) at equal length
    assert probs.mean() > 0.85
    assert length_controlled(probs, policy, baseline) == pytest.approx(sigmoid(1.0), abs=0.01)


def test_without_length_effect_length_control_matches_the_raw_rate() -> None:
    rng = np.random.default_rng(4)
    policy, baseline = rng.integers(50, 500, (2, 2000)).astype(float)
    hard = (rng.random(2000) < 0.7).astype(float)
    result = summarize(hard, policy, baseline)
    assert result.win_rate == pytest.approx(0.7, abs=0.03)
    assert result.length_controlled == pytest.approx(result.win_rate, abs=0.02)


def test_length_control_converges_when_outcomes_are_separable() -> None:
    policy, baseline = [10.0, 20.0, 30.0, 40.0], [25.0, 25.0, 25.0, 25.0]
    assert 0.5 < length_controlled([1.0, 1.0, 1.0, 1.0], policy, baseline) <= 1.0
    assert 0.2 < length_controlled([0.0, 0.0, 1.0, 1.0], policy, baseline) < 0.8
    same = length_controlled([1.0, 0.0, 1.0, 1.0], [5.0] * 4, [5.0] * 4)  # d = 0 everywhere
    assert same == pytest.approx(0.75, abs=0.01)


def test_buckets_count_every_verdict_once() -> None:
    rng = np.random.default_rng(5)
    n = 500
    baseline = rng.integers(50, 150, n).astype(float)
    policy = baseline + rng.integers(-40, 41, n)
    probs = rng.choice([0.0, 0.2, 0.5, 0.8, 1.0], n)
    buckets = by_length_bucket(probs, policy, baseline, tolerance=0.1)
    assert tuple(buckets) == BUCKETS
    assert sum(b.n for b in buckets.values()) == n
    d, longest = policy - baseline, np.maximum(policy, baseline)
    equal = np.abs(d) <= 0.1 * longest
    hard = np.where(probs > 0.5, 1.0, np.where(probs == 0.5, 0.5, 0.0))
    for name, mask in [
        ("shorter", ~equal & (d < 0)),
        ("equal", equal),
        ("longer", ~equal & (d > 0)),
    ]:
        assert buckets[name].n == int(mask.sum()) > 0
        assert buckets[name].win_rate == pytest.approx(hard[mask].mean())
    empty = by_length_bucket([1.0], [10.0], [10.0])
    assert (empty["equal"].n, empty["shorter"].n, empty["shorter"].win_rate) == (1, 0, None)


def test_summary_thresholds_verdicts_and_renders() -> None:
    probs = [1.0, 0.5, 0.2, 0.7, 0.9, 0.0]
    result = summarize(probs, [10, 20, 30, 40, 50, 60], [30, 30, 30, 30, 30, 30])
    assert (result.n, result.wins) == (6, 3.5)
    assert result.win_rate == pytest.approx(3.5 / 6)
    assert result.mean_probability == pytest.approx(sum(probs) / 6)
    assert result.interval == wilson_interval(3.5, 6)
    assert (
        result.probability_interval[0] <= result.mean_probability <= result.probability_interval[1]
    )
    data = json.loads(json.dumps(result.as_dict()))
    assert data["interval"] == list(result.interval)
    assert data["buckets"]["equal"]["n"] == 1
    other = WinRate(**{**vars(result), "n": 1234, "length_controlled": 0.25})
    text = table({"dpo": result, "simpo-long-name": other})
    lines = text.splitlines()
    assert len(lines) == 3 and "LC win rate" in lines[0]
    assert lines[1].startswith("dpo ") and "58.3%" in lines[1]
    assert "25.0%" in lines[2] and lines[2].endswith("1234")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: summarize([], [], []), "empty"),
        (lambda: summarize([0.5, 0.5], [1, 2], [1]), "mismatched"),
        (lambda: summarize([0.5, 1.2], [1, 2], [1, 2]), "not in [0, 1]"),
        (lambda: summarize([-0.1], [1], [1]), "not in [0, 1]"),
        (lambda: length_controlled([math.nan], [1], [1]), "not in [0, 1]"),
        (lambda: by_length_bucket([0.5], [-1], [1]), "non-negative"),
        (lambda: wilson_interval(11, 10), "wins"),
        (lambda: wilson_interval(0, 0), "n must"),
        (lambda: summarize([[0.5]], [[1]], [[1]]), "one-dimensional"),  # type: ignore[list-item]
        (lambda: summarize(["high"], [1], [1]), "not numbers"),  # type: ignore[list-item]
        (lambda: bootstrap_interval([]), "non-empty"),
        (lambda: bootstrap_interval([1.0], level=1.5), "level"),
    ],
)
def test_bad_inputs_raise_one_line_errors(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        call()
    text = str(caught.value)
    assert message in text
    assert "\n" not in text
