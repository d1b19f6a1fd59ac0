"""Every speed lever is exact: same log-probs, losses and gradients as the plain computation."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from preftune.commands.dpo import DPOConfig, run_dpo
from preftune.config import load_config
from preftune.data.collate import collate_pairs
from preftune.data.encode import Budget, EncodedPair, encode_pairs
from preftune.data.layout import CHOSEN, PROMPT, REJECTED, attention_allowed, layout_pairs, pack
from preftune.data.readers import load_pairs
from preftune.errors import ConfigError
from preftune.losses.settings import LossSettings
from preftune.models.attention import layout_attention
from preftune.models.load import checkpoint_layers
from preftune.models.logps import layout_logps, sequence_logps
from preftune.models.refcache import ReferencePass
from preftune.models.reference import AdapterDisabled, FrozenCopy
from preftune.models.tiny import build_model, build_tokenizer
from preftune.objectives.dpo import PairedObjective
from preftune.objectives.settings import SpeedSettings
from preftune.objectives.speed import PairScoring, choose_scoring
from tests.conftest import SAMPLE_TRAIN as SAMPLE
from tests.conftest import read_metrics

TOKENIZER = build_tokenizer()
PAD = TOKENIZER.pad_token_id


def random_pairs(count: int, seed: int = 0) -> list[EncodedPair]:
    rng = random.Random(seed)

    def ids(low: int, high: int) -> list[int]:
        return [rng.randrange(3, 250) for _ in range(rng.randint(low, high))]

    return [EncodedPair(ids(1, 20), ids(1, 12), ids(1, 12)) for _ in range(count)]


def logps_and_grads(model, score):
    model.zero_grad()
    sums, counts = score()
    # Different weights per sequence, so a swapped or misplaced sequence changes the gradient.
    (sums * torch.arange(1, len(sums) + 1)).sum().backward()
    return sums.detach(), counts, [p.grad.clone() for p in model.parameters()]


def assert_close(got, expected) -> None:
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-4)
    assert torch.equal(got[1], expected[1])
    for a, b in zip(got[2], expected[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("share", "packing", "chunk"), list(itertools.product([False, True], [False, True], [0, 7]))
)
def test_layouts_match_plain_logps_and_gradients(share: bool, packing: bool, chunk: int) -> None:
    model = build_model(TOKENIZER, seed=1)
    pairs = random_pairs(6)
    plain = logps_and_grads(model, lambda: sequence_logps(model, collate_pairs(pairs, PAD)))
    batch = layout_pairs(pairs, PAD, share_prefix=share, packing=packing, pack_length=48)
    fast = logps_and_grads(model, lambda: layout_logps(model, batch, chunk))
    assert_close(fast, plain)
    rows = 6 if share else 12
    assert (batch["input_ids"].shape[0] < rows) == packing


def test_eager_attention_takes_the_same_mask() -> None:
    model = build_model(TOKENIZER, seed=2).eval()
    pairs = random_pairs(4, seed=3)
    batch = layout_pairs(pairs, PAD, pack_length=64)
    with torch.no_grad():
        sdpa, _ = layout_logps(model, batch, 5)
        model.set_attn_implementation("eager")
        eager, _ = layout_logps(model, batch, 5)
        plain, _ = sequence_logps(model, collate_pairs(pairs, PAD))
    torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(eager, plain, rtol=1e-5, atol=1e-4)


def test_gradient_checkpointing_is_exact_and_recomputes_in_eval_mode() -> None:
    """Dropout-free training runs the model in eval mode; checkpointing still recomputes each
    layer in backward (transformers' own switch would not: it acts in train mode only)."""
    model = build_model(TOKENIZER, seed=4).eval()
    batch = layout_pairs(random_pairs(4, seed=5), PAD)
    plain = logps_and_grads(model, lambda: layout_logps(model, batch, 16))
    checkpoint_layers(model)
    calls = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    checkpointed = logps_and_grads(model, lambda: layout_logps(model, batch, 16))
    assert_close(checkpointed, plain)
    assert len(calls) == 2  # the forward, and its recomputation in backward


def test_levers_off_is_the_plain_path() -> None:
    """Every lever off: two right-padded rows per pair under a 2-D mask, full logits."""
    model = build_model(TOKENIZER, seed=6)
    off = SpeedSettings(prefix_sharing=False, packing=False, logits_chunk=0)
    scoring, line = choose_scoring(model, off)
    assert (scoring, line) == (PairScoring(), None)
    objective = PairedObjective(LossSettings(), None, PAD, scoring)
    pairs = random_pairs(3, seed=7)
    batch = objective.collate(pairs)
    assert sorted(batch) == ["attention_mask", "input_ids", "labels"]
    assert batch["attention_mask"].dim() == 2 and batch["input_ids"].shape[0] == 6
    expected = sequence_logps(model, collate_pairs(pairs, PAD))
    got = objective.score(model, batch)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_chunked_output_layer_on_plain_rows_is_exact() -> None:
    model = build_model(TOKENIZER, seed=8)
    batch = collate_pairs(random_pairs(5, seed=9), PAD)
    plain = logps_and_grads(model, lambda: sequence_logps(model, batch))
    chunked = logps_and_grads(model, lambda: sequence_logps(model, batch, 6))
    assert_close(chunked, plain)


def test_flash_kernels_take_packing_but_refuse_prefix_sharing() -> None:
    """A flash kernel sees documents only through position ids, in one row: packing goes that
    way; prefix sharing cannot, and is one line naming the key."""
    model = build_model(TOKENIZER, seed=10)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError, match=r"speed\.prefix_sharing=false"):
        choose_scoring(model, SpeedSettings())
    scoring, line = choose_scoring(model, SpeedSettings(prefix_sharing=False))
    assert line is None and scoring.packing and not scoring.prefix_sharing
    batch = layout_pairs(random_pairs(5, seed=11), PAD, False, True, scoring.pack_length)
    assert batch["input_ids"].shape[0] == 1
    with layout_attention(model, batch) as (inputs, _):
        assert inputs["attention_mask"] is None
        assert torch.equal(inputs["position_ids"], batch["position_ids"])


def test_rejected_tokens_never_see_the_chosen_response() -> None:
    pair = EncodedPair([5, 6, 7], [8, 9], [10, 11, 12])
    batch = layout_pairs([pair], PAD, share_prefix=True, packing=False)
    branch = batch["branch"][0].tolist()
    assert branch == [PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED] * 3
    # Rejected positions restart where the prompt ends.
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    allowed = attention_allowed(batch["doc_ids"], batch["branch"])[0, 0]
    for i, j in itertools.product(range(8), range(8)):
        expected = j <= i and (branch[j] == PROMPT or branch[j] == branch[i])
        assert bool(allowed[i, j]) == expected, (i, j)
    # The first rejected token is predicted by the last prompt token, not the last chosen one.
    first_rejected = batch["score_seq"].tolist().index(1)
    assert batch["score_index"][first_rejected].item() == 2
    assert batch["score_target"][first_rejected].item() == 10


def test_packed_documents_never_see_each_other() -> None:
    pairs = [EncodedPair([1, 2], [3], [4]), EncodedPair([5], [6, 7], [8])]
    batch = layout_pairs(pairs, PAD, share_prefix=True, packing=True, pack_length=64)
    assert batch["input_ids"].shape == (1, 8)
    allowed = attention_allowed(batch["doc_ids"], batch["branch"])[0, 0]
    docs = batch["doc_ids"][0]
    crossing = allowed & (docs[:, None] != docs[None, :])
    assert not crossing.any()


def test_pack_fills_rows_first_fit_decreasing() -> None:
    lengths = [7, 3, 5, 2, 9, 4]
    rows = pack(lengths, 10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert [[lengths[i] for i in row] for row in rows] == [[9], [7, 3], [5, 4], [2]]


def dpo(overrides: list[str]) -> dict[str, float]:
    return run_dpo(load_config(DPOConfig, None, overrides))


PLAIN = [
    "speed.reference_cache=false",
    "speed.prefix_sharing=false",
    "speed.packing=false",
    "speed.logits_chunk=0",
]


def test_training_with_every_lever_matches_the_plain_path(
    small_run: list[str], tmp_path: Path
) -> None:
    fast_run = [*small_run, f"output_dir={tmp_path / 'fast'}"]
    plain_run = [*small_run, f"output_dir={tmp_path / 'plain'}", *PLAIN]
    dpo(fast_run)
    dpo(plain_run)
    fast, plain = read_metrics(tmp_path / "fast"), read_metrics(tmp_path / "plain")
    assert [r["step"] for r in fast] == [r["step"] for r in plain] == list(range(1, 7))
    for a, b in zip(fast, plain, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
    # The levers change the work done, not what is counted as tokens.
    assert fast[0]["tokens_per_second"] > 0 and plain[0]["tokens_per_second"] > 0


def test_reference_cache_is_keyed_and_reused(
    small_run: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    run = [*small_run, "train.max_steps=1", f"speed.cache_dir={cache}"]
    dpo([*run, f"output_dir={tmp_path / 'a'}"])
    files = sorted((cache / "reference-logps").iterdir())
    assert len(files) == 1
    assert "from the cache" not in capsys.readouterr().out
    dpo([*run, f"output_dir={tmp_path / 'b'}"])
    assert "from the cache" in capsys.readouterr().out
    assert sorted((cache / "reference-logps").iterdir()) == files
    # Anything that changes the log-probs makes a new entry: the data's truncation, the weights.
    dpo([*run, "data.max_prompt_length=20", f"output_dir={tmp_path / 'c'}"])
    dpo([*run, "seed=7", f"output_dir={tmp_path / 'd'}"])
    assert len(list((cache / "reference-logps").iterdir())) == 3


def test_cached_reference_equals_a_frozen_copy() -> None:
    """The precomputed values are those a frozen copy of the policy gives in training."""

    model = build_model(TOKENIZER, seed=3)
    pairs, _ = encode_pairs(load_pairs(str(SAMPLE))[0][:12], TOKENIZER, Budget(48, 24))
    objective = PairedObjective(LossSettings(), None, PAD, PairScoring.from_config(SpeedSettings()))
    acc = Accelerator(cpu=True)
    reference = ReferencePass(model, objective.score, objective.collate, 5, acc)
    values = reference.compute(pairs, "train")
    frozen = FrozenCopy(model, torch.device("cpu"))
    expected, _ = frozen.logps(collate_pairs(pairs, PAD))
    torch.testing.assert_close(values[:, 0], expected[:12], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(values[:, 1], expected[12:], rtol=1e-5, atol=1e-4)


def test_lora_reference_is_the_base_model() -> None:
    from preftune.models.lora import apply_lora
    from preftune.models.settings import LoraSettings

    base = build_model(TOKENIZER, seed=5)
    batch = collate_pairs(random_pairs(3, seed=6), PAD)
    with torch.no_grad():
        expected, _ = sequence_logps(base.eval(), batch)
    policy = apply_lora(base, LoraSettings(r=4))
    with torch.no_grad():  # move the adapters away from their zero start
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)
        moved, _ = sequence_logps(policy, batch)
    assert not torch.allclose(moved, expected)
    reference, _ = AdapterDisabled(policy).logps(batch)
    torch.testing.assert_close(reference, expected)
    assert sum(p.numel() for p in policy.parameters() if p.requires_grad) < 0.5 * sum(
        p.numel() for p in policy.parameters()
    )


@pytest.mark.parametrize("cache", ["true", "false"])
def test_lora_run_saves_a_loadable_merged_model(
    small_run: list[str], tmp_path: Path, cache: str
) -> None:
    out = tmp_path / "lora"
    run = [*small_run, "lora.r=4", f"speed.reference_cache={cache}", f"output_dir={out}"]
    run += ["train.learning_rate=1e-2"]
    dpo(run)
    records = read_metrics(out)
    assert records[0]["loss"] == pytest.approx(0.6931472, abs=1e-5)
    assert records[-1]["loss"] < records[0]["loss"]
    assert (out / "adapter" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())


@pytest.mark.slow
def test_flex_attention_block_mask_is_exact() -> None:
    """The block-sparse kernel for GPUs takes the same mask (compiled once on CPU: ~20 s)."""
    model = build_model(TOKENIZER, seed=8).eval()
    pairs = random_pairs(4, seed=9)
    with torch.no_grad():
        plain, _ = sequence_logps(model, collate_pairs(pairs, PAD))
        model.set_attn_implementation("flex_attention")
        flex, _ = layout_logps(model, layout_pairs(pairs, PAD, pack_length=64), 8)
    torch.testing.assert_close(flex, plain, rtol=1e-5, atol=1e-4)
