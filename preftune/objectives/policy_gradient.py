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
from accelerate.utils import reduce

from preftune.data.collate import padded, rollout_batch
from preftune.losses import ppo as math_ppo
from preftune.models.logps import IGNORE, sequence_logps
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
        self.step_tokens = torch.ones(2)

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
        # A ptx batch's tokens are not the policy loss's: its term is scaled in begin_step.
        return 0 if "ptx" in batch else int(batch["response_mask"].sum())

    def begin_step(self, model: torch.nn.Module, batches: list[Batch]) -> None:
        """With ptx batches (``ppo.ptx_coef``): the step's response tokens and demonstration
        tokens over every process, so that the step minimises the mean policy loss per
        response token plus ``ptx_coef`` times the mean next-token loss per demonstration
        token, however the step is split."""
        if not any("ptx" in batch for batch in batches):
            return
        device = batches[0]["input_ids"].device
        counts = torch.zeros(2, device=device)
        for batch in batches:
            if "ptx" in batch:
                counts[1] += (batch["labels"][:, 1:] != IGNORE).sum()
            else:
                counts[0] += batch["response_mask"].sum()
        self.step_tokens = reduce(counts, "sum")

    def compute(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        if "ptx" in batch:
            return self._ptx(model, batch)
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

    def _ptx(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        """The pretraining term on a batch of demonstrations (PPO-ptx, Ouyang et al. 2022)."""
        assert isinstance(self.settings, PPOSettings)
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
        logps, counts = sequence_logps(model, inputs)
        nll = -logps.sum()
        # In the loop's sum over the step divided by its response tokens, this term becomes
        # ptx_coef times the mean loss per demonstration token.
        response_tokens, ptx_tokens = self.step_tokens.unbind()
        scale = self.settings.ptx_coef * response_tokens / ptx_tokens.clamp(min=1)
        return nll * scale, {"ptx_loss": (nll.detach(), counts.sum().float())}
