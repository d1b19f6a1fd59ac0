"""Keys of ``preftune score``: which reward model, which rows, and where the scores go."""

from __future__ import annotations

from dataclasses import dataclass, field

from preftune.errors import ConfigError
from preftune.fields import check_fields, option


@dataclass
class RewardModelConfig:
    path: str | None = option(None, "the trained reward model: the output_dir of `preftune rm`")
    trust_remote_code: bool = option(False, "allow model code shipped with a hub model to run")

    def __post_init__(self) -> None:
        check_fields(self, "model")


@dataclass
class ScoreSettings:
    input: str | None = option(
        None,
        "rows to score: prompt/completion (or messages), pairs or ranked rows; same forms as "
        "data.train",
    )
    output: str | None = option(None, "JSONL written: each input row with its score(s)")
    batch_size: int = option(16, "sequences per forward pass", at_least=1)
    max_length: int = option(
        512, "longest prompt+response in tokens; longer responses are cut", at_least=1
    )
    max_prompt_length: int = option(
        256, "longest prompt in tokens; below score.max_length", at_least=0
    )
    truncation: str = option(
        "keep_end", "which part of a long prompt to keep", ("keep_end", "keep_start")
    )

    def __post_init__(self) -> None:
        check_fields(self, "score")


@dataclass
class ScoreConfig:
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    score: ScoreSettings = field(default_factory=ScoreSettings)

    def __post_init__(self) -> None:
        check_fields(self)
        for key, value in (
            ("model.path", self.model.path),
            ("score.input", self.score.input),
            ("score.output", self.score.output),
        ):
            if value is None:
                raise ConfigError(f"{key} is required (preftune score --help lists the keys)")
