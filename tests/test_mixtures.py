"""``data.train`` as a list of sources: concatenated, or mixed in the proportions of
``data.weights`` exactly and in the same order on every build, with a digest (the checkpoint's
data identity) that follows the mixture."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from accelerate import Accelerator

from preftune.cli import main
from preftune.commands import datasets
from preftune.commands.configs import DPOConfig, PPOConfig
from preftune.commands.rl import load_prompts
from preftune.config import load_config
from preftune.data.digest import examples_digest
from preftune.data.encode import encode_pairs
from preftune.data.mixture import Mixture, mixed, shares
from preftune.data.readers import load_pairs
from preftune.errors import ConfigError
from tests.conftest import SAMPLE_EVAL, SAMPLE_TRAIN, write_jsonl

LARGE = [("large", i) for i in range(30)]
SMALL = [("small", i) for i in range(10)]


def test_shares_split_the_total_by_largest_remainders() -> None:
    assert shares(40, [1, 3]) == [10, 30]
    assert shares(40, [0.25, 0.75]) == [10, 30]
    assert shares(10, [1, 1, 1]) == [4, 3, 3]  # a tie of remainders goes to the earlier
    assert shares(10, [1, 2, 2]) == [2, 4, 4]
    assert shares(7, [0.1, 0.2, 0.7]) == [1, 1, 5]  # 0.7, 1.4, 4.9: the largest remainder is 4.9
    assert sum(shares(1001, [0.3, 0.3, 0.4])) == 1001


def test_a_weighted_mixture_holds_the_documented_proportions_exactly() -> None:
    """As many examples as the sources together (40), a quarter from the large source (10 of
    its 30, none twice) and three quarters from the small one (its 10, each three times)."""
    mixture = mixed([LARGE, SMALL], [1, 3], seed=7)
    assert isinstance(mixture, Mixture)
    assert len(mixture) == 40 and mixture.counts == [10, 30]
    taken = Counter(mixture)
    assert sum(count for (name, _), count in taken.items() if name == "large") == 10
    assert all(count == 1 for (name, _), count in taken.items() if name == "large")
    assert {item: count for item, count in taken.items() if item[0] == "small"} == {
        item: 3 for item in SMALL
    }
    # Shuffled: the sources' examples are interleaved, not one block after the other.
    assert [name for name, _ in mixture[:10]] != ["small"] * 10


def test_a_mixture_is_the_same_on_every_build_and_differs_with_the_seed() -> None:
    first = list(mixed([LARGE, SMALL], [1, 3], seed=7))
    assert list(mixed([LARGE, SMALL], [1, 3], seed=7)) == first
    assert list(mixed([LARGE, SMALL], [1, 3], seed=8)) != first
    # A share of more than twice a source: repeated whole, then a random subset for the rest.
    counts = Counter(mixed([LARGE, SMALL], [1, 7], seed=7))
    assert sorted(counts[item] for item in SMALL) == [3] * 5 + [4] * 5


def test_without_weights_the_sources_are_concatenated() -> None:
    assert list(mixed([LARGE, SMALL], None, seed=7)) == LARGE + SMALL
    assert mixed([LARGE], None, seed=7) is LARGE  # one source is that source, digest included


def train_set(*overrides: str) -> Any:
    """The training examples of a DPO config, built as a run builds them (no model)."""
    cfg = load_config(DPOConfig, None, ["data.max_prompt_length=24", *overrides])
    acc = Accelerator(cpu=True)
    examples, _ = datasets.train_and_eval_sets(cfg, tiny_tokenizer(), acc, load_pairs, encode_pairs)
    return examples


def tiny_tokenizer() -> Any:
    from preftune.models.tiny import build_tokenizer

    return build_tokenizer()


SOURCES = f"data.train=[{SAMPLE_TRAIN}, {SAMPLE_EVAL}]"


def test_the_data_digest_is_the_same_across_builds_and_follows_the_weights(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The digest a checkpoint records: equal for two builds of one mixture (a resumed run's
    data is its first run's), different when the weights or the seed change what is trained
    on, or when the sources are concatenated instead."""
    digest = examples_digest(train_set(SOURCES, "data.weights=[1, 1]"))
    out = capsys.readouterr().out
    assert (
        f"data.train: a mixture of 320 examples; {SAMPLE_TRAIN}: 160 of its 256 (weight 1)" in out
    )
    assert examples_digest(train_set(SOURCES, "data.weights=[1, 1]")) == digest
    assert examples_digest(train_set(SOURCES, "data.weights=[2, 2]")) == digest  # same shares
    others = {
        examples_digest(train_set(SOURCES, "data.weights=[1, 3]")),
        examples_digest(train_set(SOURCES, "data.weights=[1, 1]", "seed=1")),
        examples_digest(train_set(SOURCES)),
    }
    assert len(others) == 3 and digest not in others
    one = examples_digest(train_set(f"data.train=[{SAMPLE_TRAIN}]"))
    assert one == examples_digest(train_set(f"data.train={SAMPLE_TRAIN}"))


def test_a_dpo_run_trains_on_a_weighted_mixture_with_a_concatenated_eval_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = SAMPLE_TRAIN.read_text().splitlines(keepends=True)
    large, small = tmp_path / "large.jsonl", tmp_path / "small.jsonl"
    large.write_text("".join(lines[:12]))
    small.write_text("".join(lines[12:16]))
    status = main(
        [
            "dpo",
            "model=tiny",
            f"data.train=[{large}, {small}]",
            "data.weights=[1, 3]",
            f"data.eval=[{small}, {small}]",
            "data.max_length=48",
            "data.max_prompt_length=24",
            "train.batch_size=4",
            "train.max_steps=2",
            f"output_dir={tmp_path / 'out'}",
        ]
    )
    out, err = capsys.readouterr()
    assert status == 0, err[-2000:]
    assert (
        f"data.train: a mixture of 16 examples; {large}: 4 of its 12 (weight 1); "
        f"{small}: 12 of its 4 (weight 3)"
    ) in out
    assert "data.eval: 2 sources concatenated, 8 examples" in out


def test_data_check_reads_every_source_of_a_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "check", SOURCES, "data.weights=[1, 1]"]) == 0
    out = capsys.readouterr().out
    assert f"{SAMPLE_TRAIN}: 256 rows" in out and f"{SAMPLE_EVAL}: 64 rows" in out


def test_prompts_to_sample_from_are_mixed_too(tmp_path: Path, tiny: Any) -> None:
    first = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}"} for i in range(6)])
    second = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}"} for i in range(2)])
    overrides = [f"data.train=[{first}, {second}]", "data.weights=[1, 1]"]
    prompts = load_prompts(load_config(PPOConfig, None, overrides), tiny, Accelerator(cpu=True))
    assert Counter(prompt.text[0] for prompt in prompts) == {"a": 4, "b": 4}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [f"data.train={SAMPLE_TRAIN}", "data.weights=[1]"],
            "data.weights weighs the sources of a list: give data.train as one, e.g. "
            "data.train=[a.jsonl,b.jsonl] data.weights=[3,1]",
        ),
        (
            [SOURCES, "data.weights=[1, 2, 3]"],
            "data.weights has 3 for 2 data.train sources: give one weight per source",
        ),
        ([SOURCES, "data.weights=[1, 0]"], "data.weights[1] must be positive, got 0.0"),
        ([SOURCES, "data.weights=[-1, 1]"], "data.weights[0] must be positive, got -1.0"),
        (
            [SOURCES, "data.weights=[1, .nan]"],
            "data.weights[1] must be finite and positive, got nan",
        ),
        (["data.train=[]"], "config key 'data.train' needs at least one value"),
    ],
)
def test_bad_weights_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(DPOConfig, None, overrides)
    assert str(caught.value) == message
