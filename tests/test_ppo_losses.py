"""PPO and RLOO arithmetic against hand-worked numbers and plain-Python loops."""

from __future__ import annotations

import json
import math

import pytest
import torch

from preftune.losses.ppo import (
    AdaptiveKLController,
    explained_variance,
    gae,
    kl_shaped_rewards,
    masked_mean,
    rloo_advantages,
)

GARBAGE = 9.0  # what padding holds in the inputs: no output may depend on it


def random_batch(
    rows: int = 6, steps: int = 9, seed: int = 0
) -> tuple[torch.Generator, torch.Tensor, list[int]]:
    """A generator, a (rows, steps) prefix mask of random row lengths (1 to steps, the longest
    always present), and the lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, steps + 1, (rows,), generator=g).tolist()
    lengths[0] = steps
    mask = torch.tensor([[1.0] * n + [0.0] * (steps - n) for n in lengths])
    return g, mask, lengths


def padded(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with GARBAGE at the padding positions."""
    return torch.where(mask > 0, x, torch.full_like(x, GARBAGE))


def real(x: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """The entries of ``x`` at the real (unpadded) positions, row by row."""
    return x[mask > 0].tolist()


def test_gae_on_a_hand_worked_trajectory() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, -1.0, GARBAGE]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.4, GARBAGE]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # Row 0, backwards: δ_2 = 1 − 0.7 = 0.3, A_2 = 0.3; δ_1 = 0.7 − 0.6 = 0.1,
    # A_1 = 0.1 + 0.95·0.3 = 0.385; δ_0 = 0.6 − 0.5 = 0.1, A_0 = 0.1 + 0.95·0.385 = 0.46575.
    # Row 1 ends at t = 1: δ_1 = −1 − 0.4 = −1.4, A_1 = −1.4; δ_0 = 0.5 + 0.4 − 0.2 = 0.7,
    # A_0 = 0.7 + 0.95·(−1.4) = −0.63.
    expected_advantages = torch.tensor([[0.46575, 0.385, 0.3], [-0.63, -1.4, 0.0]])
    expected_returns = torch.tensor([[0.96575, 0.985, 1.0], [-0.43, -1.0, 0.0]])
    torch.testing.assert_close(advantages, expected_advantages)
    torch.testing.assert_close(returns, expected_returns)


def test_gae_matches_the_discounted_sum_of_td_errors() -> None:
    """A_t = Σ_l (γλ)^l δ_{t+l} up to the row's end, one row and one position at a time."""
    g, mask, lengths = random_batch(rows=7, steps=11, seed=1)
    rewards = padded(torch.randn(mask.shape, generator=g), mask)
    values = padded(torch.randn(mask.shape, generator=g), mask)
    gamma, lam = 0.9, 0.8
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    r, v = rewards.tolist(), values.tolist()
    for b, length in enumerate(lengths):
        deltas = []
        for t in range(length):
            next_value = v[b][t + 1] if t + 1 < length else 0.0
            deltas.append(r[b][t] + gamma * next_value - v[b][t])
        for t in range(mask.shape[1]):
            if t >= length:
                assert advantages[b, t].item() == 0.0 and returns[b, t].item() == 0.0
                continue
            expected = sum((gamma * lam) ** i * deltas[t + i] for i in range(length - t))
            assert advantages[b, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
            assert returns[b, t].item() == pytest.approx(expected + v[b][t], rel=1e-5, abs=1e-5)


def test_gae_with_gamma_and_lambda_one_returns_the_reward_to_go() -> None:
    g, mask, lengths = random_batch(seed=2)
    rewards = padded(torch.randn(mask.shape, generator=g), mask)
    values = padded(torch.randn(mask.shape, generator=g, requires_grad=True), mask)
    _, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert not returns.requires_grad
    for b, length in enumerate(lengths):
        for t in range(length):
            to_go = sum(rewards[b, t:length].tolist())
            assert returns[b, t].item() == pytest.approx(to_go, rel=1e-5, abs=1e-5)


def test_kl_shaped_rewards_pay_the_score_at_the_last_real_token() -> None:
    g, mask, lengths = random_batch(seed=3)
    logprobs = padded(-torch.rand(mask.shape, generator=g) * 5, mask)
    ref_logprobs = padded(-torch.rand(mask.shape, generator=g) * 5, mask)
    scores = torch.randn(mask.shape[0], generator=g)
    rewards, kl = kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.05)
    for b, length in enumerate(lengths):
        for t in range(mask.shape[1]):
            if t >= length:
                assert rewards[b, t].item() == 0.0 and kl[b, t].item() == 0.0
                continue
            k = logprobs[b, t].item() - ref_logprobs[b, t].item()
            expected = -0.05 * k + (scores[b].item() if t == length - 1 else 0.0)
            assert kl[b, t].item() == pytest.approx(k, abs=1e-6)
            assert rewards[b, t].item() == pytest.approx(expected, abs=1e-6)
    # Without the KL term, each row's rewards sum to its score, all of it at one position.
    rewards, _ = kl_shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.0)
    torch.testing.assert_close(rewards.sum(dim=1), scores)
    assert ((rewards != 0).sum(dim=1) <= 1).all()


def test_kl_shaped_rewards_give_an_empty_row_nothing() -> None:
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    rewards, kl = kl_shaped_rewards(
        torch.tensor([2.0, 3.0]), torch.full((2, 2), -1.0), torch.full((2, 2), -2.0), mask, 0.1
    )
    torch.testing.assert_close(rewards, torch.tensor([[-0.1, 1.9], [0.0, 0.0]]))
    torch.testing.assert_close(kl, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))


def test_rloo_advantages_against_leave_one_out_means() -> None:
    g = torch.Generator().manual_seed(13)
    for samples in (2, 3, 8):
        scores = torch.randn(5, samples, generator=g)
        out = rloo_advantages(scores)
        for p, row in enumerate(scores.tolist()):
            for i, r in enumerate(row):
                others = [row[j] for j in range(samples) if j != i]
                expected = r - sum(others) / len(others)
                assert out[p, i].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
        scaled = samples / (samples - 1) * (scores - scores.mean(dim=1, keepdim=True))
        torch.testing.assert_close(out, scaled)
    # Two samples: each advantage is the difference of the pair.
    torch.testing.assert_close(
        rloo_advantages(torch.tensor([[1.0, 3.0]])), torch.tensor([[-2.0, 2.0]])
    )


def test_rloo_needs_two_samples_per_prompt() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.ones(4, 1))


def test_explained_variance() -> None:
    g, mask, _ = random_batch(seed=14)
    returns = padded(torch.randn(mask.shape, generator=g), mask)
    perfect = torch.where(mask > 0, returns, torch.full_like(returns, -GARBAGE))
    assert explained_variance(perfect, returns, mask) == pytest.approx(1.0)
    mean = masked_mean(returns, mask)
    assert explained_variance(mean.expand_as(returns), returns, mask) == pytest.approx(
        0.0, abs=1e-6
    )
    # By hand: R = [1, 2, 3, 4] (Var 1.25), R − V = [0, 0, 0, −1] (Var 0.1875): 1 − 0.15.
    returns = torch.tensor([[1.0, 2.0, 3.0], [4.0, GARBAGE, GARBAGE]])
    values = torch.tensor([[1.0, 2.0, 3.0], [5.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert explained_variance(values, returns, mask) == pytest.approx(0.85)
    constant = torch.full((2, 3), 0.1)
    assert math.isnan(explained_variance(values, constant, mask))


def test_adaptive_kl_controller_follows_the_formula() -> None:
    fixed = AdaptiveKLController(0.1, None, horizon=10_000)
    fixed.update(current_kl=50.0, n_steps=256)
    assert fixed.value == 0.1
    above = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    above.update(current_kl=6.6, n_steps=256)  # error 0.1
    assert above.value == pytest.approx(0.1 * (1 + 0.1 * 256 / 10_000))
    far_above = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    far_above.update(current_kl=60.0, n_steps=256)  # error capped at 0.2
    assert far_above.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    below = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    below.update(current_kl=5.4, n_steps=256)  # error −0.1
    assert below.value == pytest.approx(0.1 * (1 - 0.1 * 256 / 10_000))
    far_below = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    far_below.update(current_kl=0.0, n_steps=256)  # error capped at −0.2
    assert far_below.value == pytest.approx(0.1 * (1 - 0.2 * 256 / 10_000))
    on_target = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    on_target.update(current_kl=6.0, n_steps=256)
    assert on_target.value == 0.1


def test_adaptive_kl_controller_resumes_exactly() -> None:
    kls = [8.0, 7.1, 3.3, 6.5, 12.0, 0.4]
    straight = AdaptiveKLController(0.2, target=6.0, horizon=1_000)
    for kl in kls:
        straight.update(kl, n_steps=64)
    first = AdaptiveKLController(0.2, target=6.0, horizon=1_000)
    for kl in kls[:3]:
        first.update(kl, n_steps=64)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = AdaptiveKLController(0.2, target=6.0, horizon=1_000)
    resumed.load_state_dict(state)
    assert resumed.value == first.value != 0.2
    for kl in kls[3:]:
        resumed.update(kl, n_steps=64)
    assert resumed.value == straight.value
