"""The loss family as users reach it: ``loss.*`` keys, combinations, and short training runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from preftune.cli import build_parser
from preftune.commands import dpo as commands
from preftune.commands.dpo import DPOConfig, run_dpo
from preftune.config import load_config
from preftune.data.encode import Budget, encode_pairs
from preftune.data.readers import load_pairs
from preftune.errors import ConfigError
from preftune.losses import LOSS_NAMES, PAIRED_LOSSES, LossParams, combined_loss
from preftune.losses.settings import LossSettings
from preftune.models.reference import FrozenCopy
from preftune.models.tiny import build_model, build_tokenizer
from preftune.objectives.dpo import PairedObjective
from tests.conftest import SAMPLE_TRAIN, read_metrics
from tests.test_losses import REFERENCE_FREE, random_logps


def loss_config(*overrides: str) -> LossSettings:
    return load_config(DPOConfig, None, list(overrides)).loss


def test_a_list_of_losses_and_weights_parses() -> None:
    cfg = loss_config("loss.type=[sigmoid, sft]", "loss.weights=[1.0, 0.5]")
    assert (cfg.type, cfg.weights) == (["sigmoid", "sft"], [1.0, 0.5])
    assert loss_config("loss.type=simpo").type == ["simpo"]
    assert LossSettings(type="ipo").type == ["ipo"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss.type=[sigmoid, simpoo]"], r"'simpoo' is not one of .*did you mean 'simpo'"),
        (["loss.type=[sigmoid, sft]", "loss.weights=[1.0]"], r"1 weights for 2 losses"),
        (["loss.simpo_gamma=1.0"], r"loss\.simpo_gamma has no effect with loss\.type=sigmoid"),
        (["loss.type=ipo", "loss.discopop_tau=0.1"], r"loss\.discopop_tau has no effect"),
        (["loss.type=ipo", "loss.label_smoothing=0.1"], r"no effect with loss\.type=ipo"),
        (["loss.type=[ipo, sft]", "loss.label_smoothing=0.1"], r"loss\.type=\[ipo, sft\]"),
        (["loss.type=robust", "loss.label_smoothing=0.5"], r"must be in \[0, 0\.5\)"),
        (["loss.type=simpo", "loss.reference_free=true"], r"reference_free has no effect"),
        (["loss.beta=0"], r"loss\.beta must be positive"),
    ],
)
def test_bad_loss_settings_are_one_line_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        loss_config(*overrides)


def test_label_smoothing_is_accepted_when_one_part_uses_it() -> None:
    cfg = loss_config("loss.type=[ipo, robust]", "loss.label_smoothing=0.1")
    assert combined_loss(cfg.type, cfg.weights).uses_label_smoothing


def test_help_lists_the_loss_keys() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["dpo"].format_help()
    for key in ("loss.type", "loss.weights", "loss.simpo_gamma", "loss.discopop_tau"):
        assert key in help_text


def test_combination_is_the_weighted_sum_with_the_first_parts_rewards() -> None:
    policy, reference = random_logps()
    params = LossParams(beta=0.2, label_smoothing=0.1)
    combined = combined_loss(["sigmoid", "sft"], [1.0, 0.5]).fn(policy, reference, params)
    dpo = PAIRED_LOSSES["sigmoid"].fn(policy, reference, params)
    nll = -policy.chosen / policy.chosen_tokens
    torch.testing.assert_close(combined.losses, dpo.losses + 0.5 * nll)
    assert torch.equal(combined.chosen_rewards, dpo.chosen_rewards)
    assert torch.equal(combined.rejected_rewards, dpo.rejected_rewards)


def test_combination_flags_are_those_of_any_part() -> None:
    assert not combined_loss(["simpo", "sft"]).needs_reference
    assert combined_loss(["simpo", "nca_pair"]).needs_reference
    assert not combined_loss(["ipo", "sft"]).uses_label_smoothing
    assert combined_loss(["ipo", "exo_pair"]).uses_label_smoothing
    assert combined_loss(["ipo"]) is PAIRED_LOSSES["ipo"]
    with pytest.raises(ValueError, match="did you mean 'hinge'"):
        combined_loss(["hinje"])
    with pytest.raises(ValueError, match="2 weights for 1 losses"):
        combined_loss(["ipo"], [1.0, 2.0])


def test_sft_weight_is_the_sft_component() -> None:
    """``loss.sft_weight=α`` (RPO) and ``loss.type=[sigmoid, sft]`` with weights [1, α] agree."""
    tokenizer = build_tokenizer()
    policy = build_model(tokenizer, seed=3).train()
    pairs, _ = encode_pairs(load_pairs(str(SAMPLE_TRAIN))[0][:6], tokenizer, Budget(48, 24))
    reference = FrozenCopy(policy, torch.device("cpu"))
    rpo = PairedObjective(LossSettings(sft_weight=0.5), reference, tokenizer.pad_token_id)
    combined = PairedObjective(
        LossSettings(type=["sigmoid", "sft"], weights=[1.0, 0.5]), reference, tokenizer.pad_token_id
    )
    batch = rpo.collate(pairs)
    torch.testing.assert_close(rpo.compute(policy, batch)[0], combined.compute(policy, batch)[0])


@pytest.fixture(scope="module")
def few_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = SAMPLE_TRAIN.read_text().splitlines()[:8]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize(
    "names", [[name] for name in LOSS_NAMES] + [["sigmoid", "sft"]], ids="+".join
)
def test_every_loss_trains_two_finite_steps(
    names: list[str], few_pairs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    references: list[str] = []
    for provider in ("FrozenCopy", "AdapterDisabled", "ReferencePass"):
        built = getattr(commands, provider)

        def record(*args, _built=built, _name=provider, **kwargs):
            references.append(_name)
            return _built(*args, **kwargs)

        monkeypatch.setattr(commands, provider, record)
    overrides = [
        f"data.train={few_pairs}",
        "data.max_length=32",
        "data.max_prompt_length=16",
        "train.batch_size=4",
        "train.max_steps=2",
        "train.learning_rate=1e-3",
        "train.log_every=1",
        "train.save_every=0",
        f"loss.type=[{', '.join(names)}]",
        f"output_dir={tmp_path / 'out'}",
    ]
    run_dpo(load_config(DPOConfig, None, overrides))
    steps = read_metrics(tmp_path / "out")
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert bool(references) == any(name not in REFERENCE_FREE for name in names), references
