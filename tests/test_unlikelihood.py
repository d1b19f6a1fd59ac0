"""Unlikelihood: the loss against explicit loops, its stable log(1 − p), its gradient, the
config, and one run of the command."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from preftune.commands.unlikelihood import UnlikelihoodConfig, run_unlikelihood
from preftune.config import load_config
from preftune.data.encode import EncodedPair
from preftune.errors import ConfigError
from preftune.objectives.settings import UnlikelihoodSettings
from preftune.objectives.unlikelihood import UnlikelihoodObjective, log1mexp
from tests.architectures import TOKENIZER, build
from tests.conftest import SAMPLE_TRAIN, read_metrics

PAD = TOKENIZER.pad_token_id

# Pairs of different prompt and response lengths, so that rows are padded differently.
PAIRS = [
    EncodedPair([5, 9, 14, 3], [20, 21, 22], [30, 31]),
    EncodedPair([7, 8], [40, 41, 42, 43, 44], [50]),
    EncodedPair([11, 12, 13, 15, 16, 17], [60], [61, 62, 63, 64]),
]


def token_logps(model: torch.nn.Module, prompt: list[int], response: list[int]) -> list[float]:
    """log π(y_t | x, y_<t) for each response token, from a forward of the sequence alone."""
    ids = prompt + response
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return [
        torch.log_softmax(logits[position - 1], -1)[ids[position]].item()
        for position in range(len(prompt), len(ids))
    ]


def pair_loss(chosen: list[float], rejected: list[float], alpha: float) -> float:
    """−Σ log π(y_w,t) − α Σ log(1 − π(y_l,t)), one token at a time."""
    return -sum(chosen) + alpha * -sum(math.log(1 - math.exp(lp)) for lp in rejected)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build("llama", seed=3).eval()


@pytest.fixture(scope="module")
def explicit(model) -> list[tuple[list[float], list[float]]]:
    """Each pair's per-token log-probs of its chosen and its rejected response."""
    return [
        (
            token_logps(model, pair.prompt_ids, pair.chosen_ids),
            token_logps(model, pair.prompt_ids, pair.rejected_ids),
        )
        for pair in PAIRS
    ]


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_loss_matches_a_loop_over_each_sequence_alone(model, explicit, alpha: float) -> None:
    objective = UnlikelihoodObjective(UnlikelihoodSettings(alpha=alpha), PAD)
    batch = objective.collate(PAIRS)
    assert objective.weight(batch) == len(PAIRS)
    loss_sum, metrics = objective.compute(model, batch)
    losses = [pair_loss(chosen, rejected, alpha) for chosen, rejected in explicit]
    assert loss_sum.requires_grad
    assert loss_sum.item() == pytest.approx(sum(losses), rel=1e-5)
    assert tuple(metrics["loss"]) == (pytest.approx(sum(losses), rel=1e-5), len(PAIRS))
    chosen_sum = sum(sum(chosen) for chosen, _ in explicit)
    rejected_sum = sum(sum(rejected) for _, rejected in explicit)
    assert metrics["logps/chosen"][0].item() == pytest.approx(chosen_sum, rel=1e-5)
    assert metrics["logps/rejected"][0].item() == pytest.approx(rejected_sum, rel=1e-5)
    unlikelihood = sum(pair_loss([], rejected, 1.0) for _, rejected in explicit)
    assert metrics["unlikelihood"][0].item() == pytest.approx(unlikelihood, rel=1e-5)
    assert metrics["unlikelihood"][1].item() == len(PAIRS)


def test_alpha_zero_is_the_chosen_nll_only(model, explicit) -> None:
    objective = UnlikelihoodObjective(UnlikelihoodSettings(alpha=0.0), PAD)
    loss_sum, metrics = objective.compute(model, objective.collate(PAIRS))
    nll = -sum(sum(chosen) for chosen, _ in explicit)
    assert loss_sum.item() == pytest.approx(nll, rel=1e-5)
    assert metrics["unlikelihood"][0].item() > 0  # still reported, only not weighted


def test_log1mexp_is_finite_and_accurate_up_to_probability_one() -> None:
    logps = torch.tensor([-30.0, -5.0, -math.log(2), -1e-3, -1e-7, -1e-20, 0.0])
    logps.requires_grad_(True)
    values = log1mexp(logps)
    (grad,) = torch.autograd.grad(values.sum(), logps)
    assert bool(torch.isfinite(values).all()) and bool(torch.isfinite(grad).all())
    for lp, value in zip([-30.0, -5.0, -math.log(2), -1e-3], values.tolist(), strict=False):
        assert value == pytest.approx(math.log(-math.expm1(lp)), rel=1e-5, abs=1e-12)
    # At probability ≈ 1, the clamp at log p = −1e-6 bounds the penalty: −log(1 − e^−1e-6).
    bound = -math.log(-math.expm1(-1e-6))
    assert [-v for v in values[-3:].tolist()] == pytest.approx([bound] * 3, rel=1e-3)
    # The naive form is not finite there.
    assert torch.log1p(-torch.exp(torch.tensor(0.0))).item() == -math.inf


CERTAIN = 30


class CertainModel(torch.nn.Module):
    """Logits that give token ``CERTAIN`` probability 1 (to float32 precision) at every
    position, scaled by a trainable weight."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, len(TOKENIZER))
        logits[..., CERTAIN] = 1e4
        return SimpleNamespace(logits=logits * self.scale)


def test_loss_is_finite_when_a_rejected_token_is_certain() -> None:
    model = CertainModel()
    pairs = [EncodedPair([5, 6], [20, 21], [CERTAIN] * 3)]
    objective = UnlikelihoodObjective(UnlikelihoodSettings(), PAD)
    batch = objective.collate(pairs)
    logits = model(batch["input_ids"]).logits
    assert torch.log_softmax(logits, -1)[..., CERTAIN].max().item() == 0.0
    loss_sum, metrics = objective.compute(model, batch)
    loss_sum.backward()
    assert math.isfinite(loss_sum.item()) and math.isfinite(metrics["unlikelihood"][0].item())
    assert model.scale.grad is not None and math.isfinite(model.scale.grad.item())
    # Each certain token costs the clamped −log(1 − e^−1e-6); the chosen tokens cost ≈ 1e4.
    bound = -math.log(-math.expm1(-1e-6))
    assert metrics["unlikelihood"][0].item() == pytest.approx(3 * bound, rel=1e-3)


def test_an_unlikelihood_step_lowers_the_rejected_tokens() -> None:
    model = build("llama", seed=5).train()
    # The unlikelihood term alone: chosen responses empty, so only the rejected tokens count.
    pairs = [EncodedPair(p.prompt_ids, [], p.rejected_ids) for p in PAIRS]
    objective = UnlikelihoodObjective(UnlikelihoodSettings(alpha=1.0), PAD)

    def rejected_logps() -> float:
        return sum(sum(token_logps(model, p.prompt_ids, p.rejected_ids)) for p in pairs)

    before = rejected_logps()
    loss_sum, _ = objective.compute(model, objective.collate(pairs))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_sum.backward()
    optimizer.step()
    after = rejected_logps()
    assert after < before - 1e-3


def test_config_keys_and_their_checks() -> None:
    assert load_config(UnlikelihoodConfig, None, []).unlikelihood.alpha == 1.0
    cfg = load_config(UnlikelihoodConfig, None, ["unlikelihood.alpha=0.25"])
    assert cfg.unlikelihood.alpha == 0.25
    with pytest.raises(ConfigError, match=r"unlikelihood\.alpha"):
        load_config(UnlikelihoodConfig, None, ["unlikelihood.alpha=-1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'loss\.beta'"):
        load_config(UnlikelihoodConfig, None, ["loss.beta=0.1"])


def test_command_trains_and_logs_finite_metrics(tmp_path: Path) -> None:
    overrides = [
        f"data.train={SAMPLE_TRAIN}",
        "data.max_length=48",
        "data.max_prompt_length=24",
        "train.batch_size=8",
        "train.max_steps=3",
        "train.log_every=1",
        "train.report_to=none",
        f"output_dir={tmp_path / 'out'}",
    ]
    run_unlikelihood(load_config(UnlikelihoodConfig, None, overrides))
    assert (tmp_path / "out" / "metrics.jsonl").exists()
    train = [r for r in read_metrics(tmp_path / "out") if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for record in train:
        keys = ("loss", "logps/chosen", "logps/rejected", "unlikelihood")
        assert all(math.isfinite(record[key]) for key in keys), record
        assert record["loss"] == pytest.approx(record["unlikelihood"] - record["logps/chosen"])
