"""The demo's ground-truth reward: VADER's compound sentiment score (from the vaderSentiment
package), or a reward model trained by ``preftune rm``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from preftune.errors import PreftuneError


@dataclass
class Judge:
    """Scores completions as replies to their prompts; ``name`` labels the reports."""

    name: str
    score: Callable[[list[str], list[str]], list[float]]


def load_judge(spec: str, max_length: int) -> Judge:
    """``vader``, or the directory of a reward model trained by ``preftune rm``."""
    if spec == "vader":
        return sentiment_judge()
    from preftune.models.reward import RewardScorer

    scorer = RewardScorer(spec, max_length=max_length, max_prompt_length=max_length // 2)
    return Judge(f"reward model {spec}", scorer.score)


def sentiment_judge() -> Judge:
    """VADER compound scores in [-1, 1] of each prompt and completion read as one text."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise PreftuneError(
            "preftune demo scores samples with VADER: pip install 'preftune[demo]'"
        ) from None
    analyzer = SentimentIntensityAnalyzer()

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        return [
            analyzer.polarity_scores(prompt + text)["compound"]
            for prompt, text in zip(prompts, completions, strict=True)
        ]

    return Judge("VADER", score)


_VADER: list[Judge] = []


def vader_reward(prompt: str, completion: str) -> float:
    """VADER's compound score of the prompt and completion read as one text, as the judge
    gives it: the demo's ground truth as a reward function for ``preftune ppo`` and ``preftune
    rloo`` (``reward.function=preftune.demo.judge:vader_reward``)."""
    if not _VADER:
        _VADER.append(sentiment_judge())
    return _VADER[0].score([prompt], [completion])[0]
