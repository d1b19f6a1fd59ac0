"""Tokenize canonical records into prompt and response ids, truncating to fit a length budget.

The prompt and each response are tokenized separately and concatenated, so the prompt's ids are
exactly a prefix of every prompt+response sequence: no token merges across the boundary, and
the response tokens a loss is taken over are the same for chosen and rejected.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from transformers import PreTrainedTokenizerBase

from preftune.data.records import (
    Demo,
    Message,
    Pair,
    Ranked,
    Rated,
    Text,
    preferences,
    tied_pairs,
)
from preftune.data.sources import keep_or_raise
from preftune.errors import ConfigError, DataError, PreftuneError

TRUNCATIONS = ("keep_end", "keep_start")
Record = Pair | Ranked | Demo | Rated
BATCH_CHARACTERS = 2**18
"""About how much text goes to the tokenizer at once: plenty to keep its threads busy, while its
working memory, 100 to 200 bytes per character, stays small however large the dataset."""


@dataclass
class EncodedPair:
    """Token ids of one preference pair; a sequence is ``prompt_ids + chosen_ids`` (or rejected)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    # Summed reference log-probs of (chosen, rejected), once they have been computed.
    reference_logps: tuple[float, float] | None = None
    # The row of the source data it came from (1-based), where known.
    row: int | None = field(default=None, compare=False)


@dataclass
class EncodedDemo:
    """Token ids of one demonstration; the sequence is ``prompt_ids + completion_ids``."""

    prompt_ids: list[int]
    completion_ids: list[int]
    row: int | None = field(default=None, compare=False)


@dataclass
class TruncationReport:
    """What fitting rows into the length budget did; truncation counts are over kept rows.

    ``identical`` counts kept pairs whose responses are the same tokens: they carry no
    preference, so a paired loss has zero gradient on them.
    """

    rows: int
    prompts_truncated: int
    responses_truncated: int
    dropped: int
    kept: int
    identical: int = 0

    def summary(self) -> str:
        """One line, e.g. ``"1000 rows: 12 prompts truncated, 3 responses truncated, 1 dropped
        (prompt leaves no room for a response)"``."""
        text = (
            f"{_count(self.rows, 'row')}: {_count(self.prompts_truncated, 'prompt')} truncated, "
            f"{_count(self.responses_truncated, 'response')} truncated, {self.dropped} dropped"
        )
        if self.dropped:
            text += " (prompt leaves no room for a response)"
        if self.identical:
            text += (
                f"; {_count(self.identical, 'pair')} with chosen identical to rejected "
                "(no preference to learn)"
            )
        return text


@dataclass
class ExpansionReport(TruncationReport):
    """A truncation report of ranked rows, with the pairs they were expanded into and the pairs
    of tied responses, which give none."""

    pairs: int = 0
    tied: int = 0

    def summary(self) -> str:
        text = f"{super().summary()}; expanded into {_count(self.pairs, 'pair')}"
        if self.tied:
            text += f" ({_count(self.tied, 'pair')} of tied responses give none)"
        return text


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


@dataclass
class Tokenized:
    """Untruncated ids of one example: its prompt and each response, its source row, and the
    record it was tokenized from."""

    prompt: list[int]
    responses: list[list[int]]
    row: int | None
    record: Record | None = field(default=None, compare=False, repr=False)


def encode_pairs(
    pairs: Sequence[Pair] | Sequence[Ranked],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int | None,
    truncation: str = "keep_end",
    *,
    source: str = "data",
    skipped: list[DataError] | None = None,
) -> tuple[list[EncodedPair], TruncationReport]:
    """Token ids for each pair, fitted so ``prompt + response`` is at most ``max_length`` tokens.

    A prompt longer than ``max_prompt_length`` keeps its end (``keep_end``) or its start
    (``keep_start``); then each response is cut, keeping its start, to fit ``max_length``. A
    row whose prompt alone fills ``max_length`` is dropped. The report counts all three.
    ``source`` names the data in errors; with ``skipped``, a row the chat template cannot
    render is collected there and left out instead of raised.

    A :class:`Ranked` record becomes one pair for each two responses its ranking orders, better
    one chosen. Its prompt and each response are tokenized and fitted once, and its pairs share
    the prompt's id list; the report is then an :class:`ExpansionReport`.
    """
    budget = (max_length, max_prompt_length, truncation)
    encoded, report = tokenize_and_fit(pairs, tokenizer, budget, source, skipped)
    if not any(isinstance(record, Ranked) for record in pairs):
        return [EncodedPair(e.prompt, *e.responses, row=e.row) for e in encoded], report
    expanded = [
        EncodedPair(e.prompt, e.responses[better], e.responses[worse], row=e.row)
        for e in encoded
        for better, worse in preferences(e.record.ranking)
    ]
    identical = sum(pair.chosen_ids == pair.rejected_ids for pair in expanded)
    tied = sum(tied_pairs(e.record.ranking) for e in encoded)
    report = replace(report, identical=identical)
    return expanded, ExpansionReport(**vars(report), pairs=len(expanded), tied=tied)


def encode_demos(
    demos: Sequence[Demo],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int | None,
    truncation: str = "keep_end",
    *,
    source: str = "data",
    skipped: list[DataError] | None = None,
) -> tuple[list[EncodedDemo], TruncationReport]:
    """Token ids for each demonstration, fitted to the budget exactly as in ``encode_pairs``."""
    budget = (max_length, max_prompt_length, truncation)
    encoded, report = tokenize_and_fit(demos, tokenizer, budget, source, skipped)
    return [EncodedDemo(e.prompt, *e.responses, row=e.row) for e in encoded], report


def tokenize_and_fit(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    budget: tuple[int, int | None, str],
    source: str,
    skipped: list[DataError] | None,
) -> tuple[list[Tokenized], TruncationReport]:
    """``records`` tokenized (:func:`tokenized`) and fitted to ``budget`` = (max_length,
    max_prompt_length, truncation), which is checked before any tokenizing: the steps every
    ``encode_*`` function shares. Each batch is fitted as it is tokenized, so only its
    untruncated ids are held at once."""
    return fit(tokenized(records, tokenizer, source, skipped), *budget)


def tokenize(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    source: str = "data",
    skipped: list[DataError] | None = None,
) -> list[Tokenized]:
    """Untruncated ids of each record's prompt and of each of its ``responses`` (chosen and
    rejected, a ranked record's responses, or a completion)."""
    return list(tokenized(records, tokenizer, source, skipped))


def tokenized(
    records: Sequence[Record],
    tokenizer: PreTrainedTokenizerBase,
    source: str = "data",
    skipped: list[DataError] | None = None,
) -> Iterator[Tokenized]:
    """:func:`tokenize`, lazily, a batch of about ``BATCH_CHARACTERS`` of text at a time."""
    if tokenizer.eos_token_id is None:
        raise PreftuneError("the tokenizer has no EOS token; responses need one to end on")
    for batch in _batches(records):
        yield from _tokenize(batch, tokenizer, source, skipped)


def check_budget(max_length: int, max_prompt_length: int | None, truncation: str) -> None:
    """The length settings are usable; checked before any tokenizing."""
    if truncation not in TRUNCATIONS:
        expected = " or ".join(repr(name) for name in TRUNCATIONS)
        raise ConfigError(f"data.truncation: expected {expected}, got {truncation!r}")
    if max_length < 1:
        raise ConfigError(f"data.max_length: expected at least 1 token, got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 0:
        raise ConfigError(f"data.max_prompt_length: expected 0 or more, got {max_prompt_length}")


def fit(
    examples: Iterable[Tokenized], max_length: int, max_prompt_length: int | None, truncation: str
) -> tuple[list[Tokenized], TruncationReport]:
    """The examples cut to the length budget (see ``encode_pairs``) and what that did; the
    budget is checked before the first example is taken."""
    check_budget(max_length, max_prompt_length, truncation)
    kept: list[Tokenized] = []
    rows = prompts_cut = responses_cut = identical = 0
    for example in examples:
        rows += 1
        prompt, responses = example.prompt, example.responses
        prompt_cut = max_prompt_length is not None and len(prompt) > max_prompt_length
        if prompt_cut:
            start = len(prompt) - max_prompt_length if truncation == "keep_end" else 0
            prompt = prompt[start : start + max_prompt_length]
        room = max_length - len(prompt)
        if room < 1:
            continue
        prompts_cut += prompt_cut
        responses_cut += any(len(response) > room for response in responses)
        cut = [response[:room] for response in responses]
        identical += len(cut) > 1 and all(response == cut[0] for response in cut)
        kept.append(replace(example, prompt=prompt, responses=cut))
    report = TruncationReport(
        rows=rows,
        prompts_truncated=prompts_cut,
        responses_truncated=responses_cut,
        dropped=rows - len(kept),
        kept=len(kept),
        identical=identical,
    )
    return kept, report


class _Unrenderable(Exception):
    """An example the chat template cannot render; turned into a ``DataError`` by the caller."""


def _batches(records: Sequence[Record]) -> Iterator[list[tuple[int, Record]]]:
    """``records`` with their indices, in runs that each end with the record that brings their
    text to ``BATCH_CHARACTERS``."""
    batch: list[tuple[int, Record]] = []
    size = 0
    for index, record in enumerate(records):
        batch.append((index, record))
        size += sum(_characters(text) for text in (record.prompt, *record.responses))
        if size >= BATCH_CHARACTERS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _characters(text: Text) -> int:
    return len(text) if isinstance(text, str) else sum(len(m["content"]) for m in text)


def _tokenize(
    batch: list[tuple[int, Record]],
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    skipped: list[DataError] | None,
) -> list[Tokenized]:
    """Untruncated ids of one batch; its texts are rendered first so the tokenizer takes them
    together."""
    rendered = []
    for index, record in batch:
        try:
            rendered.append((*_render(record.prompt, tuple(record.responses), tokenizer), record))
        except _Unrenderable as error:
            keep_or_raise(_render_error(source, record.row, index, str(error)), skipped)
    chats = [chat for _, _, chat, _ in rendered]
    # Plain prompts take the tokenizer's own special tokens (BOS); a chat template renders its own.
    prompt_ids: list[list[int]] = [[] for _ in rendered]
    for chat in (False, True):
        indices = [index for index, is_chat in enumerate(chats) if is_chat == chat]
        texts = [rendered[index][0] for index in indices]
        for index, ids in zip(indices, _ids(tokenizer, texts, not chat), strict=True):
            prompt_ids[index] = ids
    response_texts = [text for _, responses, _, _ in rendered for text in responses]
    response_ids = iter(_ids(tokenizer, response_texts, False))
    eos = tokenizer.eos_token_id
    encoded = []
    for prompt, (_, responses, chat, record) in zip(prompt_ids, rendered, strict=True):
        finished = []
        for ids in (next(response_ids) for _ in responses):
            # A chat template's end-of-turn may already be the EOS; plain text ends on EOS.
            has_eos = eos in ids if chat else ids[-1:] == [eos]
            finished.append(ids if has_eos else [*ids, eos])
        encoded.append(Tokenized(prompt, finished, record.row, record))
    return encoded


def _render_error(source: str, row: int | None, index: int, message: str) -> DataError:
    if row is None:
        return DataError("chat template", f"example {index + 1}: {message}")
    return DataError(source, f"chat template: {message}", row=row)


def _ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], specials: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=specials)["input_ids"]


def _render(
    prompt: Text, responses: tuple[Text, ...], tokenizer: PreTrainedTokenizerBase
) -> tuple[str, list[str], bool]:
    """The prompt text, each response's text, and whether they came from a chat template."""
    chat = isinstance(prompt, list)
    if any(isinstance(response, list) != chat for response in responses):
        raise _Unrenderable("prompt and responses must all be text or all be conversations")
    if not chat:
        return prompt, list(responses), False
    if tokenizer.chat_template is None:
        raise PreftuneError(
            "the data is conversational but the tokenizer has no chat template; "
            "set one on the tokenizer or convert the data to plain prompt/response text"
        )
    prompt_text = _apply_template(tokenizer, prompt, add_generation_prompt=True)
    texts = []
    for response in responses:
        full = _apply_template(tokenizer, [*prompt, *response], add_generation_prompt=False)
        if not full.startswith(prompt_text):
            raise _Unrenderable(
                "rendering prompt+response does not start with the rendered prompt, so the "
                "response cannot be split off; use a template that renders a conversation's "
                "earlier turns the same whatever follows"
            )
        texts.append(full[len(prompt_text) :])
    return prompt_text, texts, True


def _apply_template(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], add_generation_prompt: bool
) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as error:  # a template is code shipped with the model; any failure is data's
        text = " ".join(str(error).split()) or type(error).__name__
        raise _Unrenderable(f"the chat template failed: {text}") from None
