"""Judges: which of two completions of a prompt is better, as a probability.

Three kinds, named by ``judge.spec``:

- ``rm:DIR``: a reward model trained by ``preftune rm``; P(a ≻ b) = σ(r(a) − r(b)), its own
  Bradley–Terry model.
- ``function:module:callable``: a Python scorer of (prompt, completion) texts; the same
  Bradley–Terry probability of its scores' difference.
- ``llm:MODEL``: a causal language model (a local directory or hub id) shown both completions in
  a pairwise template; its verdict is read from the next-token logits of the two labels, ``A``
  and ``B`` (no free text is parsed): P₁ = softmax over (A, B) with a first and b second, P₂ the
  same with the order swapped, and P(a ≻ b) = ½ (P₁(A) + P₂(B)). Judging both orders cancels a
  preference for a position, and makes P(a ≻ b) = 1 − P(b ≻ a) exactly. How often the two
  orders disagree (P₁(A) > ½ while P₂(B) < ½, or the reverse) is the judge's position bias.

Every judge also ranks a group of completions of one prompt: scoring
judges by their scores, an ``llm`` judge by each completion's mean probability of beating the
others (:meth:`Judge.group`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from preftune.errors import ConfigError, PreftuneError
from preftune.models.attention import inner_model
from preftune.models.rollout_logps import positions
from preftune.train.rollout_settings import JudgeSettings, check_judge_spec

DEFAULT_TEMPLATE = (
    "Which response is the better reply to the prompt?\n\n"
    "Prompt: {prompt}\n\n"
    "Response A: {a}\n\n"
    "Response B: {b}\n\n"
    "The better response is Response "
)
"""The pairwise template of ``llm`` judges: ``{prompt}``, ``{a}`` and ``{b}`` are filled in, and
the judge's next token after it is read as ``A`` or ``B``."""


@dataclass
class Verdicts:
    """The judge's verdicts on pairs (a, b): ``probs[i]`` = P(a_i ≻ b_i); for ``llm`` judges,
    ``disagree[i]``: whether the two orders disagreed on pair i."""

    probs: list[float]
    disagree: list[bool] | None = None

    @property
    def position_bias(self) -> float | None:
        """The share of pairs on which the two orders disagreed (None: one order only)."""
        if not self.disagree:
            return None
        return sum(self.disagree) / len(self.disagree)


Scorer = Callable[[list[str], list[str]], list[float]]


@dataclass
class Judge:
    """A judge of completions (see the module's docstring)."""

    name: str
    score: Scorer | None = None
    """Scoring judges: one score per (prompt, completion); None for ``llm`` judges."""
    compare: Callable[[list[str], list[str], list[str]], Verdicts] | None = field(
        default=None, repr=False
    )

    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> Verdicts:
        """P(a_i ≻ b_i) for each prompt i."""
        if not len(prompts) == len(a) == len(b):
            raise ValueError(f"{len(prompts)} prompts for {len(a)} and {len(b)} completions")
        if self.compare is not None:
            return self.compare(list(prompts), list(a), list(b))
        assert self.score is not None
        scores = self.score([*prompts, *prompts], [*a, *b])
        half = len(prompts)
        return Verdicts(
            [bradley_terry(x, y) for x, y in zip(scores[:half], scores[half:], strict=True)]
        )

    def group(self, prompt: str, completions: Sequence[str]) -> Group:
        """Every completion of ``prompt`` judged against every other: a scoring judge scores
        each once; an ``llm`` judge compares each two (in both orders). Two identical
        completions tie exactly (½), whatever batch position they were scored at."""
        k = len(completions)
        if self.score is not None:
            scores = self.score([prompt] * k, list(completions))
            probs = [
                [
                    0.5 if completions[i] == completions[j] else bradley_terry(x, y)
                    for j, y in enumerate(scores)
                ]
                for i, x in enumerate(scores)
            ]
            return Group(probs, scores)
        pairs = [
            (i, j) for i in range(k) for j in range(i + 1, k) if completions[i] != completions[j]
        ]
        first = [completions[i] for i, _ in pairs]
        second = [completions[j] for _, j in pairs]
        verdicts = self.prefer([prompt] * len(pairs), first, second)
        probs = [[0.5] * k for _ in range(k)]
        for (i, j), p in zip(pairs, verdicts.probs, strict=True):
            probs[i][j], probs[j][i] = p, 1 - p
        return Group(probs, None, verdicts.disagree)


@dataclass
class Group:
    """A prompt's completions judged against each other: ``probs[i][j]`` = P(i ≻ j) (½ on the
    diagonal); a scoring judge's ``scores``; an ``llm`` judge's order disagreements."""

    probs: list[list[float]]
    scores: list[float] | None = None
    disagree: list[bool] | None = None

    @property
    def strengths(self) -> list[float]:
        """Each completion's mean probability of beating the others."""
        k = len(self.probs)
        return [(sum(row) - row[i]) / max(k - 1, 1) for i, row in enumerate(self.probs)]


def bradley_terry(first: float, second: float) -> float:
    """σ(first − second), computed without overflow."""
    difference = first - second
    if difference >= 0:
        return 1 / (1 + math.exp(-difference))
    e = math.exp(difference)
    return e / (1 + e)


def load_judge(settings: JudgeSettings, device: torch.device | str = "cpu") -> Judge:
    """The judge ``settings.spec`` names; one line saying what is wrong otherwise."""
    spec = settings.spec
    if not spec:
        raise ConfigError("judge.spec is required: rm:DIR, function:module:callable or llm:MODEL")
    check_judge_spec(spec)
    kind, _, target = spec.partition(":")
    if kind == "function":
        from preftune.train.rewards import checked_function_scorer

        return Judge(f"function {target}", score=checked_function_scorer(target, "judge.spec"))
    if kind == "rm":
        from preftune.models.reward import RewardScorer

        scorer = RewardScorer(target, batch_size=settings.batch_size, device=device)
        return Judge(f"reward model {target}", score=scorer.score)
    llm = LanguageModelJudge(target, settings, device)
    return Judge(f"language model {target}", compare=llm.compare)


def read_template(template: str | None) -> str:
    """The ``llm`` judge's template: the built-in one, a file's text, or the text given; it must
    hold ``{prompt}``, ``{a}`` and ``{b}``."""
    if template is None:
        return DEFAULT_TEMPLATE
    text = template
    if "{" not in template and Path(template).is_file():
        text = Path(template).read_text(encoding="utf-8")
    missing = [name for name in ("{prompt}", "{a}", "{b}") if name not in text]
    if missing:
        raise ConfigError(f"judge.template lacks {', '.join(missing)}: {template[:60]!r}")
    return text


class LanguageModelJudge:
    """A causal LM read as a pairwise judge: the probability of the next token being the label
    ``A`` rather than ``B`` after the template, for both orders of each pair."""

    def __init__(self, path: str, settings: JudgeSettings, device: torch.device | str) -> None:
        from preftune.models.load import ModelSpec, load_model, load_tokenizer

        spec = ModelSpec(path=path)
        self.template = read_template(settings.template)
        self.tokenizer = load_tokenizer(spec)
        self.model = load_model(spec, self.tokenizer).eval().to(device)
        self.device = torch.device(device)
        self.batch_size, self.max_length = settings.batch_size, settings.max_length
        # The output layer runs on the last position only, where the model takes that.
        forward = inspect.signature(inner_model(self.model).forward).parameters
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}

    def compare(self, prompts: list[str], a: list[str], b: list[str]) -> Verdicts:
        first = self.label_probability(prompts, a, b)  # P₁(A): a shown first
        second = self.label_probability(prompts, b, a)  # P₂(A): b shown first
        probs = [0.5 * (p1 + (1 - p2)) for p1, p2 in zip(first, second, strict=True)]
        disagree = [(p1 > 0.5) != (1 - p2 > 0.5) for p1, p2 in zip(first, second, strict=True)]
        return Verdicts(probs, disagree)

    @torch.no_grad()
    def label_probability(self, prompts: list[str], a: list[str], b: list[str]) -> list[float]:
        """P(next token = A | template(prompt, a, b)) among the two labels, for each pair."""
        texts = [
            self.template.format(prompt=p, a=x, b=y) for p, x, y in zip(prompts, a, b, strict=True)
        ]
        out: list[float] = []
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(texts), self.batch_size):
            encoded = [
                label_context(self.tokenizer, t) for t in texts[start : start + self.batch_size]
            ]
            rows = [context[-self.max_length :] for context, _ in encoded]
            width = max(len(row) for row in rows)
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
            mask = torch.tensor(
                [[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device
            )
            last = (
                self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions(mask),
                    use_cache=False,
                    **self.last_only,
                )
                .logits[:, -1]
                .float()
            )
            labels = torch.tensor([pair for _, pair in encoded], device=self.device)
            pair = last.gather(1, labels).log_softmax(dim=-1)
            out += pair[:, 0].exp().tolist()
        return out


def label_context(tokenizer, text: str) -> tuple[list[int], tuple[int, int]]:
    """The tokens of ``text`` that the label follows, and the label tokens of ``A`` and ``B``:
    ``text + "A"`` and ``text + "B"`` are tokenized, and the labels are the first tokens where
    they differ (so a label may merge with the space before it, as BPE vocabularies do)."""
    with_a = list(tokenizer(text + "A").input_ids)
    with_b = list(tokenizer(text + "B").input_ids)
    for index, (x, y) in enumerate(zip(with_a, with_b, strict=False)):
        if x != y:
            return with_a[:index], (x, y)
    raise PreftuneError(
        "the llm judge's tokenizer cannot tell the labels A and B apart after the template "
        "(judge.template)"
    )
