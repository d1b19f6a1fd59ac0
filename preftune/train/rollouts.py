"""Fresh rollouts as a batch source: sample completions of prompts from the current policy,
score them, and hand out minibatches of them for several passes.

Optimizer steps are grouped by rollout: rollout r is made when its first step comes, from
``rollout_size`` prompts (an epoch's shuffled order, as :class:`~preftune.train.sources.StepSampler`
cuts offline data) times ``k`` samples each, and then trained on for ``epochs`` passes of
``train.batch_size`` samples per step, each pass in its own random order.

Every number of a rollout is independent of how many processes make it: prompts are sampled in
fixed generation batches (``generation.batch_size`` jobs, batch c seeded by (seed, r, c)),
which the processes share out round-robin; each process scores its batches (the policy's and
the reference's log-probabilities of each token, the values, the rewards), then all of them
gather the whole rollout, and compute rewards, KL penalties and advantages alike. A process
then trains on its share of each step's samples, as with offline data, so that one process and
several give the same steps. The rollout in use is part of the source's saved state, so a run
resumed between two of its steps continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from preftune.data.collate import collate_demos, padded, rollout_batch
from preftune.data.encode import EncodedDemo
from preftune.errors import ConfigError
from preftune.losses import ppo as math_ppo
from preftune.models.generate import Sampler, Sampling
from preftune.models.reference import ReferenceProvider
from preftune.models.rollout_logps import ValueModel, response_logps
from preftune.objectives.base import Batch
from preftune.objectives.settings import PPOSettings, RolloutSettings
from preftune.train.rewards import Reward
from preftune.train.rollout_settings import GenerationSettings, RewardSettings
from preftune.train.settings import TrainSettings
from preftune.train.sources import (
    StepSampler,
    batch_split,
    chunks,
    micro_batch_size,
    process_share,
)


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt to sample from: its token ids, its text, and its data row."""

    prompt_ids: list[int]
    text: str
    row: int | None = None
    response: str | None = None
    """The row's own response, where it has one (a pair's chosen one)."""


@dataclass
class Sample:
    """One scored completion of a rollout, as every process holds it."""

    job: int
    """Its place in the rollout: prompt-major, ``k`` samples per prompt."""
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    ref_logprobs: list[float]
    values: list[float]
    raw_reward: float
    ended: bool
    row: int | None = None
    reward: float = 0.0
    """The reward trained on: the raw one less the missing-EOS penalty, whitened and clipped."""
    advantages: list[float] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    """Metrics logged with each step: this sample's, and its rollout's."""


@dataclass
class Scoring:
    """What a rollout is sampled and scored with: the policy (the module the optimizer
    updates), its reference, the value model (None for RLOO), the reward, and what samples the
    completions (transformers' ``generate`` on the policy, or an engine given its weights)."""

    policy: torch.nn.Module
    reference: ReferenceProvider
    value: ValueModel | None
    reward: Reward
    tokenizer: Any
    sampler: Sampler


class Rollouts:
    """A batch source of fresh rollouts (see the module's docstring)."""

    def __init__(
        self,
        prompts: list[EncodedPrompt],
        scoring: Scoring,
        collate: Callable[[list[Any]], Batch],
        rl: RolloutSettings,
        samples_per_prompt: int,
        generation: GenerationSettings,
        rewards: RewardSettings,
        cfg: TrainSettings,
        seed: int,
        acc: Accelerator,
        ptx: Sequence[EncodedDemo] | None = None,
    ) -> None:
        self.prompts, self.scoring, self.collate = prompts, scoring, collate
        self.ptx = ptx
        if ptx is not None and not ptx:
            raise ConfigError("data.ptx has no usable demonstrations")
        self.rl, self.k, self.generation, self.rewards = rl, samples_per_prompt, generation, rewards
        self.seed, self.acc = seed, acc
        self.micro_batch_size = micro_batch_size(cfg, acc.num_processes)
        self.batch_size = cfg.batch_size
        self.rollout_prompts = rl.rollout_size or cfg.batch_size
        self.rollout_samples = self.rollout_prompts * samples_per_prompt
        if self.rollout_samples % cfg.batch_size:
            raise ConfigError(
                f"a rollout of {self.rollout_samples} samples ({self.rollout_prompts} prompts x "
                f"{samples_per_prompt}) does not split into train.batch_size={cfg.batch_size}"
            )
        if len(prompts) < self.rollout_prompts:
            raise ConfigError(
                f"data.train has {len(prompts)} prompts, fewer than a rollout's "
                f"{self.rollout_prompts}"
            )
        self.minibatches = self.rollout_samples // cfg.batch_size
        self.steps_per_rollout = rl.epochs * self.minibatches
        self.sampler = StepSampler(len(prompts), self.rollout_prompts, seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch * self.steps_per_rollout
        self.kl = math_ppo.AdaptiveKLController(rl.kl_coef, rl.kl_target, rl.kl_horizon)
        self.index = -1
        self.samples: list[Sample] = []

    def batches(self, step: int) -> list[Batch]:
        rollout, within = divmod(step - 1, self.steps_per_rollout)
        epoch, minibatch = divmod(within, self.minibatches)
        if rollout != self.index:
            self.samples = self._rollout(rollout)
            self.index = rollout
        order = self._order(rollout, epoch)
        chosen = order[minibatch * self.batch_size : (minibatch + 1) * self.batch_size]
        mine = process_share(chosen, self.acc.process_index, self.acc.num_processes)
        batches = [
            self.collate([self.samples[i] for i in part])
            for part in chunks(mine, self.micro_batch_size)
        ]
        return batches + self._ptx_batches(step)

    def _ptx_batches(self, step: int) -> list[Batch]:
        """With ``data.ptx``: this process's micro-batches of step ``step``'s demonstrations,
        ``train.batch_size`` of them drawn by (seed, step), each marked ``ptx``."""
        if self.ptx is None:
            return []
        generator = torch.Generator().manual_seed(self.seed * 100_019 + step)
        drawn = torch.randint(len(self.ptx), (self.batch_size,), generator=generator).tolist()
        mine = process_share(drawn, self.acc.process_index, self.acc.num_processes)
        pad = self.scoring.tokenizer.pad_token_id
        return [
            collate_demos([self.ptx[i] for i in part], pad) | {"ptx": torch.ones(1)}
            for part in chunks(mine, self.micro_batch_size)
        ]

    def _order(self, rollout: int, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed((self.seed * 100_003 + rollout) * 1_009 + epoch)
        return torch.randperm(self.rollout_samples, generator=generator).tolist()

    def blame(self, step: int, micro_batches: list[int]) -> str:
        rollout, within = divmod(step - 1, self.steps_per_rollout)
        epoch, minibatch = divmod(within, self.minibatches)
        start = minibatch * self.batch_size
        chosen = self._order(rollout, epoch)[start : start + self.batch_size]
        micro = self.micro_batch_size
        if micro_batches:
            chosen = [
                i for part in micro_batches for i in chosen[part * micro : (part + 1) * micro]
            ]
        rows = sorted({row for i in chosen if (row := self.samples[i].row) is not None})
        shown = ", ".join(map(str, rows[:16])) + (", …" if len(rows) > 16 else "")
        return f"rollout {rollout + 1}, samples of the prompts of data.train rows: {shown}"

    def describe(self) -> str:
        split = batch_split(self.batch_size, self.acc.num_processes, self.micro_batch_size)
        return (
            f"rollouts of {self.rollout_prompts} prompts x {self.k} samples, each trained on "
            f"for {self.rl.epochs} passes of {self.batch_size} samples = {split}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "samples": [asdict(sample) for sample in self.samples],
            "kl": self.kl.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.index = state["index"]
        self.samples = [Sample(**sample) for sample in state["samples"]]
        self.kl.load_state_dict(state["kl"])

    # Making a rollout.

    def _rollout(self, rollout: int) -> list[Sample]:
        """Rollout ``rollout``: every process samples and scores its generation batches, then
        all of them gather every sample and finish the rollout alike."""
        order = self.sampler.global_batch(rollout + 1)
        jobs = [index for index in order for _ in range(self.k)]
        batches = chunks(list(range(len(jobs))), self.generation.batch_size)
        acc = self.acc
        self.scoring.sampler.sync(self.scoring.policy)
        mine: list[Sample] = []
        for number, batch in enumerate(batches):
            if number % acc.num_processes == acc.process_index:
                seed = ((self.seed * 1_000_003 + rollout) * 10_007 + number) % 2**62
                mine += self._sample_batch([(job, jobs[job]) for job in batch], seed)
        gathered = gather_object(mine) if acc.num_processes > 1 else mine
        samples = sorted(gathered, key=lambda sample: sample.job)
        self._finish(samples)
        return samples

    @torch.no_grad()
    def _sample_batch(self, jobs: list[tuple[int, int]], seed: int) -> list[Sample]:
        """Sample and score one generation batch: ``jobs`` are (job, prompt index)."""
        scoring, acc = self.scoring, self.acc
        tokenizer = scoring.tokenizer
        prompts = [self.prompts[index] for _, index in jobs]
        settings = Sampling(
            max_new_tokens=self.generation.max_new_tokens,
            temperature=self.generation.temperature,
            top_p=self.generation.top_p,
        )
        prompt_ids = [prompt.prompt_ids for prompt in prompts]
        responses = scoring.sampler.generate(prompt_ids, settings, seed)
        responses = [ids or [tokenizer.eos_token_id] for ids in responses]
        batch = rollout_batch(prompt_ids, responses, tokenizer.pad_token_id)
        batch = {key: value.to(acc.device) for key, value in batch.items()}
        policy = scoring.policy
        was_training = policy.training
        policy.eval()
        try:
            with acc.autocast():
                logprobs, _ = response_logps(policy, batch)
                reference, _ = scoring.reference.logps(batch)
                values = scoring.value(batch) if scoring.value is not None else None
        finally:
            policy.train(was_training)
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in responses]
        prompt_texts = [prompt.text for prompt in prompts]
        raw = scoring.reward(prompt_texts, texts)
        samples = []
        for row, ((job, _), prompt, response) in enumerate(
            zip(jobs, prompts, responses, strict=True)
        ):
            length = len(response)
            samples.append(
                Sample(
                    job=job,
                    prompt_ids=prompt.prompt_ids,
                    response_ids=response,
                    logprobs=logprobs[row, :length].float().tolist(),
                    ref_logprobs=reference[row, :length].float().tolist(),
                    values=[] if values is None else values[row, :length].float().tolist(),
                    raw_reward=raw[row],
                    ended=response[-1] == tokenizer.eos_token_id,
                    row=prompt.row,
                )
            )
        return samples

    def _finish(self, samples: list[Sample]) -> None:
        """Rewards, KL penalties, advantages and metrics of a whole rollout, in place; then the
        adaptive KL coefficient moves toward its target."""
        rewards = torch.tensor(
            [s.raw_reward - (0.0 if s.ended else self.rewards.missing_eos_penalty) for s in samples]
        )
        if self.rewards.whiten:
            rewards = (rewards - rewards.mean()) / torch.sqrt(rewards.var(unbiased=False) + 1e-8)
        if self.rewards.clip > 0:
            rewards = rewards.clamp(-self.rewards.clip, self.rewards.clip)
        logprobs, mask = padded([s.logprobs for s in samples])
        reference, _ = padded([s.ref_logprobs for s in samples])
        coef = self.kl.value
        shaped, kl = math_ppo.kl_shaped_rewards(rewards, logprobs, reference, mask, coef)
        kl_per_sample = kl.sum(dim=1)
        if isinstance(self.rl, PPOSettings):
            values, _ = padded([s.values for s in samples])
            advantages, returns = math_ppo.gae(shaped, values, mask, self.rl.gamma, self.rl.lam)
            explained = math_ppo.explained_variance(values, returns, mask)
            if self.rl.whiten_advantages:
                advantages = math_ppo.whiten(advantages, mask)
        else:  # RLOO: each sample's KL-penalised reward, baselined by its prompt's others
            total = (rewards - coef * kl_per_sample).view(-1, self.k)
            advantages = math_ppo.rloo_advantages(total).view(-1, 1) * mask
            returns, explained = torch.zeros_like(mask), math.nan
        raw = torch.tensor([s.raw_reward for s in samples])
        rollout_stats = {
            "reward/std": float(raw.std(unbiased=False)),
            "kl_coef": coef,
        }
        if not math.isnan(explained):
            rollout_stats["explained_variance"] = explained
        for index, sample in enumerate(samples):
            length = len(sample.response_ids)
            sample.reward = float(rewards[index])
            sample.advantages = advantages[index, :length].tolist()
            sample.returns = returns[index, :length].tolist()
            sample.stats = {
                "reward": sample.raw_reward,
                "kl": float(kl_per_sample[index]),
                "response_length": float(length),
                "ended": float(sample.ended),
                **rollout_stats,
            }
        self.kl.update(float(kl_per_sample.mean()), len(samples))
