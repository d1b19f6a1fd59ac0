"""The loop's seams: a batch source that keeps its own position, and an objective that trains a
module of its own besides the model; both are checkpointed and resumed exactly."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from preftune.data.collate import collate_demos
from preftune.data.encode import EncodedDemo
from preftune.models.tiny import build_model, build_tokenizer
from preftune.objectives.base import Batch, Metrics, mean_metric
from preftune.objectives.sft import SFTObjective
from preftune.train.checkpoint import newest_intact
from preftune.train.loop import Run, train
from preftune.train.settings import TrainSettings

TOKENIZER = build_tokenizer()


class DrawnBatches:
    """A source whose batches depend on its own position (how many it has drawn), as a source
    of fresh rollouts does: the position must be saved and restored for a resume to be exact."""

    micro_batch_size = 4
    steps_per_epoch = None

    def __init__(self) -> None:
        self.drawn = 0

    def batches(self, step: int) -> list[Batch]:
        generator = torch.Generator().manual_seed(1000 + self.drawn)
        self.drawn += 1
        examples = [
            EncodedDemo(
                torch.randint(3, 250, (5,), generator=generator).tolist(),
                torch.randint(3, 250, (6,), generator=generator).tolist(),
            )
            for _ in range(self.micro_batch_size)
        ]
        return [collate_demos(examples, TOKENIZER.pad_token_id)]

    def blame(self, step: int, micro_batches: list[int]) -> str:
        return f"draw {self.drawn}"

    def describe(self) -> str:
        return "4 drawn examples"

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drawn = state["drawn"]


class WithValueHead(SFTObjective):
    """SFT plus a value head of its own, trained to predict 1 from the mean input embedding."""

    name = "sft"

    def __init__(self, pad_id: int, width: int) -> None:
        super().__init__(pad_id)
        torch.manual_seed(7)
        self.modules = {"value": torch.nn.Linear(width, 1)}

    def compute(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        loss, metrics = super().compute(model, batch)
        embeddings = model.get_input_embeddings()(batch["input_ids"]).mean(dim=1).detach()
        error = (self.modules["value"](embeddings).squeeze(-1) - 1.0) ** 2
        return loss + error.sum(), metrics | {"value_error": mean_metric(error)}


def run(out: Path, steps: int = 6) -> WithValueHead:
    model = build_model(TOKENIZER, seed=3)
    objective = WithValueHead(TOKENIZER.pad_token_id, model.config.hidden_size)
    cfg = TrainSettings(
        max_steps=steps,
        batch_size=4,
        learning_rate=1e-2,
        save_every=2,
        keep_checkpoints=0,
        log_every=1,
        report_to=["none"],
    )
    resume = newest_intact(out) if out.exists() else None
    identity = {"config": {"max_steps": steps}, "data": "drawn"}
    train(
        Run(
            accelerator=Accelerator(cpu=True),
            model=model,
            objective=objective,
            source=DrawnBatches(),
            eval_examples=None,
            config=cfg,
            output_dir=out,
            identity=identity,
            resume=resume,
        )
    )
    return objective


def test_an_objectives_own_module_trains_and_is_checkpointed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    objective = run(out)
    head = objective.modules["value"]
    saved = load_file(out / "checkpoints" / "step-00000006" / "value.safetensors")
    assert torch.equal(saved["weight"], head.weight.detach())
    first = load_file(out / "checkpoints" / "step-00000002" / "value.safetensors")
    assert not torch.equal(first["weight"], saved["weight"])


@pytest.mark.parametrize("resume_from", [2, 4])
def test_resume_restores_the_source_position_and_every_module(
    tmp_path: Path, resume_from: int
) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run(whole)
    run(resumed)
    for step in range(resume_from + 2, 7, 2):
        shutil.rmtree(resumed / "checkpoints" / f"step-{step:08d}")
    objective = run(resumed)
    newest = whole / "checkpoints" / "step-00000006"
    for name in ("model", "value"):
        expected = load_file(newest / f"{name}.safetensors")
        actual = load_file(resumed / "checkpoints" / "step-00000006" / f"{name}.safetensors")
        assert all(torch.equal(expected[k], actual[k]) for k in expected), name
    assert torch.equal(
        objective.modules["value"].weight.detach(),
        load_file(newest / "value.safetensors")["weight"],
    )
