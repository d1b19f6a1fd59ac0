"""Records into token ids: texts rendered (a conversation through the tokenizer's chat
template) and tokenized in batches, untruncated.

The prompt and each response are tokenized separately and concatenated, so the prompt's ids are
exactly a prefix of every prompt+response sequence: no token merges across the boundary, and
the response tokens a loss is taken over are the same for chosen and rejected.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

from transformers import PreTrainedTokenizerBase

from preftune.data.records import Message, Record, Text
from preftune.data.sources import keep_or_raise
from preftune.errors import DataError, PreftuneError

BATCH_CHARACTERS = 2**18
"""About how much text goes to the tokenizer at once: plenty to keep its threads busy, while its
working memory, 100 to 200 bytes per character, stays small however large the dataset."""


@dataclass
class Tokenized:
    """Untruncated ids of one example: its prompt and each response, its source row, and the
    record it was tokenized from."""

    prompt: list[int]
    responses: list[list[int]]
    row: int | None
    record: Record | None = field(default=None, compare=False, repr=False)


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
    plain = [response for response in responses if isinstance(response, str)]
    if isinstance(prompt, str) and len(plain) == len(responses):
        return prompt, plain, False
    conversations = [response for response in responses if isinstance(response, list)]
    if isinstance(prompt, str) or len(conversations) != len(responses):
        raise _Unrenderable("prompt and responses must all be text or all be conversations")
    if tokenizer.chat_template is None:
        raise PreftuneError(
            "the data is conversational but the tokenizer has no chat template: set "
            "model.chat_template (chatml, llama3, zephyr, a Jinja file or a template), or "
            "convert the data to plain prompt/response text"
        )
    prompt_text = _apply_template(tokenizer, prompt, add_generation_prompt=True)
    texts = []
    for response in conversations:
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
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as error:  # a template is code shipped with the model; any failure is data's
        text = " ".join(str(error).split()) or type(error).__name__
        raise _Unrenderable(f"the chat template failed: {text}") from None
    # transformers types the result of every mode at once; without tokenize it is the text.
    return cast(str, rendered)
