from __future__ import annotations

import dataclasses
import math
import re
import time
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from preftune.cli import build_parser, key_table, main
from preftune.commands.dpo import DPOConfig
from preftune.commands.kto import KTOConfig
from preftune.commands.rm import RMConfig
from preftune.commands.score import ScoreConfig
from preftune.commands.sft import SFTConfig
from preftune.commands.spin import SPINConfig
from preftune.config import describe, load_config
from preftune.data.settings import DataSettings
from preftune.demo.settings import DemoConfig
from preftune.errors import ConfigError
from preftune.losses.settings import LossSettings
from preftune.models.settings import LoraSettings
from preftune.train.settings import TrainSettings
from tests.conftest import SAMPLE_TRAIN


def test_overrides_need_no_config_file() -> None:
    cfg = load_config(DPOConfig, None, ["model=./m", "loss.beta=0.5", "train.learning_rate=1e-5"])
    assert cfg.model.path == "./m"
    assert cfg.loss.beta == 0.5
    assert cfg.train.learning_rate == 1e-5


def test_override_wins_over_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: {path: tiny, dtype: float32}\nloss:\n  beta: 0.2\n  type: ipo\n")
    cfg = load_config(DPOConfig, str(path), ["loss.beta=0.3"])
    assert (cfg.model.dtype, cfg.loss.type, cfg.loss.beta) == ("float32", ["ipo"], 0.3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lerning_rate=1", "did you mean 'train.learning_rate'"),
        ("los.beta=1", "did you mean 'loss.beta'"),
        ("train.batch_size=eight", "'train.batch_size' must be int"),
        ("loss.type=ipoo", "did you mean 'ipo'"),
        ("data.truncation=keep_middle", "keep_end, keep_start"),
        ("train.epochs=null", "cannot be null"),
        ("beta", "key=value"),
        ("lora.r=8 lora.dropout=0.05", "set lora.dropout=0, or model.disable_dropout=false"),
    ],
)
def test_bad_keys_and_values_name_the_fix(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(DPOConfig, None, override.split())


def test_sft_has_no_loss_section() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'loss\.beta'"):
        load_config(SFTConfig, None, ["loss.beta=0.1"])


def test_bad_yaml_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("loss: [unclosed\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: not valid YAML"):
        load_config(DPOConfig, str(path))


def test_help_lists_every_key_with_default() -> None:
    table = key_table(DPOConfig)
    for key, default, _ in describe(DPOConfig):
        assert key in table
        assert f"(default: {default})" in table
    assert "loss.label_smoothing" in table and "train.batch_size" in table
    help_text = build_parser()._subparsers._group_actions[0].choices["dpo"].format_help()
    assert "train.save_every" in help_text


def test_flex_attention_on_a_cpu_is_refused_before_any_work(tmp_path: Path) -> None:
    """PyTorch has no flex-attention backward on a CPU: one line before data or model load."""
    from preftune.commands.dpo import run_dpo

    out = tmp_path / "out"
    cfg = load_config(
        DPOConfig,
        None,
        [
            "model.attn_implementation=flex_attention",
            f"data.train={SAMPLE_TRAIN}",
            f"output_dir={out}",
        ],
    )
    with pytest.raises(ConfigError, match="flex_attention cannot train on a CPU"):
        run_dpo(cfg)
    assert not out.exists()


# Every config class a command builds; the cases below are generated from their fields, so a new
# key is covered as soon as it is declared.
CONFIGS = (SFTConfig, DPOConfig, SPINConfig, KTOConfig, RMConfig, ScoreConfig, DemoConfig)


def leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, type, str, Any]]:
    """(dotted key, the dataclass declaring it, field name, type) of every leaf key of ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", cls, f.name, hints[f.name]


def scalar_kinds(hint: Any) -> set[Any]:
    """The types a value (or each item, for a list) of a field of type ``hint`` may have."""
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return {typing.get_args(k)[0] if typing.get_origin(k) is list else k for k in kinds}


def is_numeric(hint: Any) -> bool:
    return bool({int, float} & scalar_kinds(hint))


NUMERIC_KEYS = [
    (cls, key, hint) for cls in CONFIGS for key, _, _, hint in leaves(cls) if is_numeric(hint)
]
DECLARED = {(owner, name): (key, hint) for cls in CONFIGS for key, owner, name, hint in leaves(cls)}


def refusal(key: str, hint: Any, shown: str) -> str:
    """The one line that refuses a non-finite value of ``key``: a range error for a float (its
    range named), a type error for an int."""
    if float in scalar_kinds(hint):
        return rf"^{re.escape(key)}(\[0\])? must be finite and .+, got {re.escape(shown)}$"
    name = "int or auto" if str in scalar_kinds(hint) else "int( or null)?"
    return rf"^config key '{re.escape(key)}' must be {name}, got '?{re.escape(shown)}'?$"


def test_the_generated_cases_cover_every_section() -> None:
    keys = {key for _, key, _ in NUMERIC_KEYS}
    for key in ("seed", "train.max_grad_norm", "loss.weights", "kto.beta", "speed.logits_chunk"):
        assert key in keys
    for key in ("score.batch_size", "spin.top_p", "lora.dropout", "pairs.eval_fraction"):
        assert key in keys
    assert len(keys) > 50


@pytest.mark.parametrize(("text", "shown"), [("nan", "nan"), (".inf", "inf"), ("-inf", "-inf")])
@pytest.mark.parametrize(
    ("cls", "key", "hint"), NUMERIC_KEYS, ids=[f"{c.__name__}-{k}" for c, k, _ in NUMERIC_KEYS]
)
def test_every_numeric_key_refuses_non_finite_values(
    cls: type, key: str, hint: Any, text: str, shown: str
) -> None:
    with pytest.raises(ConfigError, match=refusal(key, hint, shown)):
        load_config(cls, None, [f"{key}={text}"])


@pytest.mark.parametrize(
    ("owner", "name"), list(DECLARED), ids=[f"{o.__name__}.{n}" for o, n in DECLARED]
)
def test_every_field_is_checked_when_built_from_python(owner: type, name: str) -> None:
    """A section does not know where it sits, yet its messages name the full dotted key."""
    key, hint = DECLARED[(owner, name)]
    with pytest.raises(ConfigError, match=rf"^config key '{re.escape(key)}' must be "):
        owner(**{name: {"not": ["a value"]}})  # a mapping of lists: no field's type
    if is_numeric(hint):
        with pytest.raises(ConfigError, match=refusal(key, hint, "nan")):
            owner(**{name: math.nan})


@pytest.mark.parametrize(
    ("owner", "name"),
    [(o, n) for (o, n), (_, hint) in DECLARED.items() if is_numeric(hint)],
)
def test_every_numeric_field_declares_its_range(owner: type, name: str) -> None:
    metadata = {f.name: f.metadata for f in dataclasses.fields(owner)}[name]
    assert str(metadata["bounds"]), f"{owner.__name__}.{name} has no range"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_grad_norm=-1", "train.max_grad_norm must be 0 or more, got -1.0"),
        ("loss.beta=nan", "loss.beta must be finite and positive, got nan"),
        ("loss.beta=inf", "loss.beta must be finite and positive, got inf"),
        ("loss.beta=-0.1", "loss.beta must be positive, got -0.1"),
        ("train.learning_rate=nan", "train.learning_rate must be finite and positive, got nan"),
        ("train.learning_rate=inf", "train.learning_rate must be finite and positive, got inf"),
        ("train.learning_rate=-1", "train.learning_rate must be positive, got -1.0"),
        ("train.learning_rate=0", "train.learning_rate must be positive, got 0.0"),
        ("train.batch_size=0", "train.batch_size must be at least 1, got 0"),
        ("train.batch_size=-4", "train.batch_size must be at least 1, got -4"),
        ("train.log_every=0", "train.log_every must be at least 1, got 0"),
        ("train.warmup_steps=-5", "train.warmup_steps must be 0 or more, got -5"),
        ("train.micro_batch_size=0", "train.micro_batch_size must be at least 1, got 0"),
        ("lora.dropout=1", "lora.dropout must be in [0, 1), got 1.0"),
        ("loss.label_smoothing=0.5", "loss.label_smoothing must be in [0, 0.5), got 0.5"),
        ("loss.weights=[1, -1]", "loss.weights[1] must be 0 or more, got -1.0"),
        ("seed=-1", "seed must be in [0, 2147483647], got -1"),
        ("data.max_length=0", "data.max_length must be at least 1, got 0"),
        ("speed.pack_length=-1", "speed.pack_length must be 0 or more, got -1"),
        ("train.batch_size=true", "config key 'train.batch_size' must be int, got True"),
    ],
)
def test_out_of_range_values_name_key_range_and_value(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_config(DPOConfig, None, [override])


@pytest.mark.parametrize("value", ["5bananas", "0GB", "-1GB", "GB"])
def test_a_shard_size_that_is_not_a_size_is_one_line_at_start(value: str) -> None:
    """Refused before training, not when the model is saved at the end."""
    message = f"train.max_shard_size='{value}' is not a size: give bytes with a unit"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        load_config(DPOConfig, None, [f"train.max_shard_size={value}"])
    assert load_config(DPOConfig, None, ["train.max_shard_size=500MB"]).train.max_shard_size


@pytest.mark.parametrize("value", ["0", "null", "0.5"])
def test_max_grad_norm_zero_or_null_turns_clipping_off(value: str) -> None:
    cfg = load_config(DPOConfig, None, [f"train.max_grad_norm={value}"])
    clip = cfg.train.max_grad_norm or math.inf  # as the training loop reads it
    assert clip == (0.5 if value == "0.5" else math.inf)


def test_values_on_the_edge_of_their_range_are_accepted() -> None:
    cfg = load_config(
        SPINConfig,
        None,
        ["spin.top_p=1", "lora.dropout=0", "train.max_steps=0", "seed=2147483647"],
    )
    assert (cfg.spin.top_p, cfg.lora.dropout, cfg.seed) == (1.0, 0.0, 2**31 - 1)


def test_a_config_written_in_python_is_checked() -> None:
    with pytest.raises(
        ConfigError, match=r"^config key 'train\.learning_rate' must be float, got '1e-5'$"
    ):
        DPOConfig(train=TrainSettings(learning_rate="1e-5"))
    with pytest.raises(
        ConfigError, match=r"^config key 'train\.batch_size' must be int, got True$"
    ):
        TrainSettings(batch_size=True)
    with pytest.raises(ConfigError, match=r"^config key 'train\.epochs' must be int, got 2\.0$"):
        TrainSettings(epochs=2.0)
    with pytest.raises(ConfigError, match=r"^config key 'train\.epochs' cannot be null$"):
        TrainSettings(epochs=None)
    with pytest.raises(ConfigError, match=r"must be list of float, got \[1\.0, 'x'\]"):
        LossSettings(type=["sigmoid", "sft"], weights=[1, "x"])
    with pytest.raises(ConfigError, match=r"^config key 'data\.truncation' must be one of"):
        DataSettings(truncation="keep_middle")
    with pytest.raises(ConfigError, match=r"^config key 'train' must be TrainSettings, got \{"):
        DPOConfig(train={"learning_rate": 1e-5})
    with pytest.raises(ConfigError, match=r"^train\.max_grad_norm must be 0 or more, got -1\.0$"):
        DPOConfig(train=TrainSettings(max_grad_norm=-1))


def test_python_values_are_settled_as_yaml_would_read_them() -> None:
    train = TrainSettings(learning_rate=1, max_grad_norm=None)
    assert type(train.learning_rate) is float and train.max_grad_norm is None
    assert LossSettings(type="ipo").type == ["ipo"]
    assert LoraSettings(target_modules=["q_proj"]).target_modules == ["q_proj"]


def test_help_shows_each_range() -> None:
    helps = {key: text for key, _, text in describe(DPOConfig)}
    assert helps["train.max_grad_norm"].endswith("; 0 or more")
    assert helps["loss.label_smoothing"].endswith("; in [0, 0.5)")
    assert helps["model.path"] == "`tiny` (built from code), a local model directory, or a hub id"


def alias_bomb(levels: int, width: int = 9) -> str:
    """A "billion laughs" mapping: each level maps ``width`` keys to the level below, so the
    document holds ``width ** levels`` values once its aliases are expanded."""
    keys = [f"k{i}" for i in range(width)]
    lines = ["l0: &l0 {" + ", ".join(f"{k}: lol" for k in keys) + "}"]
    for level in range(1, levels):
        lines.append(
            f"l{level}: &l{level} {{" + ", ".join(f"{k}: *l{level - 1}" for k in keys) + "}"
        )
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [6, 9])
def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path: Path, levels: int) -> None:
    """Six levels (531,441 values) would expand in about a second; nine would take minutes and
    all memory. Both are refused from the node graph at once."""
    path = tmp_path / "run.yaml"
    path.write_text(alias_bomb(levels))
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"run\.yaml: aliases expand to more than 10000 values$"):
        load_config(DPOConfig, str(path))
    assert time.perf_counter() - start < 0.5


def test_self_referring_alias_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"aliases expand to more than 10000 values"):
        load_config(DPOConfig, None, ["train.report_to=&a [*a]"])


def test_a_few_aliases_are_read_as_usual(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  train: &pairs org/pairs\n  eval: *pairs\n")
    assert load_config(DPOConfig, str(path)).data.eval == "org/pairs"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.beta=[1,", r"^override 'loss\.beta=\[1,': not valid YAML: expected the node"),
        (
            "loss.beta=!!python/object/apply:os.system [ls]",
            r"^override 'loss\.beta=!!python.*: not valid YAML: could not determine a constructor",
        ),
        ("loss.beta=" + "[" * 3000, r"not valid YAML: nested too deeply$"),
    ],
)
def test_bad_override_is_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(DPOConfig, None, [override])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("override", "error"),
    [
        ("train.max_grad_norm=-1", "train.max_grad_norm must be 0 or more, got -1.0"),
        ("loss.beta=nan", "loss.beta must be finite and positive, got nan"),
        ("train.batch_size=0", "train.batch_size must be at least 1, got 0"),
        ("loss.beta=[1,", "override 'loss.beta=[1,': not valid YAML: "),
    ],
)
def test_cli_refuses_bad_values_in_one_line(
    override: str, error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused as the config is built, before any model or data is read."""
    assert main(["dpo", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"preftune: error: {error}")
