"""``preftune label`` and soft labels: sampled completions judged into pairs ordered as the judge
says, with its probability, that ``data check`` and ``dpo`` read; ranked rows; rows with their
own responses judged without sampling; ``loss.soft_labels`` is each pair's own cDPO ε, and pairs
without the column encode, digest and store as before; an llm judge reports its position bias;
mistakes are one line."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from preftune.cli import main
from preftune.data.arrow import EXAMPLE_KEY, ArrowExamples, ExampleWriter, to_batch
from preftune.data.collate import collate_pairs
from preftune.data.digest import examples_digest
from preftune.data.encode import EncodedPair
from preftune.losses import PAIRED_LOSSES, LossParams, PairLogps
from preftune.losses.settings import LossSettings
from preftune.models.logps import sequence_logps
from preftune.models.tiny import build_model, build_tokenizer
from preftune.objectives.dpo import PairedObjective
from preftune.objectives.speed import PairScoring
from tests.conftest import SAMPLE_TRAIN, read_metrics, write_jsonl

JUDGE = "judge.spec=function:tests.test_label:distinct_characters"
SMALL = ["model.hidden_size=16", "generation.max_new_tokens=6", "generation.batch_size=8"]
ALL_PAIRS = ("label.k=3", "label.pairs=all")


def distinct_characters(prompt: str, completion: str) -> float:
    """The judge of these tests: how many different characters the completion uses, over 3."""
    return len(set(completion)) / 3


def cli(*args: str) -> tuple[int, str, str]:
    """``preftune ARGS`` in this process: its status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(args))
    return status, out.getvalue(), err.getvalue()


def label(directory: Path, *args: str) -> tuple[str, list[dict]]:
    """``preftune label`` writing ``directory/labelled.jsonl``: its stdout and the rows."""
    output = directory / "labelled.jsonl"
    status, out, err = cli("label", *SMALL, f"label.output={output}", *args)
    assert status == 0, err[-3000:]
    return out, [json.loads(line) for line in output.read_text().splitlines()]


@pytest.fixture(scope="module")
def sums(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 12 rows of the bundled pairs: their prompts are sampled from."""
    lines = SAMPLE_TRAIN.read_text().splitlines()[:12]
    path = tmp_path_factory.mktemp("sums") / "sums.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def labelled(sums: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict], Path]:
    """Every pair of 3 completions of each prompt, judged: the summary, the rows, the file."""
    directory = tmp_path_factory.mktemp("labelled")
    out, rows = label(directory, f"data.train={sums}", JUDGE, *ALL_PAIRS)
    return out, rows, directory / "labelled.jsonl"


def test_pairs_are_ordered_by_the_judge_with_its_probability(
    labelled: tuple[str, list[dict], Path],
) -> None:
    out, rows, _ = labelled
    assert rows and set(rows[0]) == {"prompt", "chosen", "rejected", "chosen_probability"}
    prompts = {json.loads(line)["prompt"] for line in SAMPLE_TRAIN.read_text().splitlines()}
    for row in rows:
        assert row["prompt"] in prompts  # the row's own prompt, not a re-decoded one
        difference = distinct_characters("", row["chosen"]) - distinct_characters(
            "", row["rejected"]
        )
        assert difference > 0
        assert row["chosen_probability"] == pytest.approx(1 / (1 + math.exp(-difference)), 1e-12)
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("label: 12 prompts, 36 completions sampled")
    assert f"{len(rows)} rows written" in summary and "ties" in summary


def test_labelled_pairs_pass_data_check_and_train_with_soft_labels(
    labelled: tuple[str, list[dict], Path], tmp_path: Path
) -> None:
    _, rows, path = labelled
    status, out, err = cli("data", "check", str(path))
    assert status == 0 and not err, err
    assert f"{len(rows)} rows of preference pairs, layout standard" in out
    run = [
        "train.batch_size=4",
        "train.max_steps=2",
        "train.log_every=1",
        "model.hidden_size=16",
    ]
    args = [f"data.train={path}", "loss.soft_labels=true", *run, f"output_dir={tmp_path}"]
    status, _, err = cli("dpo", *args)
    assert status == 0, err[-3000:]
    assert [record["step"] for record in read_metrics(tmp_path)] == [1, 2]


def test_sampling_is_seeded(
    labelled: tuple[str, list[dict], Path], sums: Path, tmp_path: Path
) -> None:
    _, again = label(tmp_path, f"data.train={sums}", JUDGE, *ALL_PAIRS)
    assert again == labelled[1]
    _, other = label(tmp_path, f"data.train={sums}", JUDGE, *ALL_PAIRS, "label.seed=7")
    assert other != again


def test_ranked_rows_carry_the_judges_scores_and_pass_data_check(
    sums: Path, tmp_path: Path
) -> None:
    _, rows = label(tmp_path, f"data.train={sums}", JUDGE, "label.k=3", "label.pairs=ranked")
    assert rows and all(set(row) == {"prompt", "responses", "scores"} for row in rows)
    for row in rows:
        assert row["scores"] == [distinct_characters("", text) for text in row["responses"]]
        assert len(set(row["scores"])) > 1
    status, out, err = cli("data", "check", str(tmp_path / "labelled.jsonl"))
    assert status == 0 and not err, err
    assert "layout ranked" in out


def test_given_responses_are_judged_without_sampling(tmp_path: Path) -> None:
    """No policy is loaded (model.path names nothing); a repeated response is left out; an
    even verdict is a tie, with no row."""
    rows = [
        {"prompt": "Say something.", "responses": ["aaa", "abc", "ab"]},
        {"prompt": "Say it again.", "responses": ["xy", "xy", "yz"]},
        {"prompt": "Once more.", "responses": ["hello", "world!"]},
    ]
    data = write_jsonl(tmp_path / "given.jsonl", rows)
    missing = f"model.path={tmp_path / 'no-model'}"
    out, written = label(tmp_path, f"data.train={data}", JUDGE, missing)
    assert written == [
        {
            "prompt": "Say something.",
            "chosen": "abc",
            "rejected": "aaa",
            "chosen_probability": 1 / (1 + math.exp(-2 / 3)),
        },
        {
            "prompt": "Once more.",
            "chosen": "world!",
            "rejected": "hello",
            "chosen_probability": 1 / (1 + math.exp(-2 / 3)),
        },
    ]
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("label: 3 prompts, 8 completions given (1 blank or repeated")
    assert "2 rows written" in summary and summary.endswith("1 ties")


def test_an_llm_judge_labels_and_reports_its_position_bias(tmp_path: Path) -> None:
    prompts = write_jsonl(
        tmp_path / "prompts.jsonl", [{"prompt": f"{n} plus 1 is"} for n in "1234"]
    )
    judge = ["judge.spec=llm:tiny", "judge.max_length=64"]
    out, rows = label(tmp_path, f"data.train={prompts}", *judge, "label.k=3")
    assert rows and all(0.5 < row["chosen_probability"] <= 1 for row in rows)
    summary = out.strip().splitlines()[-1]
    assert "position bias: the two orders disagreed on " in summary
    assert summary.endswith(" of 12 pairs")  # 4 prompts, every two of their 3 completions


def test_soft_labels_are_each_pairs_own_cdpo_epsilon() -> None:
    """The loss of two pairs with different ε_i = 1 − chosen_probability_i is
    Σ_i −(1−ε_i) log σ(β h_i) − ε_i log σ(−β h_i), with either way of laying the pairs out."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=0, hidden_size=16)
    pairs = [
        EncodedPair([5, 6, 7], [8, 9], [10], (-9.0, -4.0), chosen_probability=0.9),
        EncodedPair([11, 12], [13, 14, 15], [16, 17], (-12.0, -11.0), chosen_probability=0.6),
    ]
    beta, epsilon = 0.5, torch.tensor([0.1, 0.4], dtype=torch.float64)
    with torch.no_grad():
        logps, _ = sequence_logps(model, collate_pairs(pairs, tokenizer.pad_token_id))
    logps = logps.double()
    h = (logps[:2] - logps[2:]) - torch.tensor([-9.0 + 4.0, -12.0 + 11.0], dtype=torch.float64)
    terms = -(1 - epsilon) * F.logsigmoid(beta * h) - epsilon * F.logsigmoid(-beta * h)
    settings = LossSettings(beta=beta, soft_labels=True)
    for scoring in (PairScoring(), PairScoring(prefix_sharing=True, packing=True)):
        objective = PairedObjective(settings, None, tokenizer.pad_token_id, scoring)
        batch = objective.collate(pairs)
        assert batch["label_smoothing"].tolist() == pytest.approx([0.1, 0.4])
        with torch.no_grad():
            loss, _ = objective.compute(model, batch)
        torch.testing.assert_close(loss.double(), terms.sum(), rtol=1e-5, atol=1e-6)
    one_epsilon = -(0.75 * F.logsigmoid(beta * h) + 0.25 * F.logsigmoid(-beta * h)).sum()
    assert not torch.isclose(terms.sum(), one_epsilon)


@pytest.mark.parametrize("name", ["sigmoid", "robust", "exo_pair"])
def test_a_per_pair_epsilon_is_each_pairs_own(name: str) -> None:
    """A loss given ε as a (batch,) tensor gives each pair the loss it has alone with its ε (an
    ε of 0 is exo_pair's default there too)."""
    torch.manual_seed(0)
    policy = PairLogps(*torch.randn(2, 3) * 4, torch.ones(3), torch.ones(3))
    reference = PairLogps(*torch.randn(2, 3) * 4, torch.ones(3), torch.ones(3))
    epsilon = [0.0, 0.1, 0.4]
    loss = PAIRED_LOSSES[name].fn
    together = loss(policy, reference, LossParams(label_smoothing=torch.tensor(epsilon))).losses
    for i, eps in enumerate(epsilon):
        alone = [
            PairLogps(*(part[i : i + 1] for part in vars(p).values())) for p in (policy, reference)
        ]
        expected = loss(*alone, LossParams(label_smoothing=eps)).losses
        torch.testing.assert_close(together[i : i + 1], expected)


def test_pairs_without_a_chosen_probability_keep_their_digest_and_batches() -> None:
    """The digest of pairs without the column is the one they had before it existed, and their
    batches have no label_smoothing; pairs with it digest differently."""

    @dataclasses.dataclass
    class Before:  # EncodedPair as it was
        prompt_ids: list[int]
        chosen_ids: list[int]
        rejected_ids: list[int]
        reference_logps: tuple[float, float] | None = None
        row: int | None = None

    pairs = [EncodedPair([1, 2], [3], [4, 5], row=1), EncodedPair([6], [7, 8], [9], row=2)]
    old = [Before(p.prompt_ids, p.chosen_ids, p.rejected_ids, row=p.row) for p in pairs]
    assert examples_digest(pairs) == examples_digest(old)
    assert "label_smoothing" not in collate_pairs(pairs, 0)
    soft = [dataclasses.replace(pair, chosen_probability=0.8) for pair in pairs]
    assert examples_digest(soft) != examples_digest(pairs)
    half = [soft[0], pairs[1]]  # a batch soft-labels every pair or none
    assert "label_smoothing" not in collate_pairs(half, 0)


def test_the_examples_cache_keeps_chosen_probabilities_and_reads_files_without_them(
    tmp_path: Path,
) -> None:
    pairs = [
        EncodedPair([1, 2], [3], [4, 5], row=1, chosen_probability=0.75),
        EncodedPair([6], [7, 8], [9], row=2),
    ]
    path = tmp_path / "pairs.arrow"
    with ExampleWriter(path) as writer:
        writer.write(to_batch(pairs))
    stored = ArrowExamples(path, writer.digest.hexdigest())
    assert list(stored) == pairs and stored.content_digest == examples_digest(pairs)
    assert [pair.chosen_probability for pair in stored] == [0.75, None]
    # A file written before the column existed reads back without it.
    batch = to_batch(pairs).drop_columns(["chosen_probability"])
    batch = batch.replace_schema_metadata({EXAMPLE_KEY: b"EncodedPair"})
    old = tmp_path / "old.arrow"
    with pa.OSFile(str(old), "wb") as sink, pa.ipc.new_stream(sink, batch.schema) as stream:
        stream.write_batch(batch)
    assert [pair.chosen_probability for pair in ArrowExamples(old, "")] == [None, None]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["label", "label.output=x.jsonl"], "judge.spec is required"),
        (["label", JUDGE], "label.output is required"),
        (["label", JUDGE, "label.output=x.jsonl", "data.train=nowhere.jsonl"], "no such file"),
        (["label", "label.k=1"], "label.k"),
        (["dpo", "loss.soft_labels=true", "loss.label_smoothing=0.1"], "both set ε"),
        (["dpo", "loss.soft_labels=true", "loss.type=ipo"], "no effect with loss.type=ipo"),
        (["dpo", "loss.soft_labels=true", "loss.type=aot"], "aot compares sorted quantiles"),
    ],
)
def test_mistakes_are_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    status, _, err = cli(*args)
    assert status == 2 and len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.parametrize(
    ("row", "command", "message"),
    [
        ({}, "dpo", "row 2: field 'chosen_probability': missing; loss.soft_labels=true"),
        ({"chosen_probability": 0.5}, "dpo", "row 2: field 'chosen_probability': 0.5 is not above"),
        ({"chosen_probability": 1.5}, "dpo", "row 2: field 'chosen_probability': expected a prob"),
        (
            {"chosen_probability": "high"},
            "data",
            "row 2: field 'chosen_probability': expected a num",
        ),
    ],
)
def test_bad_chosen_probabilities_name_their_row(
    row: dict, command: str, message: str, tmp_path: Path
) -> None:
    good = {"prompt": "1 plus 1?", "chosen": "2", "rejected": "3", "chosen_probability": 0.9}
    data = write_jsonl(
        tmp_path / "pairs.jsonl", [good, {**good, "chosen_probability": None, **row}]
    )
    if command == "data":
        status, _, err = cli("data", "check", str(data))
        assert status == 1
    else:
        args = [f"data.train={data}", "loss.soft_labels=true", f"output_dir={tmp_path / 'out'}"]
        status, _, err = cli("dpo", *args)
        assert status == 2 and len(err.strip().splitlines()) == 1
    assert message in err, err
