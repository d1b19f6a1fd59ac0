"""Each paired loss against an independent scalar formula, plus gradient checks."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import PAIRED_LOSSES, LossParams, PairLogps


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def reference_formula(name: str, h: float, beta: float, eps: float) -> float:
    """The losses as written in their papers, one scalar at a time."""
    if name == "sigmoid":
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if name == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if name == "hinge":
        return max(0.0, 1 - beta * h)
    raise AssertionError(name)


def random_logps(batch: int = 16, seed: int = 0) -> tuple[PairLogps, PairLogps]:
    g = torch.Generator().manual_seed(seed)
    draw = lambda: -torch.rand(batch, generator=g, dtype=torch.float64) * 50  # noqa: E731
    return PairLogps(draw(), draw()), PairLogps(draw(), draw())


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_loss_matches_independent_formula(name: str, beta: float) -> None:
    policy, reference = random_logps()
    eps = 0.2 if PAIRED_LOSSES[name].uses_label_smoothing else 0.0
    out = PAIRED_LOSSES[name].fn(policy, reference, LossParams(beta=beta, label_smoothing=eps))
    for i in range(len(out.losses)):
        h = (policy.chosen[i] - reference.chosen[i]) - (policy.rejected[i] - reference.rejected[i])
        expected = reference_formula(name, float(h), beta, eps)
        assert out.losses[i].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert out.chosen_rewards[i].item() == pytest.approx(
            beta * float(policy.chosen[i] - reference.chosen[i])
        )
        assert out.rejected_rewards[i].item() == pytest.approx(
            beta * float(policy.rejected[i] - reference.rejected[i])
        )


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge"])
def test_loss_gradients_match_finite_differences(name: str) -> None:
    policy, reference = random_logps(batch=6, seed=1)
    chosen = policy.chosen.clone().requires_grad_(True)
    rejected = policy.rejected.clone().requires_grad_(True)
    params = LossParams(beta=0.1, label_smoothing=0.1 if name == "sigmoid" else 0.0)

    def total(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return PAIRED_LOSSES[name].fn(PairLogps(c, r), reference, params).losses

    assert torch.autograd.gradcheck(total, (chosen, rejected))


def test_label_smoothing_changes_sigmoid_loss() -> None:
    policy, reference = random_logps()
    fn = PAIRED_LOSSES["sigmoid"].fn
    plain = fn(policy, reference, LossParams(beta=0.1)).losses
    smoothed = fn(policy, reference, LossParams(beta=0.1, label_smoothing=0.1)).losses
    assert not torch.allclose(plain, smoothed)


def test_sigmoid_gradient_matches_dpo_paper() -> None:
    """∂ℓ/∂log π(y_w) = −β σ(−β h) (DPO paper, section 4)."""
    policy, reference = random_logps(batch=5, seed=2)
    chosen = policy.chosen.clone().requires_grad_(True)
    out = PAIRED_LOSSES["sigmoid"].fn(
        PairLogps(chosen, policy.rejected), reference, LossParams(0.3)
    )
    out.losses.sum().backward()
    h = (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)
    assert torch.allclose(chosen.grad, -0.3 * torch.sigmoid(-0.3 * h))


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge"])
def test_reference_free_uses_a_uniform_reference(name: str) -> None:
    policy, _ = random_logps()
    zero = PairLogps(torch.zeros_like(policy.chosen), torch.zeros_like(policy.rejected))
    fn = PAIRED_LOSSES[name].fn
    free, with_zero = fn(policy, None, LossParams()), fn(policy, zero, LossParams())
    assert torch.equal(free.losses, with_zero.losses)
    assert torch.equal(free.chosen_rewards, 0.1 * policy.chosen)


def test_equal_logps_give_ln2_for_sigmoid() -> None:
    policy, _ = random_logps()
    out = PAIRED_LOSSES["sigmoid"].fn(policy, policy, LossParams(beta=0.1))
    assert torch.equal(out.losses, torch.full_like(out.losses, math.log(2)))


def test_loss_flags() -> None:
    assert PAIRED_LOSSES["ipo"].average_logps
    assert not PAIRED_LOSSES["sigmoid"].average_logps
    assert all(spec.needs_reference for spec in PAIRED_LOSSES.values())
    assert [n for n, s in PAIRED_LOSSES.items() if s.uses_label_smoothing] == ["sigmoid"]
