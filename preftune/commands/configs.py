"""The config of every command: the keys it takes, checked as the config is built.

They live apart from the commands that run them, and import nothing that loads torch or
transformers, so that ``--help`` lists them, and a config that cannot run is refused, in a
fraction of a second, before any command module (and its libraries) is imported; each command
module imports its config from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from preftune.data.settings import DataSettings, check_sources_exist
from preftune.errors import ConfigError
from preftune.fields import check_fields, option
from preftune.losses.settings import LossSettings
from preftune.models.settings import LoraSettings, ModelSettings
from preftune.objectives.settings import (
    KTOSettings,
    LayoutSettings,
    OnlineSettings,
    PPOSettings,
    ReferenceSettings,
    RLOOSettings,
    SpeedSettings,
    SPINSettings,
    UnlikelihoodSettings,
)
from preftune.train.rollout_settings import GenerationSettings, JudgeSettings, RewardSettings
from preftune.train.settings import LogSettings, TrainSettings

EVAL_SAMPLES = "eval_samples.jsonl"
EVAL_SUMMARY = "eval_summary.json"
PAIRINGS = ("best_worst", "all", "ranked")


@dataclass
class RunConfig:
    """The keys every training command takes; each command's config adds its own sections."""

    # NumPy takes seeds below 2**32, and runs add small offsets (SPIN: seed + iteration).
    seed: int = option(
        42, "seed for model init (tiny), data order and sampling", at_least=0, at_most=2**31 - 1
    )
    output_dir: str = option("runs/preftune", "where the model, checkpoints and metrics go")
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    log: LogSettings = field(default_factory=LogSettings)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.model.quantization != "none" and self.lora.r == 0:
            raise ConfigError(
                f"model.quantization={self.model.quantization} trains LoRA adapters on the "
                "quantized weights: set lora.r (e.g. lora.r=16)"
            )
        if self.model.quantization != "none" and self.train.distributed == "fsdp2":
            raise ConfigError(
                "model.quantization does not shard: use train.distributed=ddp with quantized "
                "weights"
            )
        if self.lora.r > 0 and self.lora.dropout > 0 and self.model.disable_dropout:
            raise ConfigError(
                f"lora.dropout={self.lora.dropout} has no effect with model.disable_dropout=true, "
                "which trains the whole model, adapters included, without dropout: set "
                "lora.dropout=0, or model.disable_dropout=false"
            )


@dataclass
class DPOConfig(RunConfig):
    loss: LossSettings = field(default_factory=LossSettings)
    speed: SpeedSettings = field(default_factory=SpeedSettings)
    reference: ReferenceSettings = field(default_factory=ReferenceSettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reference.check_run(self.loss, self.speed, self.train.distributed)


@dataclass
class SFTConfig(RunConfig):
    """``preftune sft``: the keys of every run, and no others."""


@dataclass
class RMConfig(RunConfig):
    """``preftune rm``: the keys of every run; the model gets a one-output score head."""


@dataclass
class UnlikelihoodConfig(RunConfig):
    unlikelihood: UnlikelihoodSettings = field(default_factory=UnlikelihoodSettings)


@dataclass
class KTOConfig(RunConfig):
    kto: KTOSettings = field(default_factory=KTOSettings)


@dataclass
class SPINConfig(RunConfig):
    loss: LossSettings = field(default_factory=LossSettings)
    speed: SpeedSettings = field(default_factory=SpeedSettings)
    spin: SPINSettings = field(default_factory=SPINSettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train.distributed == "fsdp2":
            raise ConfigError(
                "preftune spin does not run under train.distributed=fsdp2 yet (each process "
                "generates its own completions, which a sharded model cannot): use ddp"
            )
        if self.loss.soft_labels:
            raise ConfigError(
                "loss.soft_labels: spin's pairs (a demonstration and a sample) carry no "
                "chosen_probability; unset it"
            )


@dataclass
class PPODataSettings(DataSettings):
    ptx: str | None = option(
        None, "demonstrations (prompt/completion or messages rows) for ppo.ptx_coef's term"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sources_exist("data.ptx", self.ptx)


@dataclass
class PPOConfig(RunConfig):
    data: PPODataSettings = field(default_factory=PPODataSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    reward: RewardSettings = field(default_factory=RewardSettings)
    ppo: PPOSettings = field(default_factory=PPOSettings)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.ppo.ptx_coef > 0) != (self.data.ptx is not None):
            raise ConfigError(
                "ppo.ptx_coef and data.ptx go together: set both (the pretraining term and its "
                "demonstrations) or neither"
            )


@dataclass
class RLOOConfig(RunConfig):
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    reward: RewardSettings = field(default_factory=RewardSettings)
    rloo: RLOOSettings = field(default_factory=RLOOSettings)


@dataclass
class OnlineConfig(RunConfig):
    loss: LossSettings = field(default_factory=LossSettings)
    speed: LayoutSettings = field(default_factory=LayoutSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    online: OnlineSettings = field(default_factory=OnlineSettings)


@dataclass
class LabelSettings:
    k: int = option(2, "completions sampled per prompt", at_least=2)
    pairs: str = option(
        "best_worst",
        "rows written per prompt: best_worst (its best and worst completion) | all (every two) | "
        "ranked (one ranked row: responses and the judge's scores)",
        PAIRINGS,
    )
    output: str | None = option(None, "the JSONL file written (required)")
    seed: int = option(
        42, "seed for sampling (and the tiny preset's weights)", at_least=0, at_most=2**31 - 1
    )

    def __post_init__(self) -> None:
        check_fields(self, "label")


@dataclass
class LabelConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    label: LabelSettings = field(default_factory=LabelSettings)

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class ScoreModelSettings:
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
    model: ScoreModelSettings = field(default_factory=ScoreModelSettings)
    score: ScoreSettings = field(default_factory=ScoreSettings)

    def __post_init__(self) -> None:
        check_fields(self)
        required("model.path", self.model.path)
        required("score.input", self.score.input)
        required("score.output", self.score.output)


def required(key: str, value: str | None) -> str:
    """The value of ``key``, which has no default: refused while unset."""
    if value is None:
        raise ConfigError(f"{key} is required (preftune score --help lists the keys)")
    return value


@dataclass
class EvalSettings:
    baseline: str = option(
        "data",
        "what the policy is compared with: data (each row's own response, a pair's chosen one) "
        "or a model directory or hub id, sampled as the policy is",
    )
    max_prompts: int = option(
        0, "judge the first this many prompts of data.eval (0: all)", at_least=0
    )

    def __post_init__(self) -> None:
        check_fields(self, "eval")


@dataclass
class EvalConfig:
    seed: int = option(42, "seed of sampling and of the bootstrap", at_least=0, at_most=2**31 - 1)
    output_dir: str = option(
        "runs/preftune-eval", f"where {EVAL_SAMPLES} and {EVAL_SUMMARY} are written"
    )
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        check_fields(self)
