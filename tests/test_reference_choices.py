"""The reference of the paired losses: a model of its own, or a LoRA adapter on the policy's
base; what cannot be one is refused in one line. TR-DPO's moving reference:
tests/test_reference_sync.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from preftune.commands.configs import DPOConfig
from preftune.commands.dpo import run_dpo
from preftune.config import load_config
from preftune.data.collate import collate_pairs
from preftune.data.encode import Budget, encode_pairs
from preftune.data.readers import load_pairs
from preftune.errors import ConfigError
from preftune.models.load import ModelSpec, load_model
from preftune.models.logps import sequence_logps
from preftune.models.lora import apply_lora
from preftune.models.reference import (
    REFERENCE_ADAPTER,
)
from preftune.models.settings import LoraSettings
from preftune.models.tiny import build_model, build_tokenizer
from tests.conftest import SAMPLE_TRAIN, read_metrics

TOKENIZER = build_tokenizer()
SIZES = {"hidden_size": 32, "num_layers": 1, "num_heads": 4}
BETA = 0.1  # loss.beta's default
LN2 = math.log(2)
SYNC = ["reference.sync_every=2", "speed.reference_cache=false"]


def run(output_dir: Path, data: Path, *more: str) -> list[dict]:
    """A DPO run of the tiny preset (seed 42) on ``data``, whose 8 pairs are one batch; its
    metrics."""
    overrides = [
        f"data.train={data}",
        "data.max_length=48",
        "data.max_prompt_length=24",
        *(f"model.{key}={value}" for key, value in SIZES.items()),
        "train.batch_size=8",
        "train.max_steps=1",
        "train.learning_rate=1e-2",
        "train.log_every=1",
        f"output_dir={output_dir}",
        *more,
    ]
    run_dpo(load_config(DPOConfig, None, overrides))
    return [record for record in read_metrics(output_dir) if "loss" in record]


def policy() -> torch.nn.Module:
    """The run's starting policy."""
    return load_model(ModelSpec("tiny", seed=42, tiny_sizes=dict(SIZES)), TOKENIZER)


def hand_rewards(start: torch.nn.Module, reference: torch.nn.Module, data: Path) -> dict:
    """Step 1's rewards, by the formula: β (log π − log π_ref) of each response, averaged over
    the pairs, and the margins β ((log π − log π_ref)_chosen − (log π − log π_ref)_rejected)."""
    pairs, _ = encode_pairs(load_pairs(str(data))[0], TOKENIZER, Budget(48, 24))
    batch = collate_pairs(pairs, TOKENIZER.pad_token_id)
    with torch.no_grad():
        ours, _ = sequence_logps(start.eval(), batch)
        theirs, _ = sequence_logps(reference.eval(), batch)
    chosen, rejected = (BETA * (ours - theirs)).split(len(pairs))
    return {
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
    }


def assert_rewards(record: dict, expected: dict) -> None:
    assert abs(expected["rewards/margins"]) > 1e-3  # the reference is not the policy
    for key, value in expected.items():
        assert record[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(SAMPLE_TRAIN.read_text().splitlines(keepends=True)[:8]))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model directories to take as the reference: two tiny models of other seeds, an adapter
    of the run's starting model in two versions, one of another scale (alpha), a model of
    another vocabulary and one of another width."""
    root = tmp_path_factory.mktemp("references")
    paths: dict[str, Path] = {}
    for name, seed in (("seed7", 7), ("seed8", 8)):
        build_model(TOKENIZER, seed=seed, **SIZES).save_pretrained(root / name)
        paths[name] = root / name
    for name, seed, alpha in (("adapter1", 1, 16.0), ("adapter2", 2, 16.0), ("alpha8", 1, 8.0)):
        adapted = apply_lora(policy(), LoraSettings(r=4, alpha=alpha))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for weight_name, weight in adapted.named_parameters():
                if "lora_B" in weight_name:
                    weight.copy_(0.1 * torch.randn(weight.shape, generator=generator))
        adapted.save_pretrained(root / name)
        paths[name] = root / name
    wide = build_model(TOKENIZER, seed=3, **{**SIZES, "hidden_size": 48})
    wide.save_pretrained(root / "wide")
    paths["wide"] = root / "wide"
    other_vocabulary = build_model(TOKENIZER, seed=3, **SIZES)
    other_vocabulary.resize_token_embeddings(300)
    other_vocabulary.save_pretrained(root / "vocabulary")
    paths["vocabulary"] = root / "vocabulary"
    return paths


@pytest.mark.parametrize("cache", ["true", "false"])
def test_a_model_of_its_own_is_the_reference(
    tmp_path: Path, data: Path, models: dict[str, Path], cache: str
) -> None:
    """Step 1's rewards are the formula's with the model given (another seed) as π_ref, its
    log-probs cached before training or computed each step."""
    reference = models["seed7"]
    records = run(
        tmp_path / "out", data, f"reference.model={reference}", f"speed.reference_cache={cache}"
    )
    assert_rewards(
        records[0], hand_rewards(policy(), load_model(ModelSpec(str(reference)), None), data)
    )


@pytest.mark.parametrize("cache", ["true", "false"])
def test_a_lora_adapter_is_the_reference(
    tmp_path: Path, data: Path, models: dict[str, Path], cache: str
) -> None:
    """The policy's own adapters start afresh (at step 1 it is its base); the reference is the
    base under the adapter given. Only the policy's adapters are saved."""
    out = tmp_path / "out"
    adapter = models["adapter1"]
    records = run(
        out, data, "lora.r=4", f"reference.model={adapter}", f"speed.reference_cache={cache}"
    )
    adapted = PeftModel.from_pretrained(policy(), str(adapter))
    assert_rewards(records[0], hand_rewards(policy(), adapted, data))
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not (out / "adapter" / REFERENCE_ADAPTER).exists()


def test_the_cache_is_keyed_by_the_reference(
    tmp_path: Path,
    data: Path,
    models: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An entry per reference (whole, or a base under an adapter), whatever the policy: a run
    of another policy (seed) with a reference met before reads its entry back."""
    cache = tmp_path / "cache"

    def entries(name: str, *more: str) -> int:
        run(tmp_path / name, data, f"speed.cache_dir={cache}", *more)
        return len(list((cache / "reference-logps").iterdir()))

    assert entries("a", f"reference.model={models['seed7']}") == 1
    assert entries("b", f"reference.model={models['seed8']}") == 2
    assert "from the cache" not in capsys.readouterr().out
    assert entries("c", f"reference.model={models['seed7']}", "seed=5") == 2
    assert "from the cache" in capsys.readouterr().out
    assert entries("d", "lora.r=4", f"reference.model={models['adapter1']}") == 3
    assert entries("e", "lora.r=4", f"reference.model={models['adapter2']}") == 4


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (SYNC[:1], "set speed.reference_cache=false"),
        ([*SYNC, "train.distributed=fsdp2"], "train.distributed=fsdp2"),
        (["reference.sync_mix=0.5"], "no effect without reference.sync_every"),
        (["reference.model={seed7}", "loss.type=simpo"], "uses no reference"),
        (["reference.model={seed7}", "loss.reference_free=true"], "no effect"),
        (["reference.model={vocabulary}"], "vocabulary of 300 tokens"),
        (["reference.model={adapter1}"], "set lora.r"),
        (["reference.model=./no/such/model"], "no such directory"),
        (["reference.model=tiny"], "leave reference.model unset"),
        ([*SYNC, "reference.model={wide}"], "in the reference"),
        ([*SYNC, "lora.r=4", "reference.model={seed7}"], "must be a LoRA adapter"),
        ([*SYNC, "lora.r=4", "reference.model={alpha8}"], "scales its update by 2.0"),
    ],
)
def test_what_cannot_be_a_reference_is_refused_in_one_line(
    tmp_path: Path, data: Path, models: dict[str, Path], overrides: list[str], says: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        run(tmp_path / "out", data, *(item.format(**models) for item in overrides))
    assert says in str(refused.value)
    assert "\n" not in str(refused.value)
