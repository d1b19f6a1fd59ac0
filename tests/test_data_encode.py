"""Tokenizing records (prompt and responses apart), truncation, and collation into batches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from preftune.data import tokenize
from preftune.data.collate import collate_demos, collate_pairs
from preftune.data.encode import (
    Budget,
    EncodedDemo,
    EncodedPair,
    TruncationReport,
    encode_demos,
    encode_pairs,
)
from preftune.data.readers import load_pairs
from preftune.data.records import Demo, Pair
from preftune.errors import ConfigError, DataError, PreftuneError
from preftune.models.tiny import build_tokenizer
from tests.conftest import ROOT, SAMPLE_TRAIN

# The tiny tokenizer has one token per byte (a=97) and these special tokens.
BOS, EOS, USER, ASSISTANT, NEWLINE = 256, 257, 260, 261, 10


@pytest.fixture(scope="module")
def tiny() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    """A real BPE tokenizer trained in-test: its merges span what a prompt/response cut splits."""
    sentences = ["the answer is four", "four score and seven", "answer the question"] * 5
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(sentences, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")


def ids(text: str) -> list[int]:
    """Tiny-tokenizer ids of plain text: its UTF-8 bytes."""
    return list(text.encode())


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def test_text_pair_prompt_gets_bos_and_responses_end_on_eos(tiny: PreTrainedTokenizerFast) -> None:
    pairs = [Pair("2+2=", " 4", " 5<|end|>")]
    encoded, report = encode_pairs(pairs, tiny, Budget(64, None))
    assert encoded == [EncodedPair([BOS, *ids("2+2=")], [*ids(" 4"), EOS], [*ids(" 5"), EOS])]
    assert report == TruncationReport(1, 0, 0, 0, 1)


def test_conversation_rendered_with_chat_template(tiny: PreTrainedTokenizerFast) -> None:
    pairs = [Pair([user("hi")], [assistant("yo")], [assistant("no")])]
    [encoded], _ = encode_pairs(pairs, tiny, Budget(64, None))
    # The template's end-of-turn is the EOS, so no second EOS is appended.
    assert encoded.prompt_ids == [BOS, USER, NEWLINE, *ids("hi"), EOS, NEWLINE, ASSISTANT, NEWLINE]
    assert encoded.chosen_ids == [*ids("yo"), EOS, NEWLINE]
    assert encoded.rejected_ids == [*ids("no"), EOS, NEWLINE]


def test_demos_text_and_conversation(tiny: PreTrainedTokenizerFast) -> None:
    demos = [Demo("hi", " yo"), Demo([user("hi")], [assistant("yo")])]
    encoded, report = encode_demos(demos, tiny, Budget(64, None, "keep_end"))
    assert encoded == [
        EncodedDemo([BOS, *ids("hi")], [*ids(" yo"), EOS]),
        EncodedDemo(
            [BOS, USER, NEWLINE, *ids("hi"), EOS, NEWLINE, ASSISTANT, NEWLINE],
            [*ids("yo"), EOS, NEWLINE],
        ),
    ]
    assert report.summary() == "2 rows: 0 prompts truncated, 0 responses truncated, 0 dropped"


def test_template_that_renders_the_prompt_differently_is_an_error() -> None:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
        "{% if add_generation_prompt %}reply:{% endif %}"
    )
    with pytest.raises(DataError) as caught:
        encode_demos([Demo([user("hi")], [assistant("yo")])], tokenizer, Budget(64, None))
    assert str(caught.value).startswith(
        "chat template: example 1: rendering prompt+response does not start with the rendered "
        "prompt"
    )


def test_conversation_without_chat_template_is_one_line_error(
    bpe: PreTrainedTokenizerFast,
) -> None:
    with pytest.raises(PreftuneError) as caught:
        encode_demos([Demo([user("hi")], [assistant("yo")])], bpe, Budget(64, None))
    assert str(caught.value) == (
        "the data is conversational but the tokenizer has no chat template: set "
        "model.chat_template (chatml, llama3, zephyr, a Jinja file or a template), or "
        "convert the data to plain prompt/response text"
    )


def test_unknown_truncation_is_a_config_error(tiny: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ConfigError) as caught:
        encode_pairs([Pair("a", "b", "c")], tiny, Budget(64, None, "middle"))
    assert str(caught.value) == (
        "data.truncation: expected 'keep_end' or 'keep_start', got 'middle'"
    )


TRUNCATED = [
    Pair("abcdefgh", "xy", "uvwxyz"),  # prompt 9 tokens, cut to 4; rejected cut to 4
    Pair("a", "b", "c"),  # fits
    Pair("abcdef", "xy", "z"),  # prompt 7 tokens fits; one token of room for responses
]


def test_keep_end_truncation(tiny: PreTrainedTokenizerFast) -> None:
    encoded, report = encode_pairs(TRUNCATED, tiny, Budget(8, 4, "keep_end"))
    assert encoded == [
        EncodedPair(ids("efgh"), [*ids("xy"), EOS], ids("uvwx")),
        EncodedPair([BOS, *ids("a")], [*ids("b"), EOS], [*ids("c"), EOS]),
        EncodedPair(ids("cdef"), [*ids("xy"), EOS], [*ids("z"), EOS]),
    ]
    assert report == TruncationReport(
        rows=3, prompts_truncated=2, responses_truncated=1, dropped=0, kept=3
    )


def test_keep_start_truncation(tiny: PreTrainedTokenizerFast) -> None:
    encoded, report = encode_pairs(TRUNCATED, tiny, Budget(8, 4, "keep_start"))
    assert encoded == [
        EncodedPair([BOS, *ids("abc")], [*ids("xy"), EOS], ids("uvwx")),
        EncodedPair([BOS, *ids("a")], [*ids("b"), EOS], [*ids("c"), EOS]),
        EncodedPair([BOS, *ids("abc")], [*ids("xy"), EOS], [*ids("z"), EOS]),
    ]
    assert report == TruncationReport(3, 2, 1, 0, 3)


def test_prompt_that_fills_max_length_drops_the_row(tiny: PreTrainedTokenizerFast) -> None:
    encoded, report = encode_pairs(TRUNCATED, tiny, Budget(8, None))
    # Row 1's 9-token prompt leaves no room; row 3's 7-token prompt leaves one token each.
    assert encoded == [
        EncodedPair([BOS, *ids("a")], [*ids("b"), EOS], [*ids("c"), EOS]),
        EncodedPair([BOS, *ids("abcdef")], ids("x"), ids("z")),
    ]
    assert report == TruncationReport(3, 0, 1, 1, 2)
    assert report.summary() == (
        "3 rows: 0 prompts truncated, 1 response truncated, "
        "1 dropped (prompt leaves no room for a response)"
    )


def test_prompt_ids_are_a_prefix_with_no_merge_across_the_boundary(
    tiny: PreTrainedTokenizerFast, bpe: PreTrainedTokenizerFast
) -> None:
    text = "the answer is four"
    # Jointly, BPE would merge "fo"+"ur" into "four": the split must not let that happen.
    assert bpe("the answer is fo")["input_ids"] != bpe(text)["input_ids"][:5]
    for tokenizer in (tiny, bpe):
        eos = tokenizer.eos_token_id
        for cut in range(1, len(text)):
            prompt, response = text[:cut], text[cut:]
            pairs = [Pair(prompt, response, response + "!")]
            [encoded], _ = encode_pairs(pairs, tokenizer, Budget(64, None))
            assert encoded.prompt_ids == tokenizer(prompt)["input_ids"]
            response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
            assert encoded.chosen_ids == [*response_ids, eos]
            batch = collate_pairs([encoded], pad_id=tokenizer.pad_token_id)
            for row in batch["input_ids"].tolist():
                assert row[: len(encoded.prompt_ids)] == encoded.prompt_ids


def test_collate_pairs_puts_chosen_first_and_labels_only_responses() -> None:
    examples = [EncodedPair([1, 2], [3, 4], [5]), EncodedPair([6], [7, 8, 9], [10, 11])]
    # The pad id is also a real response token here (as when pad == EOS): it keeps its label.
    batch = collate_pairs(examples, pad_id=4)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [6, 7, 8, 9], [1, 2, 5, 4], [6, 10, 11, 4]]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1],
        [1, 1, 1, 1],
        [1, 1, 1, 0],
        [1, 1, 1, 0],
    ]
    assert batch["labels"].tolist() == [
        [-100, -100, 3, 4],
        [-100, 7, 8, 9],
        [-100, -100, 5, -100],
        [-100, 10, 11, -100],
    ]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_collate_demos_pads_to_the_longest_row() -> None:
    batch = collate_demos([EncodedDemo([1], [2]), EncodedDemo([3, 4], [5, 6, 7])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 0, 0, 0], [3, 4, 5, 6, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 2, -100, -100, -100], [-100, -100, 5, 6, 7]]


def test_file_to_batch_round_trip(tmp_path: Path, tiny: PreTrainedTokenizerFast) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: five"}) + "\n")
    pairs, _ = load_pairs(str(path))
    encoded, _ = encode_pairs(pairs, tiny, Budget(64, None))
    batch = collate_pairs(encoded, tiny.pad_token_id)
    texts = [
        tiny.decode(row[mask.bool()])
        for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    assert texts == ["<|bos|>Q: 2+2? A: 4<|end|>", "<|bos|>Q: 2+2? A: five<|end|>"]
    responses = [tiny.decode(row[row != -100]) for row in batch["labels"]]
    assert responses == [" 4<|end|>", " five<|end|>"]


def test_batches_encode_exactly_as_one_batch(
    tiny: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs, _ = load_pairs(str(SAMPLE_TRAIN))
    pairs = [*pairs[:40], Pair([user("hi")], [assistant("yo")], [assistant("no")], row=41)]
    whole = encode_pairs(pairs, tiny, Budget(40, 16))
    calls: list[int] = []
    ids_of = tokenize._ids

    def counted(*args: object) -> list[list[int]]:
        calls.append(1)
        return ids_of(*args)

    monkeypatch.setattr(tokenize, "_ids", counted)
    monkeypatch.setattr(tokenize, "BATCH_CHARACTERS", 100)
    assert encode_pairs(pairs, tiny, Budget(40, 16)) == whole
    assert len(calls) > 20  # about two rows a batch, each batch's prompts and responses
    # An error names the example by its place among all records, whatever batch it is in.
    mixed = Pair("a text prompt", [assistant("yo")], [assistant("no")])
    with pytest.raises(DataError, match=r"^chat template: example 42: prompt and responses must"):
        encode_pairs([*pairs, mixed], tiny, Budget(40, 16))


# The peak is the kernel's high-water mark of this process's memory (VmHWM), not getrusage's
# ru_maxrss, which may carry the peak of the process that started it.
MEASURE = """
import sys
from preftune.data.encode import Budget, encode_pairs
from preftune.data.readers import load_pairs
from preftune.models.tiny import build_tokenizer

def kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))

tokenizer = build_tokenizer()
resident = kib("VmRSS:")
pairs, _ = load_pairs(sys.argv[1])
encode_pairs(pairs, tokenizer, Budget(512, 256))
print(kib("VmHWM:") - resident)
"""


@pytest.mark.slow
def test_memory_for_a_file_grows_with_its_size(tmp_path: Path) -> None:
    """Reading and encoding 12 MB of 2 KB rows in a fresh process takes a few times the file's
    size (its rows and their ids), not the tokenizer's working memory for all of it at once
    (100 to 200 bytes a character: about 85 times the file before batching)."""
    words = ["the", "answer", "is", "four", "über", "naïve", "42", "what", "sum", "of", "it"]
    text = [f"{row} " + " ".join(words[row % len(words) :] * 80)[:700] for row in range(6000)]
    rows = [{"prompt": t, "chosen": t[::-1], "rejected": t.upper()} for t in text]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    command = [sys.executable, "-c", MEASURE, str(path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    growth = int(result.stdout.split()[-1]) * 1024
    assert growth < 20 * path.stat().st_size, (growth, path.stat().st_size)
