"""Habits users bring from TRL, a fast command line, and the small things a first run shows:
loss aliases and hints for other trainers' keys and options, ``--help`` with every key's
choices and no torch, config errors before any model, and the wording of what a run prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from preftune.cli import build_parser, key_table, main
from preftune.commands import REGISTRY
from preftune.commands.configs import DPOConfig, SFTConfig
from preftune.config import BATCH_NOTE, _leaves, describe, load_config
from preftune.errors import ConfigError
from preftune.losses import PAIRED_LOSSES
from preftune.losses.names import ALIASES, LOSS_NAMES
from preftune.train.settings import TrainSettings
from tests.conftest import ROOT, SAMPLE_TRAIN

# TRL 1.16's DPOConfig.loss_type names: each is preftune's name for the same loss, or an alias.
TRL_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
BATCH = BATCH_NOTE


def one_line_config_error(cls: type, *overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(cls, None, overrides)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_the_loss_names_are_the_registry() -> None:
    assert tuple(sorted(PAIRED_LOSSES)) == LOSS_NAMES
    assert set(ALIASES.values()) <= set(LOSS_NAMES)
    assert not set(ALIASES) & set(LOSS_NAMES)


@pytest.mark.parametrize(("alias", "name"), sorted(ALIASES.items()))
def test_an_alias_is_its_loss(alias: str, name: str) -> None:
    assert load_config(DPOConfig, None, [f"loss.type={alias}"]).loss.type == [name]
    combined = load_config(DPOConfig, None, [f"loss.type=[{alias}, sft]"]).loss.type
    assert combined == [name, "sft"]


@pytest.mark.parametrize("name", TRL_LOSS_TYPES)
def test_every_trl_loss_type_is_accepted(name: str) -> None:
    assert load_config(DPOConfig, None, [f"loss.type={name}"]).loss.type[0] in LOSS_NAMES


def test_dpo_is_not_mistaken_for_ipo() -> None:
    assert load_config(DPOConfig, None, ["loss.type=dpo"]).loss.type == ["sigmoid"]
    message = one_line_config_error(DPOConfig, "loss.type=dpoo")
    assert message.endswith("did you mean 'dpo'?")


def test_kto_pair_points_to_the_kto_command() -> None:
    message = one_line_config_error(DPOConfig, "loss.type=kto_pair")
    assert message.startswith("loss.type=kto_pair: KTO is a command of its own")
    assert "preftune kto" in message


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("train.gradient_accumulation_steps=4", BATCH),
        ("gradient_accumulation_steps=4", BATCH),
        ("per_device_train_batch_size=2", BATCH),
        ("train.per_device_train_batch_size=2", BATCH),
        ("num_train_epochs=3", "did you mean 'train.epochs'?"),
        ("lr_scheduler_type=cosine", "did you mean 'train.lr_scheduler'?"),
        ("warmup_ratio=0.1", "set train.warmup_steps to the ratio x the optimizer steps"),
        ("bf16=true", "use model.dtype=bfloat16"),
        ("precompute_ref_log_probs=true", "speed.reference_cache (on by default)"),
        ("ref_model=gpt2", "did you mean 'reference.model'?"),
        ("sync_ref_model=true", "TR-DPO: set reference.sync_every (steps) and reference.sync_mix"),
        ("ref_model_mixup_alpha=0.5", "did you mean 'reference.sync_mix'?"),
        ("padding_free=true", "speed.packing (on by default)"),
    ],
)
def test_trl_keys_get_a_targeted_hint(override: str, hint: str) -> None:
    key = override.split("=")[0]
    message = one_line_config_error(DPOConfig, override)
    assert message.startswith(f"unknown config key '{key}'; ")
    assert hint in message


def test_a_hint_is_offered_only_where_its_key_exists() -> None:
    """sft has no loss.* keys: TRL's loss_type gets no pointer to loss.type there."""
    assert "loss.type" not in one_line_config_error(SFTConfig, "loss_type=ipo")
    assert "loss.type" in one_line_config_error(DPOConfig, "loss_type=ipo")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["dpo", "--max_steps", "1"], "--max_steps: use train.max_steps=1"),
        (["dpo", "--learning_rate=1e-5"], "--learning_rate=1e-5: use train.learning_rate=1e-5"),
        (["sft", "--num_train_epochs", "2"], "--num_train_epochs: use train.epochs=2"),
        (["dpo", "--gradient_accumulation_steps", "4"], f"--gradient_accumulation_steps: {BATCH}"),
        (["dpo", "--bf16"], "--bf16: use model.dtype=bfloat16"),
        (["dpo", "--train.max_steps", "3"], "--train.max_steps: use train.max_steps=3"),
        (["data", "check", "--max_length", "64"], "--max_length: use data.max_length=64"),
        (
            ["dpo", "--frobnicate"],
            "--frobnicate: no such option; config keys are set as key=value (--help lists them)",
        ),
    ],
)
def test_dashed_options_name_the_key_to_set(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"preftune: error: {message}"]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_help_lists_the_choices_of_every_key_that_has_them(name: str) -> None:
    config = REGISTRY[name].config
    helps = {key: help for key, _, help in describe(config)}
    for key, field, _ in _leaves(config):
        for choice in field.metadata["choices"]:
            assert choice in helps[key], (key, choice)


def test_help_names_the_choices_it_did_not_name_already() -> None:
    table = key_table(DPOConfig)
    assert "schedule after warmup; one of linear, cosine, constant" in table
    assert "optimizer; one of adamw, rmsprop" in table
    assert "which part of a long prompt to keep; one of keep_end, keep_start" in table
    assert "| float32 | bfloat16; one of auto, float32, bfloat16, float16" in table
    assert "(also dpo: sigmoid, slic: hinge, aot_unpaired: aot_pair)" in table


def test_every_help_formats() -> None:
    """Summaries may hold a % (eval's "95% interval"), which argparse would read as a format."""
    parser = build_parser()
    assert "95% interval" in parser.format_help()
    for name, sub in parser._subparsers._group_actions[0].choices.items():  # type: ignore[union-attr]
        assert f"preftune {name}" in sub.format_help()


def imports_of(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``python -X importtime`` with ``args``; its result and every module it imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line]
    return result, set(lines)


@pytest.mark.parametrize("argv", [["--help"], ["dpo", "--help"], ["data", "check", "--help"]])
def test_help_loads_no_torch(argv: list[str]) -> None:
    result, modules = imports_of("-m", "preftune", *argv)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "config keys" in result.stdout or argv == ["--help"]
    assert not {"torch", "transformers", "accelerate", "datasets"} & modules


def test_a_config_error_loads_no_torch(tmp_path: Path) -> None:
    """The config is built, and refused, before the command's module (and torch) is imported."""
    code = (
        "import sys\n"
        "from preftune.cli import main\n"
        "status = main(['dpo', 'data.max_length=16', 'data.max_prompt_length=32'])\n"
        "assert status == 2, status\n"
        "assert 'torch' not in sys.modules\n"
    )
    result, modules = imports_of("-c", code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "data.max_prompt_length=32 leaves no room" in result.stderr
    assert "torch" not in modules


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["dpo", "data.max_length=64", "data.max_prompt_length=64"],
            "data.max_prompt_length=64 leaves no room for a response within data.max_length=64",
        ),
        (["dpo", "data.max_length=128"], "data.max_prompt_length=256 leaves no room"),
        (["dpo", "data.train=missing.jsonl"], "data.train: missing.jsonl: no such file"),
        (["kto", "data.eval=./no/such/dir"], "data.eval: ./no/such/dir: no such file"),
        (["sft", f"data.train=[{SAMPLE_TRAIN}, gone.parquet]"], "gone.parquet: no such file"),
        (["online", "judge.spec=rmm:runs/rm"], "judge.spec='rmm:runs/rm': expected rm:DIR"),
        (["label", "judge.spec=oracle:x"], "expected rm:DIR, function:module:callable"),
        (["spin", "train.distributed=fsdp2"], "spin does not run under train.distributed=fsdp2"),
        (["spin", "loss.soft_labels=true"], "spin's pairs (a demonstration and a sample)"),
        (["ppo", "ppo.ptx_coef=0.5"], "ppo.ptx_coef and data.ptx go together"),
        (["ppo", "data.ptx=nowhere.jsonl"], "data.ptx: nowhere.jsonl: no such file"),
        (["dpo", "train.max_shard_size=5 apples"], "train.max_shard_size='5 apples' is not"),
    ],
)
def test_config_errors_come_before_any_model(
    argv: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import preftune.models.load

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model or tokenizer was loaded before the config was checked")

    monkeypatch.setattr(preftune.models.load, "load_tokenizer", refused)
    monkeypatch.setattr(preftune.models.load, "load_model", refused)
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_hub_id_is_not_a_missing_file() -> None:
    cfg = load_config(DPOConfig, None, ["data.train=org/pairs:train", "data.eval=org/pairs"])
    assert (cfg.data.train, cfg.data.eval) == ("org/pairs:train", "org/pairs")


@pytest.mark.parametrize("size", ["5GB", "500MB", "2GiB", "100KB", "1.5GB", "8Gb"])
def test_shard_sizes_read_without_accelerate(size: str) -> None:
    from accelerate.utils import convert_file_size_to_int

    from preftune.train.settings import size_in_bytes

    assert size_in_bytes(size) == convert_file_size_to_int(size) > 0
    assert TrainSettings(max_shard_size=size).max_shard_size == size


def test_batch_wording_counts_in_words() -> None:
    from preftune.train.sources import ExampleBatches, batch_split

    one = ExampleBatches(list(range(7)), list, TrainSettings(batch_size=3), seed=0)
    assert one.describe() == (
        "3 examples = 1 process x 1 micro-batch x 3; 1 example an epoch left over by the batch size"
    )
    two = ExampleBatches(
        list(range(16)), list, TrainSettings(batch_size=8, micro_batch_size=2), 0, 0, 2
    )
    assert two.describe() == (
        "8 examples = 2 processes x 2 micro-batches x 2; 0 examples an epoch left over by the "
        "batch size"
    )
    assert batch_split(4, 4, 1) == "4 processes x 1 micro-batch x 1"


def card_of(tmp_path: Path, base: str) -> str:
    from preftune.train.card import write_model_card

    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    write_model_card(out, "dpo", base, {"seed": 1}, {"loss": 0.5})
    return (out / "README.md").read_text().split("---\n")[1]


def test_the_card_names_a_hub_base_never_a_local_path(tmp_path: Path) -> None:
    assert "base_model: org/model\n" in card_of(tmp_path, "org/model")
    assert "base_model" not in card_of(tmp_path, "tiny")
    local = tmp_path / "sft-run"
    local.mkdir()
    assert "base_model" not in card_of(tmp_path, str(local))
    (local / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/model"}))
    assert "base_model" not in card_of(tmp_path, str(local))
    (local / "config.json").write_text(json.dumps({"_name_or_path": "gpt2"}))
    assert "base_model: gpt2\n" in card_of(tmp_path, str(local))
    # A preftune run's own card records where it came from; that comes first.
    (local / "README.md").write_text("---\nbase_model: Qwen/Qwen2-0.5B\n---\n\n# sft\n")
    assert "base_model: Qwen/Qwen2-0.5B\n" in card_of(tmp_path, str(local))


def test_bf16_on_a_cpu_without_it_warns_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from preftune.commands import common

    monkeypatch.setattr(common, "cpu_flags", lambda: {"avx2", "fma"})
    warning = common.slow_on_cpu("bfloat16")
    assert warning is not None and "\n" not in warning
    assert warning.startswith("warning: model.dtype=bfloat16 on a CPU without native bfloat16")
    assert common.slow_on_cpu("float16") is not None
    assert common.slow_on_cpu("float32") is None
    monkeypatch.setattr(common, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert common.slow_on_cpu("bfloat16") is None
    monkeypatch.setattr(common, "cpu_flags", lambda: {"fp", "asimd", "bf16"})  # an Arm CPU
    assert common.slow_on_cpu("bfloat16") is None
    monkeypatch.setattr(common, "cpu_flags", lambda: None)  # flags unreadable: no guess
    assert common.slow_on_cpu("bfloat16") is None


def test_hh_rows_with_an_empty_response_say_so(tmp_path: Path) -> None:
    from preftune.data.readers import load_pairs

    transcript = "\n\nHuman: hi\n\nAssistant:"
    rows = [
        {"chosen": f"{transcript} hello", "rejected": f"{transcript} go away"},
        {"chosen": "", "rejected": f"{transcript} go away"},
        {"chosen": f"{transcript} hello", "rejected": " "},
    ]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    skipped: list[Any] = []
    pairs, layout = load_pairs(str(path), "train", skipped)
    assert (layout, len(pairs)) == ("hh", 1)
    assert [str(error) for error in skipped] == [
        f"{path}: row 2: field 'chosen': empty response",
        f"{path}: row 3: field 'rejected': empty response",
    ]
