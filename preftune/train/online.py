"""Online preference pairs as a batch source: each round, sample ``k`` completions of each of a
round's prompts from the policy as it then is, have a judge compare them, and train on the pairs
it prefers for ``online.round_steps`` steps (online DPO; iterative DPO with the reference moved
to each round's starting policy).

Sampling is :class:`~preftune.train.rollouts.Rollouts`'s: the same generation batches, seeds,
sharing out among processes and gathering, so that any number of processes makes the same
round. Each sample carries the log-probability of each of its tokens under the policy that
sampled it and under the starting policy: the reference log-probs of a pair are those, summed
(``online.reference``: ``start``, or ``round`` for the policy as the round began), so no
reference model runs at training time. Each pair carries the judge's P(chosen ≻ rejected), its
soft label under ``loss.soft_labels``. Judging is shared out by prompt and gathered too.

A step trains on ``train.batch_size`` of the round's pairs, in a shuffled order of the round,
going round it again when the round has fewer pairs than its steps take. A prompt whose
completions the judge ties gives no pair; a round with no pair at all stops the run.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from accelerate.utils import gather_object

from preftune.data.encode import EncodedPair
from preftune.errors import TrainingError
from preftune.objectives.base import Batch
from preftune.objectives.settings import OnlineSettings, RolloutSettings
from preftune.train.judges import Group, Judge
from preftune.train.rollouts import Rollouts, Sample
from preftune.train.sources import batch_split, chunks, process_share


@dataclass
class OnlinePair:
    """A judged pair of a round: the pair (with its reference log-probs) and its metrics."""

    pair: EncodedPair
    stats: dict[str, float] = field(default_factory=dict)


def form_pairs(group: Group, mode: str) -> list[tuple[int, int, float]]:
    """(chosen, rejected, P(chosen ≻ rejected)) of a judged group: ``best_worst``, the
    completion ranked first against the one ranked last (by score, else by strength);
    ``all``, every two the judge prefers one of, each oriented by its own verdict (an ``llm``
    judge's need not be transitive). Ties give no pair."""
    if mode == "all":
        k = len(group.probs)
        pairs = []
        for i in range(k):
            for j in range(i + 1, k):
                p = group.probs[i][j]
                if p != 0.5:
                    pairs.append((i, j, p) if p > 0.5 else (j, i, 1 - p))
        return pairs
    ranking = group.scores if group.scores is not None else group.strengths
    best = max(range(len(ranking)), key=lambda i: (ranking[i], -i))
    worst = min(range(len(ranking)), key=lambda i: (ranking[i], i))
    p = group.probs[best][worst]
    return [(best, worst, p)] if p > 0.5 else []


class OnlinePairs(Rollouts):
    """A batch source of judged pairs sampled from the policy (see the module's docstring)."""

    def __init__(
        self,
        *args: Any,
        online: OnlineSettings,
        judge: Judge,
        with_reference: bool = True,
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        self.online, self.judge = online, judge
        self.with_reference = with_reference
        self.steps_per_rollout = online.round_steps
        self.steps_per_epoch = self.sampler.steps_per_epoch * online.round_steps
        self.pairs: list[OnlinePair] = []
        self.making = 0

    @staticmethod
    def rollout_settings(online: OnlineSettings, batch_size: int) -> RolloutSettings:
        """What :class:`Rollouts` is told of a round: its prompts, one pass, no KL shaping."""
        prompts = online.prompts_per_round or batch_size * online.round_steps
        return RolloutSettings(rollout_size=prompts, epochs=1, kl_coef=0.0)

    def batches(self, step: int) -> list[Batch]:
        rollout, within = divmod(step - 1, self.steps_per_rollout)
        if rollout != self.index:
            self.making = rollout
            self.samples = self._rollout(rollout)
            self.index = rollout
        chosen = self._chosen(rollout, within)
        mine = process_share(chosen, self.acc.process_index, self.acc.num_processes)
        return [
            self.collate([self.pairs[i] for i in part])
            for part in chunks(mine, self.micro_batch_size)
        ]

    def _chosen(self, rollout: int, within: int) -> list[int]:
        """The indices of step ``within``'s pairs in the round's shuffled order (cycled)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + rollout)
        order = torch.randperm(len(self.pairs), generator=generator).tolist()
        start = within * self.batch_size
        return [order[(start + i) % len(order)] for i in range(self.batch_size)]

    def blame(self, step: int, micro_batches: list[int]) -> str:
        rollout, within = divmod(step - 1, self.steps_per_rollout)
        chosen = self._chosen(rollout, within)
        micro = self.micro_batch_size
        if micro_batches:
            chosen = [i for m in micro_batches for i in chosen[m * micro : (m + 1) * micro]]
        rows = sorted({row for i in chosen if (row := self.pairs[i].pair.row) is not None})
        shown = ", ".join(map(str, rows[:16])) + (", …" if len(rows) > 16 else "")
        return f"round {rollout + 1}, pairs sampled for the prompts of data.train rows: {shown}"

    def describe(self) -> str:
        split = batch_split(self.batch_size, self.acc.num_processes, self.micro_batch_size)
        return (
            f"rounds of {self.rollout_prompts} prompts x {self.k} samples, judged into pairs "
            f"({self.online.pairs}), each trained on for {self.online.round_steps} steps of "
            f"{self.batch_size} pairs = {split}"
        )

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"pairs": [asdict(pair) for pair in self.pairs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state:
            self.pairs = [
                OnlinePair(EncodedPair(**pair["pair"]), pair["stats"]) for pair in state["pairs"]
            ]

    def _finish(self, samples: list[Sample]) -> None:
        """Judge each prompt's ``k`` samples (prompts shared out among processes, verdicts
        gathered) and form the round's pairs, with their reference log-probs and metrics."""
        k, acc = self.k, self.acc
        groups = [samples[start : start + k] for start in range(0, len(samples), k)]
        tokenizer = self.scoring.tokenizer
        mine = []
        for index in range(acc.process_index, len(groups), acc.num_processes):
            group = groups[index]
            prompt = str(tokenizer.decode(group[0].prompt_ids, skip_special_tokens=True))
            texts = [tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in group]
            mine.append((index, self.judge.group(prompt, texts)))
        gathered = gather_object(mine) if acc.num_processes > 1 else mine
        judged = [group for _, group in sorted(gathered, key=lambda item: item[0])]
        self.pairs = self._pairs(groups, judged)
        if not self.pairs:
            raise TrainingError(
                f"round {self.making + 1}: the judge tied the completions of every prompt, so "
                "there is no pair to train on (more online.k, or a higher generation.temperature)"
            )

    def _pairs(self, groups: list[list[Sample]], judged: list[Group]) -> list[OnlinePair]:
        kl = [sum(s.logprobs) - sum(s.ref_logprobs) for group in groups for s in group]
        ranking = [
            value
            for group in judged
            for value in (group.scores if group.scores is not None else group.strengths)
        ]
        lengths = [len(s.response_ids) for group in groups for s in group]
        disagree = [d for group in judged for d in (group.disagree or [])]
        round_stats = {
            "kl": statistics.fmean(kl),
            "reward": statistics.fmean(ranking),
            "response_length": statistics.fmean(lengths),
        }
        if disagree:
            round_stats["judge/position_bias"] = sum(disagree) / len(disagree)
        formed = [
            (group, chosen, rejected, p)
            for group, verdict in zip(groups, judged, strict=True)
            for chosen, rejected, p in form_pairs(verdict, self.online.pairs)
        ]
        round_stats["judge/tied_prompts"] = 1 - len({id(g) for g, *_ in formed}) / len(groups)
        by_round = self.online.reference == "round"
        pairs = []
        for group, chosen, rejected, p in formed:
            a, b = group[chosen], group[rejected]
            reference = None
            if self.with_reference:
                old = (a.logprobs, b.logprobs) if by_round else (a.ref_logprobs, b.ref_logprobs)
                reference = (sum(old[0]), sum(old[1]))
            pair = EncodedPair(
                a.prompt_ids, a.response_ids, b.response_ids, reference, a.row, chosen_probability=p
            )
            pairs.append(OnlinePair(pair, {"judge/chosen_prob": p, **round_stats}))
        return pairs
