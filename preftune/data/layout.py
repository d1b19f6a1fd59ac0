"""Lay a micro-batch of pairs out as token rows for one forward pass, without padding waste.

Three exact ways to lay out ``B`` pairs, combinable:

* plain: ``2B`` documents, ``prompt + chosen`` and ``prompt + rejected``;
* prefix sharing: ``B`` documents, ``prompt + chosen + rejected``, where the rejected tokens see
  the prompt but not the chosen response, and their positions restart where the prompt ends; so
  each rejected token is computed exactly as in ``prompt + rejected`` while the prompt is
  computed once;
* packing: documents are packed first-fit-decreasing into rows of at most ``pack_length``
  tokens; a token sees only earlier tokens of its own document.

Every token carries a document id and a branch (0 prompt, 1 chosen, 2 rejected): token ``i``
attends to token ``j`` when both are in the same document, ``j`` comes no later than ``i`` and
``j`` is in the prompt or in ``i``'s own branch (:func:`visibility`); the model adds its own
causal order, window or chunking on the tokens' positions within their documents (see
:mod:`preftune.models.attention`). Scoring is explicit: for each response token,
the flat index of the position whose output predicts it, its id, and which sequence (chosen
``0..B-1``, rejected ``B..2B-1``) it belongs to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from preftune.data.collate import label_smoothing, reference_logps
from preftune.data.encode import EncodedPair

PROMPT, CHOSEN, REJECTED = 0, 1, 2
PAD_DOC = -1
# A mask function as transformers and flex attention take it: (row, head, q, k) -> allowed.
MaskFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class _Doc:
    """One document's tokens and what to score in it, with positions relative to its start."""

    ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    branches: list[int] = field(default_factory=list)
    # (offset of the predicting token, target id, sequence index)
    scores: list[tuple[int, int, int]] = field(default_factory=list)

    def extend(self, ids: Sequence[int], start_position: int, branch: int) -> None:
        self.ids.extend(ids)
        self.positions.extend(range(start_position, start_position + len(ids)))
        self.branches.extend([branch] * len(ids))


def _response(doc: _Doc, prompt_len: int, response: Sequence[int], branch: int, seq: int) -> None:
    """Append a response that continues the prompt, scoring each of its tokens.

    Its first token is predicted by the prompt's last token; each later one by the token before
    it, which sits wherever this branch was placed in the document.
    """
    start = len(doc.ids)
    doc.extend(response, prompt_len, branch)
    for k, target in enumerate(response):
        source = (prompt_len - 1) if k == 0 else start + k - 1
        if source >= 0:
            doc.scores.append((source, target, seq))


def pair_documents(examples: Sequence[EncodedPair], share_prefix: bool) -> list[_Doc]:
    """The documents of a micro-batch, chosen sequences numbered first, then rejected."""
    count = len(examples)
    docs: list[_Doc] = []
    for i, pair in enumerate(examples):
        prompt = pair.prompt_ids
        if share_prefix:
            doc = _Doc()
            doc.extend(prompt, 0, PROMPT)
            _response(doc, len(prompt), pair.chosen_ids, CHOSEN, i)
            _response(doc, len(prompt), pair.rejected_ids, REJECTED, count + i)
            docs.append(doc)
            continue
        for response, branch, seq in (
            (pair.chosen_ids, CHOSEN, i),
            (pair.rejected_ids, REJECTED, count + i),
        ):
            doc = _Doc()
            doc.extend(prompt, 0, PROMPT)
            _response(doc, len(prompt), response, branch, seq)
            docs.append(doc)
    return docs


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: groups of document indices whose lengths sum to at most
    ``capacity`` (a longer document gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for row, free in enumerate(room):
            if lengths[index] <= free:
                rows[row].append(index)
                room[row] -= lengths[index]
                break
        else:
            rows.append([index])
            room.append(capacity - lengths[index])
    return rows


def layout_pairs(
    examples: Sequence[EncodedPair],
    pad_id: int,
    share_prefix: bool = True,
    packing: bool = True,
    pack_length: int = 0,
) -> dict[str, torch.Tensor]:
    """Rows for one forward pass over ``examples``.

    Returns ``input_ids``, ``position_ids``, ``doc_ids`` (``-1`` on padding) and ``branch``,
    each (rows, length); ``score_index``, ``score_target`` and ``score_seq``, each (tokens
    scored,); ``num_sequences`` (1,) = 2B; and ``num_tokens`` (1,), the tokens of the pairs as
    ``prompt + response`` sequences, the work a plain layout would do without its padding;
    ``reference_logps`` (2B,) when the pairs carry them; and ``label_smoothing`` (B,) when they
    carry their chosen probabilities.
    ``pack_length`` 0 packs into rows as long as the longest document.
    """
    docs = pair_documents(examples, share_prefix)
    lengths = [len(doc.ids) for doc in docs]
    longest = max(lengths, default=0)
    if packing:
        rows = pack(lengths, max(pack_length, longest))
    else:
        rows = [[index] for index in range(len(docs))]
    width = max((sum(lengths[i] for i in row) for row in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    doc_ids = torch.full((len(rows), width), PAD_DOC, dtype=torch.long)
    branch = torch.zeros((len(rows), width), dtype=torch.long)
    index, target, seq = [], [], []
    for r, row in enumerate(rows):
        offset = 0
        for d in row:
            doc, end = docs[d], offset + lengths[d]
            input_ids[r, offset:end] = torch.tensor(doc.ids, dtype=torch.long)
            position_ids[r, offset:end] = torch.tensor(doc.positions, dtype=torch.long)
            doc_ids[r, offset:end] = d
            branch[r, offset:end] = torch.tensor(doc.branches, dtype=torch.long)
            for source, token, sequence in doc.scores:
                index.append(r * width + offset + source)
                target.append(token)
                seq.append(sequence)
            offset = end
    tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in examples)
    laid_out = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "doc_ids": doc_ids,
        "branch": branch,
        "score_index": torch.tensor(index, dtype=torch.long),
        "score_target": torch.tensor(target, dtype=torch.long),
        "score_seq": torch.tensor(seq, dtype=torch.long),
        "num_sequences": torch.tensor([2 * len(examples)]),
        "num_tokens": torch.tensor([tokens]),
    }
    return laid_out | reference_logps(examples) | label_smoothing(examples)


def visibility(doc_ids: torch.Tensor, branch: torch.Tensor) -> MaskFunction:
    """What a token may see in laid-out rows, as a mask function ``(row, head, q, k) -> bool``
    over index tensors that broadcast (the form transformers' mask builders and flex attention
    take): the same document, ``k`` no later than ``q``, and ``k`` in the prompt or in ``q``'s own
    branch. Padding (document ``-1``) sees earlier padding only, so no row of a mask is empty.

    Causal order and any window are the model's to add, on positions within the document.
    """

    def visible(row: torch.Tensor, head: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        same_doc = doc_ids[row, q] == doc_ids[row, k]
        same_branch = (branch[row, k] == PROMPT) | (branch[row, q] == branch[row, k])
        return same_doc & same_branch & (k <= q)

    return visible


def attention_allowed(doc_ids: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """(rows, 1, L, L) bool: :func:`visibility` evaluated at every pair of positions."""
    rows, length = doc_ids.shape
    row = torch.arange(rows, device=doc_ids.device)[:, None, None, None]
    head = torch.zeros(1, dtype=torch.long, device=doc_ids.device)[None, :, None, None]
    index = torch.arange(length, device=doc_ids.device)
    return visibility(doc_ids, branch)(row, head, index[None, None, :, None], index)
