"""The arithmetic of RLHF with PPO and with RLOO, on per-token tensors of the response.

Every (B, T) tensor covers the generated tokens only: position t of row b is the t-th token the
policy sampled for prompt b, and ``mask`` (B, T) is 1 on a row's real tokens and 0 on the
padding after its end (the real tokens of a row are a prefix). Outputs are 0 at padding.

Rewards (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; Stiennon et
al. 2020; Ouyang et al. 2022): the reward model's score s of a whole response is paid at its
last token, and every token pays −β (log π(y_t|·) − log π_ref(y_t|·)), a sampled estimate of
the KL divergence from the reference, so r_t = −β k_t + s·[t = last]. β may follow Ziegler et
al.'s adaptive controller, which steers the measured KL towards a target.

Advantages: generalized advantage estimation (Schulman et al. 2016, "High-Dimensional
Continuous Control Using Generalized Advantage Estimation"), δ_t = r_t + γ V_{t+1} − V_t and
A_t = δ_t + γλ A_{t+1}, the episode ending at the last response token; advantages are usually
whitened over the batch, which :func:`masked_moments` lets a caller do across processes.

Losses: PPO's clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization
Algorithms"), max(−A ρ, −A clip(ρ, 1−ε, 1+ε)) with ρ = π/π_old, and the clipped value loss of
the PPO reference implementation, ½ max((V − R)², (V_old + clip(V − V_old, ±ε_V) − R)²).

RLOO (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; Ahmadian et al.
2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
Feedback in LLMs"): with K responses to a prompt, each response's baseline is the mean score of
the other K − 1, which needs no value model.

Arithmetic is in float32 at least (half-precision inputs are promoted; float64 stays float64).
"""

from __future__ import annotations

import math
from typing import Any

import torch

WHITEN_EPS = 1e-8


def _promoted(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a floating tensor of at least float32 precision (bool and integer masks too)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = −β k_t + s·[t = last] and the per-token KL estimate k_t.

    ``scores`` (B,): each response's score s, added at its last real token (index
    mask.sum() − 1); ``logprobs``, ``ref_logprobs`` (B, T): log π and log π_ref of the sampled
    tokens; k_t = log π(y_t|·) − log π_ref(y_t|·); β: ``kl_coef``. Returns (rewards, kl), each
    (B, T) and 0 at padding. A row with no real token gets no score.
    """
    mask = _promoted(mask)
    kl = (_promoted(logprobs) - _promoted(ref_logprobs)) * mask
    last = (mask.sum(dim=-1).long() - 1).clamp(min=0)
    score_at_end = torch.zeros_like(kl).scatter(
        1, last[:, None], _promoted(scores).to(kl.dtype)[:, None]
    )
    return (-kl_coef * kl + score_at_end) * mask, kl


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimates A_t and returns A_t + V_t, each (B, T), 0 at padding.

    Backwards over t: δ_t = r_t + γ V_{t+1} − V_t and A_t = δ_t + γλ A_{t+1}, with V_{t+1} and
    A_{t+1} taken as 0 past a row's last real token: the episode ends there, with no bootstrap.
    The inputs are detached: advantages and returns are targets, never gradient paths.
    """
    with torch.no_grad():
        mask = _promoted(mask.detach())
        rewards = _promoted(rewards.detach()) * mask
        values = _promoted(values.detach()) * mask
        steps = rewards.shape[-1]
        if steps == 0:
            return rewards.clone(), values.clone()
        next_value = rewards.new_zeros(rewards.shape[0])
        next_advantage = rewards.new_zeros(rewards.shape[0])
        advantages: list[torch.Tensor] = [next_advantage] * steps
        for t in reversed(range(steps)):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
            advantages[t] = next_advantage
            next_value = values[:, t]  # already 0 at padding
        stacked = torch.stack(advantages, dim=-1)
        return stacked, (stacked + values) * mask


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the positions where the 0/1 ``mask`` is 1 (a scalar); 0 when
    the mask is empty."""
    mask = _promoted(mask)
    return (_promoted(values) * mask).sum() / mask.sum().clamp(min=1)


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(Σ x·m, Σ x²·m, Σ m) as a tensor of shape (3,): sums a caller can add up across processes
    (one all-reduce) before :func:`whiten`."""
    mask = _promoted(mask)
    values = _promoted(values)
    return torch.stack(
        [(values * mask).sum(), (values.square() * mask).sum(), mask.sum().to(values.dtype)]
    )


def whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    moments: torch.Tensor | None = None,
    shift_mean: bool = True,
) -> torch.Tensor:
    """(x − μ) / √(σ² + 1e-8) at the masked positions, 0 at padding.

    μ and the population variance σ² come from ``moments`` (as :func:`masked_moments` returns
    them, possibly summed over processes), else from ``values`` and ``mask`` themselves. With
    ``shift_mean=False`` μ is added back: the values are scaled, not centred.
    """
    mask = _promoted(mask)
    values = _promoted(values)
    if moments is None:
        moments = masked_moments(values, mask)
    total, squares, count = _promoted(moments).unbind()
    count = count.clamp(min=1)
    mean = total / count
    variance = (squares / count - mean.square()).clamp(min=0)
    whitened = (values - mean) * torch.rsqrt(variance + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token: max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε)), ρ = π/π_old.

    ``logprobs`` (B, T): log π of the sampled tokens under the policy being trained, the only
    gradient path; ``old_logprobs``: under the policy that sampled them; ``advantages``: A;
    ε: ``clip``. Returns (loss, clipped, approx_kl), each (B, T) and 0 at padding: ``clipped``
    is 1.0 where the clipped term is strictly the larger (its gradient is then 0), and
    approx_kl = ½ (log π − log π_old)², an estimate of KL(π_old‖π).
    """
    mask = _promoted(mask)
    log_ratio = _promoted(logprobs) - _promoted(old_logprobs.detach())
    advantages = _promoted(advantages.detach())
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = torch.maximum(unclipped, clipped)
    chose_clipped = (clipped > unclipped).to(loss.dtype)
    return loss * mask, chose_clipped * mask, 0.5 * log_ratio.square() * mask


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    value_clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """½ max((V − R)², (V_old + clip(V − V_old, −ε_V, ε_V) − R)²) per token, and where the
    clipped term was strictly the larger (1.0), each (B, T) and 0 at padding.

    ``values``: V, the only gradient path; ``old_values``: V_old, the values when the batch was
    sampled; ``returns``: R; ε_V: ``value_clip``, where ``value_clip <= 0`` means no clipping
    (½ (V − R)², never clipped).
    """
    mask = _promoted(mask)
    values = _promoted(values)
    old_values = _promoted(old_values.detach())
    returns = _promoted(returns.detach())
    unclipped = (values - returns).square()
    if value_clip <= 0:
        return 0.5 * unclipped * mask, torch.zeros_like(unclipped.detach()) * mask
    moved = old_values + (values - old_values).clamp(-value_clip, value_clip)
    clipped = (moved - returns).square()
    chose_clipped = (clipped > unclipped).to(unclipped.dtype)
    return 0.5 * torch.maximum(unclipped, clipped) * mask, chose_clipped * mask


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = −Σ_v p_v log p_v of softmax(``logits``) over the last dimension, in nats.

    As log Σ exp(z) − Σ p z on z = logits − max, so large logits lose no precision; a logit of
    −inf (a token ruled out) contributes 0.
    """
    shifted = _promoted(logits)
    shifted = shifted - shifted.amax(dim=-1, keepdim=True).detach()
    probs = torch.softmax(shifted, dim=-1)
    finite = torch.where(probs > 0, shifted, torch.zeros_like(shifted))
    return torch.logsumexp(shifted, dim=-1) - (probs * finite).sum(dim=-1)


def rloo_advantages(scores: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out advantages, (P, K) from (P, K) scores of K responses per prompt.

    A_{p,i} = r_{p,i} − mean_{j≠i} r_{p,j} = K/(K−1) (r_{p,i} − mean_j r_{p,j}). Needs K ≥ 2;
    the result is detached.
    """
    samples = scores.shape[-1]
    if samples < 2:
        raise ValueError(f"RLOO needs at least 2 responses per prompt, got {samples}")
    scores = _promoted(scores.detach())
    others = (scores.sum(dim=-1, keepdim=True) - scores) / (samples - 1)
    return scores - others


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var[R − V] / Var[R] over the masked positions: 1 for a value model that predicts the
    returns exactly, 0 for one that predicts only their mean; nan when Var[R] = 0."""
    selected = _promoted(mask).detach() > 0
    returns = _promoted(returns.detach())[selected]
    if returns.numel() == 0:
        return math.nan
    errors = returns - _promoted(values.detach())[selected]
    # Variance is shift-invariant: shifting by an element makes a constant exactly 0.
    spread = _population_variance(returns - returns[0])
    if spread == 0:
        return math.nan
    return 1.0 - _population_variance(errors) / spread


def _population_variance(x: torch.Tensor) -> float:
    return float((x - x.mean()).square().mean())


class AdaptiveKLController:
    """Ziegler et al. 2019's adaptive KL coefficient β, steering the measured KL to a target.

    After a batch whose KL is ``current_kl`` over ``n_steps`` samples: e = clip(KL / target − 1,
    −0.2, 0.2) and β ← β (1 + e · n_steps / horizon). With ``target`` None, β stays at ``init``.
    """

    def __init__(self, init: float, target: float | None, horizon: int) -> None:
        if init < 0:
            raise ValueError(f"the KL coefficient must be non-negative, got {init}")
        if target is not None and target <= 0:
            raise ValueError(f"the KL target must be positive, got {target}")
        if horizon <= 0:
            raise ValueError(f"the KL horizon must be positive, got {horizon}")
        self.value = float(init)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move β after a batch with mean KL ``current_kl`` over ``n_steps`` samples."""
        if self.target is None:
            return
        if not math.isfinite(current_kl):
            raise ValueError(f"the measured KL is not finite: {current_kl}")
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        """β and the settings, JSON-serialisable, for resuming exactly."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.value = float(state["value"])
        self.target = None if state["target"] is None else float(state["target"])
        self.horizon = int(state["horizon"])
