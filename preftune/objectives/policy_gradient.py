"""PPO and RLOO on rollouts: the clipped policy-gradient loss on each sampled token, and, for
PPO, the clipped value loss of its value model (see :mod:`preftune.losses.ppo`).

A batch is samples of a rollout (:class:`~preftune.train.rollouts.Sample`), laid out as
:func:`~preftune.data.collate.rollout_batch` does, with what the rollout computed of each
token: its log-probability under the policy that sampled it, its advantage, and for PPO its
value and return. The loss is summed over response tokens; the loop divides by the step's
token count, so each step minimises the mean over its tokens, however it is split.
"""

from __future__ import annotations

from typing import Any

import torch

from preftune.data.collate import padded, rollout_batch
from preftune.losses import ppo as math_ppo
from preftune.models.rollout_logps import ValueModel, response_logps
from preftune.objectives.base import Batch, Metrics, mean_metric
from preftune.objectives.settings import PPOSettings, RLOOSettings

TOKEN_FIELDS = ("logprobs", "advantages", "returns", "values")


class PolicyGradientObjective:
    """PPO (with ``value``, a :class:`ValueModel`) or RLOO (without)."""

    def __init__(
        self, name: str, settings: PPOSettings | RLOOSettings, pad_id: int, value: ValueModel | None
    ) -> None:
        self.name = name
        self.settings = settings
        self.pad_id = pad_id
        self.modules: dict[str, torch.nn.Module] = {} if value is None else {"value": value}

    def collate(self, samples: list[Any]) -> Batch:
        prompts = [s.prompt_ids for s in samples]
        batch = rollout_batch(prompts, [s.response_ids for s in samples], self.pad_id)
        for name in TOKEN_FIELDS:
            rows = [getattr(s, name) for s in samples]
            if any(rows):
                batch[f"old_{name}"], _ = padded(rows)
        for key in samples[0].stats:
            batch[f"stat_{key}"] = torch.tensor([s.stats[key] for s in samples])
        return batch

    def weight(self, batch: Batch) -> int:
        return int(batch["response_mask"].sum())

    def compute(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        s, mask = self.settings, batch["response_mask"]
        logprobs, entropy = response_logps(model, batch)
        losses, clipped, approx_kl = math_ppo.policy_loss(
            logprobs, batch["old_logprobs"], batch["old_advantages"], mask, s.clip
        )
        loss = losses.sum()
        tokens = mask.sum().detach()
        metrics: Metrics = {
            "policy_loss": (losses.sum().detach(), tokens),
            "clipfrac": (clipped.sum(), tokens),
            "approx_kl": (approx_kl.sum().detach(), tokens),
            "entropy": (entropy.sum().detach(), tokens),
        }
        if isinstance(s, PPOSettings):
            if s.entropy_coef:
                loss = loss - s.entropy_coef * entropy.sum()
            values = self.modules["value"](batch)
            value_losses, value_clipped = math_ppo.value_loss(
                values, batch["old_values"], batch["old_returns"], mask, s.value_clip
            )
            loss = loss + s.vf_coef * value_losses.sum()
            metrics["value_loss"] = (value_losses.sum().detach(), tokens)
            metrics["value_clipfrac"] = (value_clipped.sum(), tokens)
        for key, value in batch.items():
            if key.startswith("stat_"):
                metrics[key.removeprefix("stat_")] = mean_metric(value)
        return loss, metrics
