"""Judges: both-order averaging makes P(a ≻ b) = 1 − P(b ≻ a) exactly; an llm judge's label
probabilities are those of its next-token logits; scoring judges are Bradley–Terry in their
scores; pairs are formed from a judged group as the judge says; bad specs are one line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from preftune.errors import ConfigError, PreftuneError
from preftune.models.load import ModelSpec, load_model, load_tokenizer
from preftune.train.judges import (
    Group,
    Judge,
    JudgeSettings,
    LanguageModelJudge,
    bradley_terry,
    label_context,
    load_judge,
)
from preftune.train.online import form_pairs

PROMPTS = ["What is 2 plus 2?", "Say something kind.", "Name a colour."]
A = ["4", "You are doing great.", "blue"]
B = ["five, I think", "No.", "the sky at noon is a colour"]


@pytest.fixture(scope="module")
def llm() -> Judge:
    return load_judge(JudgeSettings(spec="llm:tiny", batch_size=2))


def test_both_orders_make_the_two_verdicts_complementary(llm: Judge) -> None:
    forward, backward = llm.prefer(PROMPTS, A, B), llm.prefer(PROMPTS, B, A)
    for p, q in zip(forward.probs, backward.probs, strict=True):
        assert 0 < p < 1
        assert p + q == pytest.approx(1, abs=1e-12)
    assert forward.disagree == backward.disagree


def test_label_probabilities_are_those_of_the_next_token_logits() -> None:
    """Each order's P(A) is the two labels' softmax of a plain forward of the rendered text;
    P(A) + P(B) = 1 per order."""
    judge = LanguageModelJudge("tiny", JudgeSettings(batch_size=2), "cpu")
    tokenizer, model = judge.tokenizer, judge.model
    got = judge.label_probability(PROMPTS, A, B)
    for prompt, a, b, p in zip(PROMPTS, A, B, got, strict=True):
        text = judge.template.format(prompt=prompt, a=a, b=b)
        context, (label_a, label_b) = label_context(tokenizer, text)
        with torch.no_grad():
            logits = model(torch.tensor([context])).logits[0, -1]
        pair = torch.softmax(logits[[label_a, label_b]].double(), dim=0)
        assert pair.sum().item() == pytest.approx(1, abs=1e-12)
        assert p == pytest.approx(pair[0].item(), abs=1e-5)


def test_the_label_is_the_first_token_where_a_and_b_differ() -> None:
    tokenizer = load_tokenizer(ModelSpec(path="tiny"))
    context, (a, b) = label_context(tokenizer, "Pick: Response ")
    assert tokenizer.decode([a]) == "A" and tokenizer.decode([b]) == "B"
    assert list(tokenizer("Pick: Response A").input_ids) == [*context, a]


def test_position_bias_is_how_often_the_two_orders_disagree(monkeypatch) -> None:
    """A judge that always answers A prefers whatever is shown first: averaged over both
    orders it ties every pair, and the orders disagree on every one."""
    judge = LanguageModelJudge("tiny", JudgeSettings(), "cpu")
    monkeypatch.setattr(judge, "label_probability", lambda p, a, b: [0.9] * len(p))
    verdicts = judge.compare(PROMPTS, A, B)
    assert verdicts.probs == pytest.approx([0.5] * 3)
    assert verdicts.position_bias == 1.0


def test_scoring_judges_are_bradley_terry_in_their_scores() -> None:
    judge = load_judge(JudgeSettings(spec="function:tests.toy_rewards:lowercase"))
    verdicts = judge.prefer(PROMPTS, A, B)
    for a, b, p in zip(A, B, verdicts.probs, strict=True):
        scores = [sum(c.islower() for c in text) / 4 for text in (a, b)]
        assert p == pytest.approx(1 / (1 + math.exp(scores[1] - scores[0])))
    assert verdicts.position_bias is None
    assert bradley_terry(800.0, 0.0) == 1.0 and bradley_terry(-800.0, 0.0) == 0.0


def test_a_reward_model_judge_scores_as_the_reward_model(tmp_path: Path) -> None:
    from preftune.models.reward import RewardScorer

    tokenizer = load_tokenizer(ModelSpec(path="tiny"))
    load_model(ModelSpec(path="tiny"), tokenizer, reward=True).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    judge = load_judge(JudgeSettings(spec=f"rm:{tmp_path}"))
    rewards = RewardScorer(str(tmp_path)).score(PROMPTS * 2, A + B)
    expected = [bradley_terry(x, y) for x, y in zip(rewards[:3], rewards[3:], strict=True)]
    assert judge.prefer(PROMPTS, A, B).probs == pytest.approx(expected, abs=1e-6)


def test_a_group_is_judged_every_two_and_pairs_follow_the_verdicts(llm: Judge) -> None:
    group = llm.group(PROMPTS[0], ["4", "four", "5", "4"])
    for i in range(4):
        assert group.probs[i][i] == 0.5
        for j in range(4):
            assert group.probs[i][j] + group.probs[j][i] == pytest.approx(1, abs=1e-12)
    # Identical completions tie exactly, for every kind of judge.
    assert group.probs[0][3] == group.probs[3][0] == 0.5
    scored = load_judge(JudgeSettings(spec="function:tests.toy_rewards:lowercase"))
    assert scored.group(PROMPTS[0], ["ab", "c", "ab"]).probs[0][2] == 0.5
    strengths = group.strengths
    best, worst, p = form_pairs(group, "best_worst")[0]
    assert strengths[best] == max(strengths) and strengths[worst] == min(strengths)
    assert p == group.probs[best][worst] > 0.5
    every = form_pairs(group, "all")
    assert all(group.probs[c][r] > 0.5 and p == group.probs[c][r] for c, r, p in every)
    ties = sum(group.probs[i][j] == 0.5 for i in range(4) for j in range(i + 1, 4))
    assert len(every) == 6 - ties


def test_ties_give_no_pair() -> None:
    scores = [1.0, 1.0, 1.0]
    group = Group([[bradley_terry(x, y) for y in scores] for x in scores], scores)
    assert form_pairs(group, "best_worst") == [] and form_pairs(group, "all") == []
    scores = [0.0, 2.0, 2.0]
    group = Group([[bradley_terry(x, y) for y in scores] for x in scores], scores)
    assert form_pairs(group, "best_worst") == [(1, 0, bradley_terry(2, 0))]
    assert {(c, r) for c, r, _ in form_pairs(group, "all")} == {(1, 0), (2, 0)}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (None, "judge.spec is required"),
        ("rmm:runs/rm", "did you mean rm:"),
        ("llm:", "expected rm:DIR"),
        ("function:tests.toy_rewards:lowercas", "did you mean tests.toy_rewards:lowercase?"),
        ("function:nosuch:f", "judge.spec=nosuch:f: cannot import nosuch"),
    ],
)
def test_bad_judges_are_one_line(spec: str | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")) as error:
        load_judge(JudgeSettings(spec=spec))
    assert "\n" not in str(error.value)


def test_a_template_must_name_its_three_parts(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"judge.template lacks \{b\}"):
        load_judge(JudgeSettings(spec="llm:tiny", template="{prompt} {a} which?"))
    path = tmp_path / "template.txt"
    path.write_text("Q: {prompt}\nA) {a}\nB) {b}\nBetter: ")
    judge = load_judge(JudgeSettings(spec="llm:tiny", template=str(path)))
    assert len(judge.prefer(PROMPTS[:1], A[:1], B[:1]).probs) == 1


def test_a_template_after_which_a_and_b_look_alike_is_refused() -> None:
    from types import SimpleNamespace

    def blind(text: str) -> SimpleNamespace:  # every text tokenizes alike
        return SimpleNamespace(input_ids=[1, 2])

    with pytest.raises(PreftuneError, match="cannot tell the labels A and B apart"):
        label_context(blind, "x")
