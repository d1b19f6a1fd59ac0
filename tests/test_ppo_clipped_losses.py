"""PPO's clipped losses and entropy, against element-by-element formulas (see
tests/test_ppo_losses.py for GAE, KL shaping, whitening and RLOO)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from preftune.losses.ppo import (
    entropy_from_logits,
    gae,
    kl_shaped_rewards,
    masked_mean,
    masked_moments,
    policy_loss,
    rloo_advantages,
    value_loss,
    whiten,
)
from tests.test_ppo_losses import GARBAGE, padded, random_batch, real


def ppo_inputs(seed: int) -> tuple[torch.Tensor, ...]:
    """Mask, log π, log π_old and advantages, with ratios spread well past a clip of 0.2."""
    g, mask, _ = random_batch(rows=8, steps=12, seed=seed)
    old = -torch.rand(mask.shape, generator=g) * 4
    logprobs = old + 0.4 * torch.randn(mask.shape, generator=g)
    advantages = torch.randn(mask.shape, generator=g)
    return mask, padded(logprobs, mask), padded(old, mask), padded(advantages, mask)


def test_policy_loss_matches_the_clipped_surrogate_element_by_element() -> None:
    mask, logprobs, old, advantages = ppo_inputs(seed=4)
    clip = 0.2
    loss, clipped, approx_kl = policy_loss(logprobs, old, advantages, mask, clip)
    seen_clipped = 0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t] == 0:
                assert loss[b, t] == 0 and clipped[b, t] == 0 and approx_kl[b, t] == 0
                continue
            diff = logprobs[b, t].item() - old[b, t].item()
            a, ratio = advantages[b, t].item(), math.exp(diff)
            bounded = min(max(ratio, 1 - clip), 1 + clip)
            plain, capped = -a * ratio, -a * bounded
            assert loss[b, t].item() == pytest.approx(max(plain, capped), rel=1e-5, abs=1e-6)
            is_clipped = capped > plain + 1e-6
            assert clipped[b, t].item() == float(is_clipped)
            seen_clipped += is_clipped
            assert approx_kl[b, t].item() == pytest.approx(0.5 * diff**2, rel=1e-5, abs=1e-7)
    real = int(mask.sum().item())
    assert 0 < seen_clipped < real  # both cases exercised
    assert masked_mean(clipped, mask).item() == pytest.approx(seen_clipped / real)


def test_policy_gradient_is_zero_where_clipped_and_flows_through_logprobs_only() -> None:
    mask, logprobs, old, advantages = ppo_inputs(seed=5)
    logprobs = logprobs.clone().requires_grad_(True)
    old = old.clone().requires_grad_(True)
    advantages = advantages.clone().requires_grad_(True)
    loss, clipped, _ = policy_loss(logprobs, old, advantages, mask, clip=0.2)
    loss.sum().backward()
    assert old.grad is None and advantages.grad is None
    grad = logprobs.grad
    assert grad is not None
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t] == 0 or clipped[b, t] == 1:
                assert grad[b, t].item() == 0.0
            else:
                # d/dlogπ of −A exp(logπ − logπ_old) = −A ρ.
                ratio = math.exp(logprobs[b, t].item() - old[b, t].item())
                expected = -advantages[b, t].item() * ratio
                assert grad[b, t].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert (grad[clipped == 1] == 0).all() and (clipped == 1).any()


def test_policy_loss_at_the_sampling_policy_is_minus_the_advantage() -> None:
    mask, _, old, advantages = ppo_inputs(seed=6)
    loss, clipped, approx_kl = policy_loss(old, old, advantages, mask, clip=0.2)
    torch.testing.assert_close(loss, -advantages * mask)
    assert clipped.sum() == 0 and approx_kl.sum() == 0


def value_inputs(seed: int) -> tuple[torch.Tensor, ...]:
    g, mask, _ = random_batch(rows=8, steps=12, seed=seed)
    old = torch.randn(mask.shape, generator=g)
    values = old + 0.5 * torch.randn(mask.shape, generator=g)
    returns = torch.randn(mask.shape, generator=g)
    return mask, padded(values, mask), padded(old, mask), padded(returns, mask)


def test_value_loss_matches_the_clipped_formula_element_by_element() -> None:
    mask, values, old, returns = value_inputs(seed=7)
    eps = 0.2
    loss, clipped = value_loss(values, old, returns, mask, eps)
    seen_clipped = 0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t] == 0:
                assert loss[b, t] == 0 and clipped[b, t] == 0
                continue
            v, v_old, ret = values[b, t].item(), old[b, t].item(), returns[b, t].item()
            moved = v_old + min(max(v - v_old, -eps), eps)
            plain, capped = (v - ret) ** 2, (moved - ret) ** 2
            assert loss[b, t].item() == pytest.approx(0.5 * max(plain, capped), rel=1e-5)
            is_clipped = capped > plain + 1e-6
            assert clipped[b, t].item() == float(is_clipped)
            seen_clipped += is_clipped
    assert 0 < seen_clipped < mask.sum().item()


@pytest.mark.parametrize("value_clip", [0.0, -1.0])
def test_value_loss_without_clipping(value_clip: float) -> None:
    mask, values, old, returns = value_inputs(seed=8)
    values = values.clone().requires_grad_(True)
    loss, clipped = value_loss(values, old, returns, mask, value_clip)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            error = values[b, t].item() - returns[b, t].item() if mask[b, t] else 0.0
            assert loss[b, t].item() == pytest.approx(0.5 * error**2, rel=1e-5, abs=1e-7)
    assert clipped.sum() == 0
    loss.sum().backward()
    assert values.grad is not None
    torch.testing.assert_close(values.grad, (values - returns).detach() * mask)


def test_whiten_centres_and_scales_the_masked_positions() -> None:
    g, mask, _ = random_batch(rows=6, steps=10, seed=9)
    values = padded(3.0 + 2.0 * torch.randn(mask.shape, generator=g), mask)
    raw = real(values, mask)
    mean, sd = statistics.fmean(raw), math.sqrt(statistics.pvariance(raw))
    out = whiten(values, mask)
    assert (out[mask == 0] == 0).all()
    for v, w in zip(raw, real(out, mask), strict=True):
        assert w == pytest.approx((v - mean) / sd, rel=1e-4, abs=1e-5)
    whitened = real(out, mask)
    assert statistics.fmean(whitened) == pytest.approx(0.0, abs=1e-5)
    assert statistics.pvariance(whitened) == pytest.approx(1.0, rel=1e-4)
    scaled = whiten(values, mask, shift_mean=False)
    kept = real(scaled, mask)
    assert statistics.fmean(kept) == pytest.approx(mean, rel=1e-5)
    assert statistics.pvariance(kept) == pytest.approx(1.0, rel=1e-4)
    assert (scaled[mask == 0] == 0).all()


def test_moments_of_two_halves_add_up_to_the_whole_batch() -> None:
    """Each process holds part of the batch: summed moments whiten as the whole batch would."""
    g, mask, _ = random_batch(rows=8, steps=10, seed=10)
    values = padded(torch.randn(mask.shape, generator=g) - 1.5, mask)
    whole = masked_moments(values, mask)
    halves = masked_moments(values[:4], mask[:4]) + masked_moments(values[4:], mask[4:])
    torch.testing.assert_close(halves, whole)
    raw = real(values, mask)
    assert whole[0].item() == pytest.approx(sum(raw), rel=1e-5)
    assert whole[1].item() == pytest.approx(sum(v * v for v in raw), rel=1e-5)
    assert whole[2].item() == len(raw)
    joined = torch.cat([whiten(values[:4], mask[:4], halves), whiten(values[4:], mask[4:], halves)])
    torch.testing.assert_close(joined, whiten(values, mask))
    # A half whitened on its own moments is not the same thing.
    assert not torch.allclose(whiten(values[:4], mask[:4]), joined[:4])


def test_masked_mean_ignores_padding() -> None:
    values = torch.tensor([[1.0, 2.0, GARBAGE], [4.0, GARBAGE, GARBAGE]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(values, mask).item() == pytest.approx(7.0 / 3.0)
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def naive_entropy(logits: list[float]) -> float:
    top = max(logits)
    weights = [math.exp(z - top) for z in logits]
    total = sum(weights)
    return -sum(w / total * math.log(w / total) for w in weights if w > 0)


def test_entropy_matches_the_naive_sum() -> None:
    g = torch.Generator().manual_seed(11)
    logits = 3.0 * torch.randn(4, 5, 50, generator=g)
    out = entropy_from_logits(logits)
    assert out.shape == (4, 5)
    for i in range(4):
        for j in range(5):
            expected = naive_entropy(logits[i, j].tolist())
            assert out[i, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    uniform = entropy_from_logits(torch.zeros(7, 32))
    torch.testing.assert_close(uniform, torch.full((7,), math.log(32)))


def test_entropy_is_stable_for_large_logits() -> None:
    g = torch.Generator().manual_seed(12)
    small = torch.randn(3, 100, generator=g)
    shifted = entropy_from_logits(small + 1e4)  # the same distributions
    torch.testing.assert_close(shifted, entropy_from_logits(small), rtol=1e-5, atol=1e-6)
    spread = 1e4 * torch.randn(3, 100, generator=g)
    out = entropy_from_logits(spread.to(torch.bfloat16))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    for i in range(3):
        expected = naive_entropy(spread.to(torch.bfloat16)[i].float().tolist())
        assert out[i].item() == pytest.approx(expected, abs=1e-6)
    # A ruled-out token (−inf) contributes nothing, and its gradient stays finite.
    ruled_out = torch.tensor([[0.0, 0.0, -math.inf]], requires_grad=True)
    value = entropy_from_logits(ruled_out)
    value.sum().backward()
    assert value.item() == pytest.approx(math.log(2))
    assert ruled_out.grad is not None and torch.isfinite(ruled_out.grad).all()


def test_inputs_are_left_untouched() -> None:
    mask, logprobs, old, advantages = ppo_inputs(seed=15)
    inputs = [mask, logprobs, old, advantages]
    copies = [x.clone() for x in inputs]
    kl_shaped_rewards(advantages[:, 0], logprobs, old, mask, 0.1)
    gae(logprobs, old, mask, 0.99, 0.95)
    whiten(advantages, mask)
    policy_loss(logprobs, old, advantages, mask, 0.2)
    value_loss(logprobs, old, advantages, mask, 0.2)
    rloo_advantages(advantages)
    for x, copy in zip(inputs, copies, strict=True):
        assert torch.equal(x, copy)


def test_half_precision_inputs_are_computed_in_float32() -> None:
    mask, logprobs, old, advantages = ppo_inputs(seed=16)
    logprobs, old, advantages = (x.to(torch.bfloat16) for x in (logprobs, old, advantages))
    loss, _, _ = policy_loss(logprobs, old, advantages, mask, 0.2)
    advantages_out, _ = gae(logprobs, old, mask.bool(), 0.99, 0.95)
    assert loss.dtype == torch.float32 and advantages_out.dtype == torch.float32
    assert whiten(advantages, mask).dtype == torch.float32
