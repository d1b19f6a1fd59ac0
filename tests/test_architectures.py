"""Exact on every architecture we claim: each layout scores every sequence as a forward of that
sequence alone would, dropout is off whatever the architecture, and every command trains and
saves a loadable model.

The ground truth is the model's own forward of each ``prompt + response`` alone, unpadded: not
the plain batch path, which could share a layout's error.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from preftune.commands.dpo import DPOConfig, run_dpo
from preftune.commands.kto import KTOConfig, run_kto
from preftune.commands.rm import RMConfig, run_rm
from preftune.commands.sft import SFTConfig, run_sft
from preftune.config import load_config
from preftune.data.encode import Budget, EncodedPair, encode_pairs
from preftune.data.readers import load_pairs
from preftune.losses.settings import LossSettings
from preftune.models import attention
from preftune.models.attention import VARLEN_ROW
from preftune.models.layout_check import alone_logps
from preftune.models.load import ModelSpec, load_model
from preftune.models.logps import AUTO, chunk_rows_of
from preftune.models.reference import FrozenCopy
from preftune.objectives.dpo import PairedObjective
from preftune.objectives.settings import SpeedSettings
from preftune.objectives.speed import PairScoring, choose_scoring
from tests.architectures import ARCHITECTURES, INEXPRESSIBLE, TOKENIZER, build, save
from tests.conftest import SAMPLE_SFT, SAMPLE_TRAIN, read_metrics

PAD = TOKENIZER.pad_token_id
DOCUMENT_ATTENTION = attention.document_attention
NAMES = list(ARCHITECTURES)
# Every combination of the levers: prefix sharing, packing (into rows as long as the longest
# pair, or all into one row), chunked output layer (by 7, or all at once when they fit),
# attention by documents or through the dense mask.
LEVERS = [
    (share, packing, length, chunk, documents)
    for share, packing, length, chunk, documents in itertools.product(
        [False, True], [False, True], [0, VARLEN_ROW], [0, 7, AUTO], [True, False]
    )
    if packing or not length
]


def random_pairs(count: int = 6, seed: int = 0) -> list[EncodedPair]:
    """Pairs up to 56 tokens long: past every 8-token window, within the 64-token one."""
    rng = random.Random(seed)

    def ids(low: int, high: int) -> list[int]:
        return [rng.randrange(3, 250) for _ in range(rng.randint(low, high))]

    return [EncodedPair(ids(4, 24), ids(3, 16), ids(3, 16)) for _ in range(count)]


def alone(model: torch.nn.Module, pairs: list[EncodedPair]) -> torch.Tensor:
    """(2B,) chosen then rejected summed log-probs, each sequence forwarded alone."""
    with torch.no_grad():
        sums = torch.stack([alone_logps(model, pair, torch.device("cpu")) for pair in pairs])
    return sums.T.flatten()


def score(model: torch.nn.Module, pairs: list[EncodedPair], scoring: PairScoring):
    objective = PairedObjective(LossSettings(), None, PAD, scoring)
    return objective.score(model, objective.collate(pairs))


@pytest.mark.parametrize("name", NAMES)
def test_every_layout_scores_each_sequence_as_alone(name: str) -> None:
    model = build(name).eval()
    # The layouts stand on this model: none is turned off behind the test's back. Where every
    # layer attends document by document, a micro-batch is packed into one row.
    one_row = plain_causal_layers(model) == model.config.num_hidden_layers
    assert choose_scoring(model, SpeedSettings()) == (
        replace(PairScoring.from_config(SpeedSettings()), pack_length=VARLEN_ROW * one_row),
        None,
    )
    pairs = random_pairs()
    truth = alone(model, pairs)
    for share, packing, length, chunk, documents in LEVERS:
        with torch.no_grad():
            scoring = PairScoring(share, packing, length, chunk, documents)
            logps, counts = score(model, pairs, scoring)
        error = (logps - truth).abs().max().item()
        assert error < 1e-4, (name, scoring, error)
        lengths = [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
        assert counts.tolist() == lengths


@pytest.mark.parametrize("name", NAMES)
def test_layout_gradients_equal_the_plain_path(name: str) -> None:
    model = build(name).eval()
    pairs = random_pairs(seed=1)
    grads = []
    for scoring in (
        PairScoring(),
        PairScoring(True, True, 0, 7),
        PairScoring(True, True, 0, AUTO, documents=False),
        PairScoring(False, True, 0, AUTO),
    ):
        model.zero_grad()
        logps, _ = score(model, pairs, scoring)
        # Different weights per sequence, so a misplaced sequence changes the gradient.
        (logps * torch.arange(1, len(logps) + 1)).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    plain, *others = grads
    for laid_out in others:
        for expected, got in zip(plain, laid_out, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def plain_causal_layers(model: torch.nn.Module) -> int:
    """How many of the model's layers attend under sdpa with nothing but the causal mask: no
    window, on any layer or on the layers of its sliding type."""
    config = model.config
    if config._attn_implementation != "sdpa":
        return 0
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types.count("full_attention")
    return 0 if getattr(config, "sliding_window", None) else config.num_hidden_layers


@pytest.mark.parametrize("name", NAMES)
def test_plain_causal_layers_attend_by_documents_and_the_rest_by_their_masks(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The document kernel serves exactly the layers whose mask is the plain causal one: a
    windowed layer (or a kernel other than sdpa) keeps its own mask, and the scores stay exact
    either way (the test above)."""
    calls = []
    monkeypatch.setattr(
        attention,
        "document_attention",
        lambda *args: calls.append(args[3]) or DOCUMENT_ATTENTION(*args),
    )
    model = build(name).eval()
    pairs = random_pairs()
    with torch.no_grad():
        score(model, pairs, PairScoring(True, True, 0, AUTO))
        assert len(calls) == plain_causal_layers(model), name
        if calls:  # every row's calls tile it; each rejected response has a masked call
            for runs, row_calls in calls[0].rows:
                assert sum(call.queries for call in row_calls) == sum(runs)
            masked = [c for _, row in calls[0].rows for c in row if c.allowed is not None]
            assert len(masked) == len(pairs)
        calls.clear()
        score(model, pairs, PairScoring(True, True, 0, AUTO, documents=False))
        assert not calls


def test_windows_cut_some_sequences_and_exceed_others() -> None:
    """The matrix covers a window shorter than its sequences and one longer: the same weights
    with an unbounded window score differently in the first case and identically in the
    second."""
    pairs = random_pairs()
    for name, window_cuts in (("mistral", True), ("gemma2", True), ("qwen2", False)):
        model = build(name).eval()
        windowed = alone(model, pairs)
        model.config.sliding_window = 10_000
        unwindowed = alone(model, pairs)
        assert bool((windowed - unwindowed).abs().max() > 1e-3) == window_cuts, name


@pytest.mark.parametrize("name", list(INEXPRESSIBLE))
def test_layouts_turn_off_where_they_cannot_be_exact(name: str) -> None:
    model = build(name).eval()
    scoring, line = choose_scoring(model, SpeedSettings())
    assert not scoring.laid_out and scoring.logits_chunk == chunk_rows_of(
        SpeedSettings().logits_chunk
    )
    assert line is not None and line.startswith("speed.prefix_sharing and speed.packing: off")
    assert "\n" not in line
    pairs = random_pairs()
    with torch.no_grad():
        logps, _ = score(model, pairs, scoring)
    assert (logps - alone(model, pairs)).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("architectures")
    return {name: save(name, root / name) for name in NAMES}


def sample_pairs(count: int = 8) -> list[EncodedPair]:
    records = load_pairs(str(SAMPLE_TRAIN))[0][:count]
    return encode_pairs(records, TOKENIZER, Budget(48, 24))[0]


@pytest.mark.parametrize("name", NAMES)
def test_step_one_dpo_loss_is_ln2(name: str, model_dirs: dict[str, Path]) -> None:
    """Policy and reference agree at step 1 in a training forward (gradients on), dropout or not
    in the architecture's config."""
    policy = load_model(ModelSpec(str(model_dirs[name])), TOKENIZER)
    objective = PairedObjective(LossSettings(), None, PAD, PairScoring(True, True, 0, 16))
    objective.reference = FrozenCopy(policy, torch.device("cpu"), objective.score)
    loss, metrics = objective.compute(policy, objective.collate(sample_pairs()))
    loss.backward()
    assert metrics["loss"][0].item() / metrics["loss"][1].item() == pytest.approx(
        math.log(2), abs=1e-6
    )


def test_dropout_kept_outside_dropout_modules_is_off(model_dirs: dict[str, Path]) -> None:
    """OPT keeps its dropout rate as a float and calls functional dropout: with the model left
    in train mode (model.disable_dropout=false) two forwards differ; by default they agree."""
    batch = PairedObjective(LossSettings(), None, PAD).collate(sample_pairs(4))
    for disable, equal in ((False, False), (True, True)):
        model = load_model(ModelSpec(str(model_dirs["opt"]), disable_dropout=disable), TOKENIZER)
        first, second = (score_plain(model, batch) for _ in range(2))
        assert torch.equal(first, second) == equal


def score_plain(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from preftune.models.logps import sequence_logps

    return sequence_logps(model, batch)[0].detach()


# Every lever off: the plain computation.
PLAIN = (
    "speed.reference_cache=false",
    "speed.prefix_sharing=false",
    "speed.packing=false",
    "speed.logits_chunk=0",
)


def run(command: str, name: str, model_dirs: dict[str, Path], tmp_path: Path, *extra: str):
    config_class, runner, data = {
        "dpo": (DPOConfig, run_dpo, SAMPLE_TRAIN),
        "sft": (SFTConfig, run_sft, SAMPLE_SFT),
        "rm": (RMConfig, run_rm, SAMPLE_TRAIN),
        "kto": (KTOConfig, run_kto, SAMPLE_TRAIN),
    }[command]
    out = tmp_path / command
    overrides = [
        f"model.path={model_dirs[name]}",
        f"data.train={data}",
        "data.max_length=48",
        "data.max_prompt_length=24",
        "train.batch_size=8",
        "train.max_steps=2",
        "train.learning_rate=1e-3",
        "train.log_every=1",
        "train.report_to=none",
        f"output_dir={out}",
        *extra,
    ]
    runner(load_config(config_class, None, overrides))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_command_trains_and_saves_a_loadable_model(
    name: str, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    out = run("dpo", name, model_dirs, tmp_path)
    fast = read_metrics(out)
    assert fast[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    AutoModelForCausalLM.from_pretrained(out)
    plain = read_metrics(run("dpo", name, model_dirs, tmp_path / "plain", *PLAIN))
    for a, b in zip(fast, plain, strict=True):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
    for command in ("sft", "kto"):
        records = read_metrics(run(command, name, model_dirs, tmp_path))
        assert all(math.isfinite(r["loss"]) for r in records)
        AutoModelForCausalLM.from_pretrained(tmp_path / command)
    run("rm", name, model_dirs, tmp_path)
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    lora = run("dpo", name, model_dirs, tmp_path / "lora", "lora.r=4")
    assert read_metrics(lora)[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert (lora / "adapter" / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(lora)
