"""The reference pass scores the pairs a run draws, and no others: a 1-step run scores one
batch; a longer run with the same key reads those back and adds the ones it lacks, with the
values a pass over every pair gives."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from preftune.commands.common import model_spec
from preftune.commands.dpo import DPOConfig, run_dpo
from preftune.config import load_config
from preftune.data.encode import Budget, EncodedPair, encode_pairs
from preftune.data.readers import load_pairs
from preftune.losses.settings import LossSettings
from preftune.models.load import ModelSpec, load_model, load_tokenizer
from preftune.models.refcache import ReferencePass, WithReference, model_digest
from preftune.objectives.dpo import PairedObjective
from preftune.objectives.settings import SpeedSettings
from preftune.objectives.speed import PairScoring
from preftune.train.settings import TrainSettings
from preftune.train.sources import StepSampler, examples_drawn
from tests.conftest import SAMPLE_TRAIN


@pytest.mark.parametrize(
    ("examples", "batch_size", "max_steps", "epochs"),
    [(20, 4, 1, 1), (20, 4, 0, 1), (22, 4, 0, 2), (22, 4, 7, 1), (10, 3, 0, 5), (9, 9, 0, 3)],
)
def test_the_examples_drawn_are_those_the_steps_take(
    examples: int, batch_size: int, max_steps: int, epochs: int
) -> None:
    cfg = TrainSettings(batch_size=batch_size, max_steps=max_steps, epochs=epochs)
    sampler = StepSampler(examples, batch_size, seed=3)
    steps = max_steps or epochs * sampler.steps_per_epoch
    taken = sorted({i for step in range(1, steps + 1) for i in sampler.global_batch(step)})
    assert examples_drawn(examples, cfg, seed=3) == taken


def test_an_unscored_pair_is_never_handed_out() -> None:
    pairs = [EncodedPair([1, 2], [3], [4]), EncodedPair([1], [5], [6])]
    attached = WithReference(pairs, torch.tensor([[-1.0, -2.0], [math.nan, math.nan]]))
    assert attached[0].reference_logps == (-1.0, -2.0)
    with pytest.raises(RuntimeError, match="pair 1 was drawn, but its reference was never"):
        attached[1]


def run(tmp_path: Path, name: str, steps: int) -> list[str]:
    return [
        f"data.train={SAMPLE_TRAIN}",
        "data.max_length=48",
        "data.max_prompt_length=24",
        "train.batch_size=8",
        f"train.max_steps={steps}",
        f"speed.cache_dir={tmp_path / 'cache'}",
        f"output_dir={tmp_path / name}",
    ]


def test_a_run_scores_the_pairs_it_draws_and_a_longer_one_adds_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config(DPOConfig, None, run(tmp_path, "one", 1))
    run_dpo(cfg)
    (path,) = (tmp_path / "cache" / "reference-logps").iterdir()
    first = load_file(path)["logps"]
    scored = (~first[:, 0].isnan()).nonzero()[:, 0].tolist()
    train = TrainSettings(batch_size=8, max_steps=1)
    assert scored == examples_drawn(len(first), train, cfg.seed) and len(scored) == 8
    assert not first[scored].isnan().any() and len(first) > 8

    capsys.readouterr()
    run_dpo(load_config(DPOConfig, None, run(tmp_path, "six", 6)))
    assert "reference log-probs of 8 pairs from the cache" in capsys.readouterr().out
    (again,) = (tmp_path / "cache" / "reference-logps").iterdir()
    second = load_file(again)["logps"]
    drawn = examples_drawn(len(second), TrainSettings(batch_size=8, max_steps=6), cfg.seed)
    assert (~second[:, 0].isnan()).nonzero()[:, 0].tolist() == drawn
    assert set(scored) < set(drawn)
    assert torch.equal(second[scored], first[scored])  # read back, not scored again

    # The values are those of one pass over every pair before any update.
    spec = model_spec(cfg)
    tokenizer = load_tokenizer(spec)
    pairs, _ = encode_pairs(load_pairs(str(SAMPLE_TRAIN))[0], tokenizer, Budget(48, 24))
    scoring = PairScoring.from_config(SpeedSettings())
    objective = PairedObjective(LossSettings(), None, tokenizer.pad_token_id, scoring)
    model = load_model(spec, tokenizer)
    reference = ReferencePass(model, objective.score, objective.collate, 16, Accelerator(cpu=True))
    expected = reference.compute(pairs, "train")
    torch.testing.assert_close(second[drawn], expected[drawn], rtol=1e-5, atol=1e-5)


def test_process_shares_of_a_subset_assemble_it() -> None:
    """Scored over any subset, in any batch size, each pair gets its own values."""
    spec = ModelSpec("tiny")
    tokenizer = load_tokenizer(spec)
    pairs, _ = encode_pairs(load_pairs(str(SAMPLE_TRAIN))[0][:24], tokenizer, Budget(48, 24))
    scoring = PairScoring.from_config(SpeedSettings())
    objective = PairedObjective(LossSettings(), None, tokenizer.pad_token_id, scoring)
    model = load_model(spec, tokenizer)
    acc = Accelerator(cpu=True)
    whole = ReferencePass(model, objective.score, objective.collate, 24, acc).compute(pairs, "t")
    for batch_size, subset in itertools.product((1, 5), ([3, 17, 4], list(range(0, 24, 2)))):
        part = ReferencePass(model, objective.score, objective.collate, batch_size, acc)
        values = part.compute(pairs, "t", subset)
        torch.testing.assert_close(values, whole[subset], rtol=1e-5, atol=1e-5)


def test_the_weight_digest_sees_every_bit_of_every_weight() -> None:
    model = load_model(ModelSpec("tiny"), load_tokenizer(ModelSpec("tiny")))
    before = model_digest(model)
    assert model_digest(model) == before
    for name, param in list(model.named_parameters())[:: max(1, len(model.state_dict()) // 5)]:
        bits = param.data.view(-1).view(torch.int32)
        bits[-1] ^= 1  # the lowest bit of the last element
        assert model_digest(model) != before, name
        bits[-1] ^= 1
        assert model_digest(model) == before, name


@pytest.mark.parametrize("reuse", [True, False])
def test_a_reference_that_scores_nan_is_one_line_naming_the_row(
    tmp_path: Path, reuse: bool
) -> None:
    """NaN marks a pair not yet scored: a reference whose log-prob is NaN is refused when it is
    computed, naming the pair's row, not taken for unscored (and computed again each run)."""
    from preftune.errors import TrainingError

    pairs = [EncodedPair([1, 2], [3], [4], row=5), EncodedPair([1], [5], [6], row=9)]

    def score(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, None]:
        rows = batch["rows"].tolist()
        chosen = torch.tensor([math.nan if row == 9 else -1.0 for row in rows])
        return torch.cat([chosen, torch.full_like(chosen, -2.0)]), None

    def collate(chunk: list[EncodedPair]) -> dict:
        return {"rows": torch.tensor([pair.row for pair in chunk])}

    reference = ReferencePass(torch.nn.Linear(1, 1), score, collate, 2, Accelerator(), reuse)
    with pytest.raises(TrainingError, match=r"data.train row 9: the reference model's log-prob"):
        reference.attach(pairs, tmp_path / "cache.safetensors", "train")
    assert not (tmp_path / "cache.safetensors").exists()
