"""Each paired loss against an independent scalar formula, plus gradient checks."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses import PAIRED_LOSSES, LossParams, PairLogps

REFERENCE_FREE = {"simpo", "orpo", "cpo", "sft"}
SMOOTHED = {"sigmoid", "robust", "exo_pair", "aot", "aot_pair"}
# Rewards on length-averaged log-probabilities; on the policy's alone (no reference).
AVERAGED_REWARDS = {"ipo", "sigmoid_norm", "simpo", "orpo"}
POLICY_REWARDS = {"simpo", "orpo", "cpo"}


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return math.exp(log_sigmoid(x))


def logistic(delta: float, beta: float, eps: float) -> float:
    return -(1 - eps) * log_sigmoid(beta * delta) - eps * log_sigmoid(-beta * delta)


def reference_formula(name: str, x: dict[str, list[float]], p: LossParams) -> list[float]:
    """The losses as written in their papers, from plain floats, one example at a time.

    ``x`` holds the batch as lists: policy (pc, pr) and reference (rc, rr) summed log-probs of
    chosen and rejected, and their token counts (nc, nr).
    """
    b, eps, n = p.beta, p.label_smoothing, len(x["pc"])
    rho_w = [x["pc"][i] - x["rc"][i] for i in range(n)]
    rho_l = [x["pr"][i] - x["rr"][i] for i in range(n)]
    if name == "aot":
        margins = sorted(x["pc"][i] - x["pr"][i] for i in range(n))
        reference_margins = sorted(x["rc"][i] - x["rr"][i] for i in range(n))
        return [logistic(m - r, b, eps) for m, r in zip(margins, reference_margins, strict=True)]
    if name == "aot_pair":
        pairs = zip(sorted(rho_w), sorted(rho_l), strict=True)
        return [logistic(chosen - rejected, b, eps) for chosen, rejected in pairs]
    delta = b * (sum(rho_w) + sum(rho_l)) / (2 * n)  # bco_pair's reward shift
    return [
        example_formula(name, rho_w[i], rho_l[i], {k: v[i] for k, v in x.items()}, p, delta)
        for i in range(n)
    ]


def example_formula(
    name: str, rho_w: float, rho_l: float, x: dict[str, float], p: LossParams, delta: float
) -> float:
    b, eps = p.beta, p.label_smoothing
    h = rho_w - rho_l
    h_mean = rho_w / x["nc"] - rho_l / x["nr"]
    mean_w, mean_l = x["pc"] / x["nc"], x["pr"] / x["nr"]
    r_w, r_l = b * rho_w, b * rho_l
    if name == "sigmoid":
        return -(1 - eps) * log_sigmoid(b * h) - eps * log_sigmoid(-b * h)
    if name == "robust":
        return (-(1 - eps) * log_sigmoid(b * h) + eps * log_sigmoid(-b * h)) / (1 - 2 * eps)
    if name == "exo_pair":
        e = eps or 1e-3
        q_w, q_l = sigmoid(b * h), sigmoid(-b * h)
        return q_w * math.log(q_w / (1 - e)) + q_l * math.log(q_l / e)
    if name == "ipo":
        return (h_mean - 1 / (2 * b)) ** 2
    if name == "hinge":
        return max(0.0, 1 - b * h)
    if name == "sigmoid_norm":
        return -log_sigmoid(b * h_mean)
    if name == "discopop":
        weight = sigmoid(b * h / p.discopop_tau)
        return (1 - weight) * -log_sigmoid(b * h) + weight * math.exp(-b * h)
    if name == "nca_pair":
        return -log_sigmoid(r_w) - 0.5 * log_sigmoid(-r_w) - 0.5 * log_sigmoid(-r_l)
    if name == "bco_pair":
        return -log_sigmoid(r_w - delta) - log_sigmoid(-(r_l - delta))
    if name == "sppo_hard":
        return (rho_w - 1 / (2 * b)) ** 2 + (rho_l + 1 / (2 * b)) ** 2
    if name == "apo_zero":
        return -sigmoid(r_w) + sigmoid(r_l)
    if name == "apo_down":
        return sigmoid(r_w) - sigmoid(r_w - r_l)
    if name == "simpo":
        return -log_sigmoid(b * mean_w - b * mean_l - p.simpo_gamma)
    if name == "orpo":
        odds = [math.exp(a) / (1 - math.exp(a)) for a in (mean_w, mean_l)]
        return -mean_w - b * log_sigmoid(math.log(odds[0]) - math.log(odds[1]))
    if name == "cpo":
        return -log_sigmoid(b * x["pc"] - b * x["pr"]) - mean_w
    if name == "sft":
        return -mean_w
    raise AssertionError(name)


def expected_rewards(name: str, x: dict[str, list[float]], beta: float, i: int) -> tuple:
    chosen, rejected = x["pc"][i], x["pr"][i]
    if name not in POLICY_REWARDS:
        chosen, rejected = chosen - x["rc"][i], rejected - x["rr"][i]
    if name in AVERAGED_REWARDS:
        chosen, rejected = chosen / x["nc"][i], rejected / x["nr"][i]
    return beta * chosen, beta * rejected


def random_logps(batch: int = 16, seed: int = 0) -> tuple[PairLogps, PairLogps]:
    """Policy and reference log-probs of ``batch`` pairs, with shared random token counts."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda: -torch.rand(batch, generator=g, dtype=torch.float64) * 50  # noqa: E731
    count = lambda: torch.randint(1, 30, (batch,), generator=g).double()  # noqa: E731
    chosen_tokens, rejected_tokens = count(), count()
    policy = PairLogps(draw(), draw(), chosen_tokens, rejected_tokens)
    return policy, PairLogps(draw(), draw(), chosen_tokens, rejected_tokens)


def as_lists(policy: PairLogps, reference: PairLogps) -> dict[str, list[float]]:
    tensors = {
        "pc": policy.chosen,
        "pr": policy.rejected,
        "rc": reference.chosen,
        "rr": reference.rejected,
        "nc": policy.chosen_tokens,
        "nr": policy.rejected_tokens,
    }
    return {key: t.tolist() for key, t in tensors.items()}


def params_for(name: str, beta: float = 0.1) -> LossParams:
    eps = 0.2 if PAIRED_LOSSES[name].uses_label_smoothing else 0.0
    return LossParams(beta=beta, label_smoothing=eps, simpo_gamma=0.3, discopop_tau=0.05)


def with_policy(logps: PairLogps, chosen: torch.Tensor, rejected: torch.Tensor) -> PairLogps:
    return PairLogps(chosen, rejected, logps.chosen_tokens, logps.rejected_tokens)


@pytest.mark.parametrize("name", sorted(PAIRED_LOSSES))
@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_loss_matches_independent_formula(name: str, beta: float) -> None:
    policy, reference = random_logps()
    params = params_for(name, beta)
    out = PAIRED_LOSSES[name].fn(policy, reference, params)
    x = as_lists(policy, reference)
    expected = reference_formula(name, x, params)
    assert out.losses.shape == policy.chosen.shape
    for i, value in enumerate(expected):
        assert out.losses[i].item() == pytest.approx(value, rel=1e-9, abs=1e-12)
        chosen, rejected = expected_rewards(name, x, beta, i)
        assert out.chosen_rewards[i].item() == pytest.approx(chosen, rel=1e-9, abs=1e-12)
        assert out.rejected_rewards[i].item() == pytest.approx(rejected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", sorted(set(PAIRED_LOSSES) - {"bco_pair"}))
def test_loss_gradients_match_finite_differences(name: str) -> None:
    policy, reference = random_logps(batch=6, seed=1)
    chosen = policy.chosen.clone().requires_grad_(True)
    rejected = policy.rejected.clone().requires_grad_(True)
    params = params_for(name)

    def total(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return PAIRED_LOSSES[name].fn(with_policy(policy, c, r), reference, params).losses

    assert torch.autograd.gradcheck(total, (chosen, rejected))


def test_bco_gradient_matches_finite_differences_with_the_shift_held() -> None:
    """δ is a constant of the step (the paper's running mean): no gradient flows through it, so
    the gradient is that of the formula with δ held at its value."""
    policy, reference = random_logps(batch=6, seed=1)
    chosen = policy.chosen.clone().requires_grad_(True)
    rejected = policy.rejected.clone().requires_grad_(True)
    params = LossParams(beta=0.1)
    fn = PAIRED_LOSSES["bco_pair"].fn
    fn(with_policy(policy, chosen, rejected), reference, params).losses.sum().backward()
    x = as_lists(policy, reference)
    delta = 0.1 * sum(x["pc"][i] - x["rc"][i] + x["pr"][i] - x["rr"][i] for i in range(6)) / 12
    step = 1e-6
    for key, grad in (("pc", chosen.grad), ("pr", rejected.grad)):
        for i in range(6):
            shifted = []
            for sign in (1, -1):
                moved = {k: list(v) for k, v in x.items()}
                moved[key][i] += sign * step
                rho_w = moved["pc"][i] - moved["rc"][i]
                rho_l = moved["pr"][i] - moved["rr"][i]
                row = {k: v[i] for k, v in moved.items()}
                shifted.append(example_formula("bco_pair", rho_w, rho_l, row, params, delta))
            assert grad[i].item() == pytest.approx((shifted[0] - shifted[1]) / (2 * step), rel=1e-6)


def test_sigmoid_gradient_matches_dpo_paper() -> None:
    """∂ℓ/∂log π(y_w) = −β σ(−β h) (DPO paper, section 4)."""
    policy, reference = random_logps(batch=5, seed=2)
    chosen = policy.chosen.clone().requires_grad_(True)
    out = PAIRED_LOSSES["sigmoid"].fn(
        with_policy(policy, chosen, policy.rejected), reference, LossParams(0.3)
    )
    out.losses.sum().backward()
    h = (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)
    assert torch.allclose(chosen.grad, -0.3 * torch.sigmoid(-0.3 * h))


@pytest.mark.parametrize("name", sorted(SMOOTHED))
def test_label_smoothing_changes_the_loss(name: str) -> None:
    policy, reference = random_logps()
    fn = PAIRED_LOSSES[name].fn
    plain = fn(policy, reference, LossParams(beta=0.1)).losses
    smoothed = fn(policy, reference, LossParams(beta=0.1, label_smoothing=0.1)).losses
    assert not torch.allclose(plain, smoothed)


def test_robust_loss_is_unbiased_under_label_flips() -> None:
    """E over a flip at rate ε of the robust loss = the DPO loss of the clean label."""
    policy, reference = random_logps()
    eps, fn = 0.3, PAIRED_LOSSES["robust"].fn
    params = LossParams(beta=0.2, label_smoothing=eps)
    clean = fn(policy, reference, params).losses
    swap = lambda p: PairLogps(p.rejected, p.chosen)  # noqa: E731
    flipped = fn(swap(policy), swap(reference), params).losses
    dpo = PAIRED_LOSSES["sigmoid"].fn(policy, reference, LossParams(beta=0.2)).losses
    torch.testing.assert_close((1 - eps) * clean + eps * flipped, dpo)


def test_exo_without_label_smoothing_uses_the_papers_epsilon() -> None:
    policy, reference = random_logps()
    fn = PAIRED_LOSSES["exo_pair"].fn
    unset = fn(policy, reference, LossParams()).losses
    assert torch.equal(unset, fn(policy, reference, LossParams(label_smoothing=1e-3)).losses)


@pytest.mark.parametrize("name", ["ipo", "sigmoid_norm", "simpo", "orpo", "cpo", "sft"])
def test_length_normalised_losses_read_the_token_counts(name: str) -> None:
    policy, reference = random_logps()
    longer = PairLogps(
        policy.chosen, policy.rejected, policy.chosen_tokens + 3, policy.rejected_tokens
    )
    fn, params = PAIRED_LOSSES[name].fn, params_for(name)
    assert not torch.allclose(
        fn(policy, reference, params).losses, fn(longer, reference, params).losses
    )
    with pytest.raises(ValueError, match="token"):
        fn(PairLogps(policy.chosen, policy.rejected), None, params)


@pytest.mark.parametrize("name", sorted(set(PAIRED_LOSSES) - REFERENCE_FREE))
def test_reference_free_uses_a_uniform_reference(name: str) -> None:
    policy, _ = random_logps()
    zero = with_policy(policy, torch.zeros_like(policy.chosen), torch.zeros_like(policy.rejected))
    fn, params = PAIRED_LOSSES[name].fn, params_for(name)
    free, with_zero = fn(policy, None, params), fn(policy, zero, params)
    torch.testing.assert_close(free.losses, with_zero.losses, rtol=0, atol=0)
    torch.testing.assert_close(free.chosen_rewards, with_zero.chosen_rewards, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(REFERENCE_FREE))
def test_reference_free_losses_ignore_a_reference(name: str) -> None:
    policy, reference = random_logps()
    fn, params = PAIRED_LOSSES[name].fn, params_for(name)
    assert torch.equal(fn(policy, reference, params).losses, fn(policy, None, params).losses)


@pytest.mark.parametrize(
    ("name", "value"),
    [("sigmoid", math.log(2)), ("sigmoid_norm", math.log(2)), ("apo_zero", 0.0), ("apo_down", 0.0)],
)
def test_losses_at_the_reference(name: str, value: float) -> None:
    policy, _ = random_logps()
    out = PAIRED_LOSSES[name].fn(policy, policy, LossParams(beta=0.1))
    torch.testing.assert_close(out.losses, torch.full_like(out.losses, value), rtol=0, atol=1e-15)


def test_aot_losses_depend_on_the_batch_not_the_pairing() -> None:
    policy, reference = random_logps()
    order = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    params = LossParams(beta=0.1)
    # Unpaired AOT: re-pairing rejected responses with other chosen ones changes nothing.
    unpaired = PAIRED_LOSSES["aot_pair"].fn
    repaired_policy = with_policy(policy, policy.chosen, policy.rejected[order])
    repaired_reference = with_policy(reference, reference.chosen, reference.rejected[order])
    torch.testing.assert_close(
        unpaired(policy, reference, params).losses,
        unpaired(repaired_policy, repaired_reference, params).losses,
    )
    # Paired AOT: the margins are sorted, so a reshuffled batch has the same losses.
    paired = PAIRED_LOSSES["aot"].fn
    shuffled = lambda p: with_policy(p, p.chosen[order], p.rejected[order])  # noqa: E731
    torch.testing.assert_close(
        paired(policy, reference, params).losses,
        paired(shuffled(policy), shuffled(reference), params).losses,
    )
    sigmoid = PAIRED_LOSSES["sigmoid"].fn(policy, reference, params).losses
    assert not torch.allclose(paired(policy, reference, params).losses.sum(), sigmoid.sum())


def test_orpo_stays_finite_when_a_response_is_certain() -> None:
    certain = PairLogps(
        torch.zeros(2, dtype=torch.float64, requires_grad=True),
        torch.full((2,), -3.0, dtype=torch.float64),
        torch.ones(2, dtype=torch.float64),
        torch.ones(2, dtype=torch.float64),
    )
    out = PAIRED_LOSSES["orpo"].fn(certain, None, LossParams())
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(certain.chosen.grad).all()


def test_loss_flags() -> None:
    needs_none = {n for n, s in PAIRED_LOSSES.items() if not s.needs_reference}
    assert needs_none == REFERENCE_FREE
    assert {n for n, s in PAIRED_LOSSES.items() if s.uses_label_smoothing} == SMOOTHED
