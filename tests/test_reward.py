"""Reward models: the Bradley–Terry and Plackett–Luce losses, reading rewards at the last real
token, margins, and `preftune rm` then `preftune score` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from preftune.data.collate import collate_comparisons
from preftune.data.encode import Budget, encode_comparisons
from preftune.data.readers import load_preferences
from preftune.errors import DataError
from preftune.losses.reward import bradley_terry_loss, plackett_luce_loss
from preftune.models.reward import RewardScorer, last_token_values, sequence_rewards
from preftune.models.tiny import build_model, build_reward_model, build_tokenizer
from preftune.objectives.reward import RewardObjective
from tests.conftest import SAMPLE_EVAL, SAMPLE_SFT, SAMPLE_TRAIN, read_metrics, run_cli, write_jsonl
from tests.test_cli import assert_one_line_error
from tests.test_ranked import SAMPLE_RANKED


def bt_by_hand(chosen: float, rejected: float, margin: float = 0.0) -> float:
    return math.log(1.0 + math.exp(-(chosen - rejected - margin)))


def pl_by_hand(rewards: list[float], places: list[int]) -> float:
    """The negative log-likelihood of picking responses place by place; each response at a
    place is picked from everything at that place or below."""
    loss = 0.0
    for place in sorted(set(places)):
        left = [r for r, p in zip(rewards, places, strict=True) if p >= place]
        for reward, own in zip(rewards, places, strict=True):
            if own == place:
                loss -= reward - math.log(sum(math.exp(r) for r in left))
    return loss


def test_bradley_terry_matches_the_formula_with_and_without_margin() -> None:
    generator = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randn(2, 16, generator=generator, dtype=torch.float64) * 3
    margin = torch.rand(16, generator=generator, dtype=torch.float64) * 2
    plain = bradley_terry_loss(chosen, rejected)
    shifted = bradley_terry_loss(chosen, rejected, margin)
    for i in range(16):
        c, r, m = chosen[i].item(), rejected[i].item(), margin[i].item()
        assert plain[i].item() == pytest.approx(bt_by_hand(c, r), rel=1e-12)
        assert shifted[i].item() == pytest.approx(bt_by_hand(c, r, m), rel=1e-12)
    # A margin asks for a wider gap: same loss as a chosen reward lowered by it, and larger.
    assert torch.allclose(shifted, bradley_terry_loss(chosen - margin, rejected))
    assert (shifted > plain).all()


def test_plackett_luce_matches_picking_one_by_one() -> None:
    generator = torch.Generator().manual_seed(1)
    places = torch.tensor(
        [[0, 1, 2, 3], [0, 1, 2, -1], [0, 1, 1, 2], [0, 0, 1, -1], [0, 1, -1, -1]]
    )
    rewards = torch.randn(5, 4, generator=generator, dtype=torch.float64) * 2
    losses = plackett_luce_loss(rewards, places)
    for row in range(5):
        present = [k for k in range(4) if places[row, k] >= 0]
        expected = pl_by_hand(
            [rewards[row, k].item() for k in present], [places[row, k].item() for k in present]
        )
        assert losses[row].item() == pytest.approx(expected, rel=1e-12)


def test_plackett_luce_of_two_responses_is_bradley_terry() -> None:
    rewards = torch.randn(32, 2, dtype=torch.float64)
    places = torch.tensor([[0, 1]]).expand(32, 2)
    assert torch.allclose(
        plackett_luce_loss(rewards, places), bradley_terry_loss(rewards[:, 0], rewards[:, 1])
    )


def test_plackett_luce_gradient_raises_better_and_lowers_worse() -> None:
    rewards = torch.zeros(1, 3, requires_grad=True)
    plackett_luce_loss(rewards, torch.tensor([[0, 1, 2]])).backward()
    gradient = rewards.grad[0]
    assert gradient[0] < 0 < gradient[2]


def test_tiny_reward_model_is_the_tiny_decoder_under_a_score_head() -> None:
    tokenizer = build_tokenizer()
    causal, reward = build_model(tokenizer, seed=5), build_reward_model(tokenizer, seed=5)
    decoder = reward.model.state_dict()
    assert all(torch.equal(decoder[k], v) for k, v in causal.model.state_dict().items())
    assert reward.config.num_labels == 1 and reward.config.pad_token_id == tokenizer.pad_token_id
    assert reward.score.out_features == 1


def test_last_token_values_with_left_and_right_padding() -> None:
    values = torch.arange(12, dtype=torch.float32).view(3, 4)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_values(values, right).tolist() == [1.0, 7.0, 8.0]
    assert last_token_values(values, left).tolist() == [3.0, 7.0, 11.0]


def test_reward_is_the_same_alone_right_padded_and_left_padded() -> None:
    tokenizer = build_tokenizer()
    model = build_reward_model(tokenizer, seed=0).eval()
    pad = tokenizer.pad_token_id
    short, long = [1, 40, 41, 42], [1, 50, 51, 52, 53, 54, 55]
    with torch.no_grad():
        alone = [
            sequence_rewards(
                model,
                {
                    "input_ids": torch.tensor([s]),
                    "attention_mask": torch.ones(1, len(s), dtype=torch.long),
                },
            )
            for s in (short, long)
        ]
        right = sequence_rewards(
            model,
            {
                "input_ids": torch.tensor([short + [pad] * 3, long]),
                "attention_mask": torch.tensor([[1] * 4 + [0] * 3, [1] * 7]),
            },
        )
        left = sequence_rewards(
            model,
            {
                "input_ids": torch.tensor([[pad] * 3 + short, long]),
                "attention_mask": torch.tensor([[0] * 3 + [1] * 4, [1] * 7]),
            },
        )
    expected = torch.cat(alone)
    assert torch.allclose(right, expected, atol=1e-5)
    assert torch.allclose(left, expected, atol=1e-5)
    # Not the score of some other token: the last real token of each row.
    assert not torch.allclose(expected[0], expected[1])


def test_objective_loss_is_bradley_terry_of_the_rewards_with_margins(tmp_path: Path) -> None:
    rows = [
        {"prompt": "1+1=", "chosen": " 2", "rejected": " 3", "margin": 1.5},
        {"prompt": "2+2=", "chosen": " 4", "rejected": " 5"},
    ]
    spec = str(write_jsonl(tmp_path / "m.jsonl", rows))
    tokenizer = build_tokenizer()
    comparisons, _ = load_preferences(spec)
    assert [c.margin for c in comparisons] == [1.5, 0.0]
    examples, _ = encode_comparisons(comparisons, tokenizer, Budget(64, 32))
    model = build_reward_model(tokenizer, seed=0)
    objective = RewardObjective(tokenizer.pad_token_id)
    batch = objective.collate(examples)
    loss_sum, metrics = objective.compute(model, batch)
    with torch.no_grad():
        rewards = sequence_rewards(model, batch).tolist()  # chosen, rejected, chosen, rejected
    expected = bt_by_hand(rewards[0], rewards[1], 1.5) + bt_by_hand(rewards[2], rewards[3])
    assert loss_sum.item() == pytest.approx(expected, rel=1e-5)
    assert objective.weight(batch) == 2
    gaps = [rewards[0] - rewards[1], rewards[2] - rewards[3]]
    assert metrics["rewards/margins"][0].item() == pytest.approx(sum(gaps), rel=1e-5)
    assert metrics["rewards/accuracies"][0].item() == sum(g > 0 for g in gaps)


def test_objective_uses_plackett_luce_for_rankings() -> None:
    tokenizer = build_tokenizer()
    comparisons, _ = load_preferences(str(SAMPLE_RANKED))
    examples, _ = encode_comparisons(comparisons[:4], tokenizer, Budget(64, 32))
    model = build_reward_model(tokenizer, seed=0)
    objective = RewardObjective(tokenizer.pad_token_id)
    batch = objective.collate(examples)
    loss_sum, metrics = objective.compute(model, batch)
    with torch.no_grad():
        rewards = sequence_rewards(model, batch).tolist()
    expected, start = 0.0, 0
    for example in examples:
        places = [place for place, tier in enumerate(example.ranking) for _ in tier]
        expected += pl_by_hand(rewards[start : start + len(places)], places)
        start += len(places)
    assert loss_sum.item() == pytest.approx(expected, rel=1e-5)
    # Pairs: 3 for each strict ranking of 3, 5 for the row of 4 with one tie.
    assert metrics["rewards/accuracies"][1].item() == 3 * 3 + 5


def test_collate_puts_each_examples_responses_in_ranking_order(tmp_path: Path) -> None:
    row = {"prompt": "q", "responses": ["a", "b", "c"], "scores": [0, 2, 0]}
    comparisons, _ = load_preferences(str(write_jsonl(tmp_path / "r.jsonl", [row])))
    tokenizer = build_tokenizer()
    examples, _ = encode_comparisons(comparisons * 2, tokenizer, Budget(64, 32))
    examples[1].ranking = ((0,), (1,))
    examples[1].response_ids = examples[1].response_ids[:2]
    batch = collate_comparisons(examples, tokenizer.pad_token_id)
    assert batch["slots"].tolist() == [[0, 1, 2], [3, 4, 0]]
    assert batch["places"].tolist() == [[0, 1, 1], [0, 1, -1]]
    first = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert tokenizer.decode(first).endswith("qb<|end|>")


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "1"}, "expected a number"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": float("nan")}, "finite"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": 10**400}, "too large for a"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": -1e39}, "(a float32)"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": False}, "got bool"),
        ({"prompt": "q", "responses": ["a", "b"], "ranking": [1, 0], "margin": 1}, "only pairs"),
    ],
)
def test_bad_margin_is_one_line(tmp_path: Path, row: dict, expected: str) -> None:
    spec = tmp_path / "m.jsonl"
    spec.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError) as caught:
        load_preferences(str(spec))
    assert str(caught.value).startswith(f"{spec}: row 1: field 'margin': ")
    assert expected in str(caught.value)


@pytest.mark.slow
def test_rm_then_score_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "rm"
    trained = run_cli(
        "rm",
        f"data.train={SAMPLE_TRAIN}",
        f"data.eval={SAMPLE_EVAL}",
        "data.max_length=48",
        "data.max_prompt_length=47",
        "train.batch_size=8",
        "train.max_steps=16",
        "train.learning_rate=1e-3",
        "train.log_every=1",
        f"output_dir={out}",
    )
    assert trained.returncode == 0, trained.stderr
    metrics = read_metrics(out)
    steps = [record for record in metrics if "loss" in record]
    assert {"loss", "rewards/accuracies", "rewards/margins"} <= set(steps[0])
    assert steps[0]["loss"] > steps[-1]["loss"]
    assert metrics[-1]["eval/rewards/accuracies"] > 0.9
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1

    scored = tmp_path / "scored.jsonl"
    result = run_cli(
        "score", f"model.path={out}", f"score.input={SAMPLE_EVAL}", f"score.output={scored}"
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    source = [json.loads(line) for line in SAMPLE_EVAL.read_text().splitlines()]
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows] == source
    wins = sum(r["score_chosen"] > r["score_rejected"] for r in rows)
    assert f"accuracy {wins / len(rows):.4f} ({wins} of 64 pairs)" in result.stdout
    # The scores are those the reusable scorer gives the same texts.
    scorer = RewardScorer(str(out))
    again = scorer.score([r["prompt"] for r in rows[:4]], [r["chosen"] for r in rows[:4]])
    assert again == pytest.approx([r["score_chosen"] for r in rows[:4]], abs=1e-5)

    demos = tmp_path / "demos.jsonl"
    result = run_cli(
        "score", f"model.path={out}", f"score.input={SAMPLE_SFT}", f"score.output={demos}"
    )
    assert result.returncode == 0, result.stderr
    assert all("score" in json.loads(line) for line in demos.read_text().splitlines())
    assert "accuracy" not in result.stdout


@pytest.mark.slow
def test_rm_on_ranked_rows_runs_plackett_luce(tmp_path: Path) -> None:
    result = run_cli(
        "rm",
        f"data.train={SAMPLE_RANKED}",
        "train.batch_size=8",
        "train.max_steps=2",
        "train.log_every=1",
        f"output_dir={tmp_path / 'out'}",
    )
    assert result.returncode == 0, result.stderr
    assert "layout ranked; 48 rows" in result.stdout
    first = read_metrics(tmp_path / "out")[0]
    assert math.isfinite(first["loss"]) and first["loss"] > 1.0


def test_score_without_a_model_is_one_line(tmp_path: Path) -> None:
    result = run_cli("score", f"score.input={SAMPLE_EVAL}", f"score.output={tmp_path / 's'}")
    assert_one_line_error(result, "model.path is required")
