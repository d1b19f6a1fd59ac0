from __future__ import annotations

from pathlib import Path

import pytest

from preftune.cli import build_parser, key_table
from preftune.config import DPOConfig, SFTConfig, describe, load_config
from preftune.errors import ConfigError


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
    from preftune.commands import run_dpo

    out = tmp_path / "out"
    cfg = load_config(
        DPOConfig,
        None,
        [
            "model.attn_implementation=flex_attention",
            "data.train=nowhere.jsonl",
            f"output_dir={out}",
        ],
    )
    with pytest.raises(ConfigError, match="flex_attention cannot train on a CPU"):
        run_dpo(cfg)
    assert not out.exists()
