"""Attention over laid-out rows, with every layer's attention pattern as the model defines it.

A model built on transformers asks its mask builders for one mask per kind of layer it has
(causal; sliding-window, Mistral, Qwen2, Gemma 2/3, Phi-3; chunked, …), each described by a mask
function of query and key index. Within :func:`layout_attention` those requests are answered for
the laid-out rows instead: the model's own mask function is applied to the tokens' positions in
their documents (where a plain forward of each sequence alone would have them) and intersected
with the layout's :func:`~preftune.data.layout.visibility`. Each layer type thus keeps its window,
chunking or whatever else its function encodes, and the mask takes whatever form the kernel
needs (booleans for sdpa, additive floats for eager, a block mask for flex attention).

Under sdpa, a layer whose mask is the plain causal one (the model's mask function is the causal
function itself, and the layer adds no window, soft cap or sink) does not attend through a
dense (rows, 1, L, L) mask: :func:`document_attention` calls the kernel once per document with
its own causal flag, and once per further branch of a prefix-shared document on the prompt's
keys and its own, so no work is spent on pairs of positions the mask would hide. Its mask is a
placeholder of the right shape holding no memory, built dense only for a layer that turns out
to need it; when the model asks for no other mask, a micro-batch is packed into one row
(see :func:`~preftune.objectives.speed.choose_scoring`), so no position is padding.

Flash-attention kernels take no mask: they read document boundaries from position ids in a
single packed row (the variable-length route), which expresses packing but not prefix sharing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    and_masks,
    causal_mask_function,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from preftune.data.layout import PAD_DOC, PROMPT, visibility
from preftune.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Kernels whose masks transformers builds from a mask function: any pattern can be expressed.
MASKED_KERNELS = ("sdpa", "eager", "flex_attention")
# Flash-attention kernels read packed documents from one row only: a pack length that puts
# every document of a micro-batch into it.
VARLEN_ROW = 1 << 30


def is_varlen(kernel: str) -> bool:
    """Flash-attention kernels, which see documents only through position ids."""
    return kernel.startswith("flash_attention")


def attention_kernel(model: torch.nn.Module) -> str:
    config = getattr(inner_model(model), "config", None)
    return getattr(config, "_attn_implementation", None) or "eager"


def check_kernel(kernel: str, prefix_sharing: bool) -> None:
    """A one-line error when ``kernel`` cannot express the pair layouts asked of it."""
    if is_varlen(kernel) and prefix_sharing:
        raise ConfigError(
            f"attention '{kernel}' cannot keep a rejected response from seeing the chosen one: "
            "set speed.prefix_sharing=false (packing still works, by position ids), or "
            "model.attn_implementation to sdpa or flex_attention"
        )
    if not is_varlen(kernel) and kernel not in MASKED_KERNELS:
        raise ConfigError(
            f"attention '{kernel}' cannot mask prefix-shared or packed pairs: set "
            "model.attn_implementation to sdpa, eager or flex_attention, or "
            "speed.prefix_sharing=false and speed.packing=false"
        )


class LayoutAttention:
    """Counts the mask requests answered for laid-out rows (a forward that made none built its
    masks some other way, and the layout did not reach it), and those answered with a dense
    mask (the rest are attended document by document)."""

    def __init__(self) -> None:
        self.requests = 0
        self.dense = 0


@contextmanager
def layout_attention(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], documents: bool = True
) -> Iterator[tuple[dict[str, Any], LayoutAttention]]:
    """Within the context, ``model`` attends over ``batch``'s rows (from
    :func:`~preftune.data.layout.layout_pairs`) as each sequence alone would. Yields the keyword
    arguments of the forward (``attention_mask``, ``position_ids``) and a request counter.
    ``documents``: sdpa layers with the plain causal mask attend document by document
    (:func:`document_attention`); without, every layer attends through its dense mask."""
    kernel = attention_kernel(model)
    positions, doc_ids, branch = batch["position_ids"], batch["doc_ids"], batch["branch"]
    counter = LayoutAttention()
    if is_varlen(kernel):
        # The kernel starts a document wherever a position is 0, and only in a single row.
        steps = positions[:, 1:] - positions[:, :-1]
        check_kernel(kernel, bool(((steps != 1) & (positions[:, 1:] != 0)).any()))
        if positions.shape[0] != 1:
            raise RuntimeError(f"attention '{kernel}' reads packed documents from one row only")
        yield {"attention_mask": None, "position_ids": positions}, counter
        return
    check_kernel(kernel, True)
    build = ALL_MASK_ATTENTION_FUNCTIONS[kernel]
    visible = visibility(doc_ids, branch)

    def in_documents(mask_function):
        def on_positions(row, head, q, k):
            return mask_function(row, head, positions[row, q], positions[row, k])

        return and_masks(on_positions, visible)

    segments: list[Segments] = []

    def layout_mask(*args: Any, mask_function, **kwargs: Any):
        counter.requests += 1
        # Never skip the mask in favour of a kernel's own causal flag, and build it by
        # broadcasting: every function involved is an index lookup.
        kwargs |= {"allow_is_causal_skip": False, "use_vmap": False}
        dense = partial(build, *args, mask_function=in_documents(mask_function), **kwargs)
        by_documents = documents and kernel == "sdpa" and mask_function is causal_mask_function
        if not by_documents or args or "q_length" not in kwargs:
            counter.dense += 1
            return dense()
        if not segments:
            segments.append(Segments(doc_ids, branch, kwargs.get("device", doc_ids.device)))
        # A mask of the right shape that holds no memory, carrying the documents (and how to
        # build the dense mask, for a layer that turns out to need it). Carried by the mask
        # itself, so a layer recomputed in backward (gradient checkpointing, after this
        # context) attends as it did in the forward.
        shape = (kwargs["batch_size"], 1, kwargs["q_length"], kwargs["kv_length"])
        mask = torch.ones((), dtype=torch.bool, device=kwargs.get("device")).expand(shape)
        setattr(mask, SEGMENTS, segments[0])
        setattr(mask, DENSE, _built_once(dense, counter))
        return mask

    if documents and kernel == "sdpa":
        _install_document_attention()
    masks = ALL_MASK_ATTENTION_FUNCTIONS._local_mapping
    previous = masks.get(kernel)
    masks[kernel] = layout_mask
    try:
        # A 2-D mask of ones makes the model build its masks (a 4-D one would be taken as it
        # is) without reading packed documents from the position ids itself.
        yield {"attention_mask": torch.ones_like(doc_ids), "position_ids": positions}, counter
    finally:
        if previous is None:
            del masks[kernel]
        else:
            masks[kernel] = previous


# The attributes of a plain causal layout mask: its rows' documents, and how to build it dense.
SEGMENTS = "_preftune_segments"
DENSE = "_preftune_dense"


def _built_once(build: Callable[[], torch.Tensor], counter: LayoutAttention):
    """``build`` run at the first call alone (every layer that asks gets that mask), and
    counted as a dense mask then: a layer that needs one is seen by the layout check."""
    built: list[torch.Tensor] = []

    def once() -> torch.Tensor:
        if not built:
            counter.dense += 1
            built.append(build())
        return built[0]

    return once


def _install_document_attention() -> None:
    """Answer transformers' sdpa requests with :func:`_sdpa`: document by document for a layout
    mask that carries its documents, as transformers' own sdpa for any other (once, for good:
    what it does to every other mask is what sdpa does)."""
    kernels = ALL_ATTENTION_FUNCTIONS._local_mapping
    if kernels.get("sdpa") is not _sdpa:
        kernels["sdpa"] = _sdpa


def _sdpa(module, query, key, value, attention_mask, *args: Any, **kwargs: Any):
    segments = getattr(attention_mask, SEGMENTS, None)
    if segments is None or not _plain_layer(query, key, kwargs):
        if segments is not None:
            attention_mask = getattr(attention_mask, DENSE)()
        sdpa = cast(Callable[..., Any], ALL_ATTENTION_FUNCTIONS._global_mapping["sdpa"])
        return sdpa(module, query, key, value, attention_mask, *args, **kwargs)
    dropout = kwargs.get("dropout", args[0] if args else 0.0)
    scaling = kwargs.get("scaling", args[1] if len(args) > 1 else None)
    return document_attention(query, key, value, segments, dropout, scaling), None


# Keyword arguments a layer may hand its kernel that change what attention computes: a layer
# passing any of them (not None) attends through its mask.
_MODIFIERS = ("softcap", "sliding_window", "s_aux", "sinks", "position_bias")


def _plain_layer(query: torch.Tensor, key: torch.Tensor, kwargs: dict[str, Any]) -> bool:
    """Whether the layer asks for plain causal attention over the whole rows."""
    if any(kwargs.get(name) is not None for name in _MODIFIERS):
        return False
    return kwargs.get("is_causal") is not False and query.shape[2] == key.shape[2]


@dataclass
class _Call:
    """One kernel call of a row: ``queries`` consecutive query positions attending the key runs
    ``keys`` (concatenated), causally from the first key (``allowed`` None) or as ``allowed``
    says ((queries, keys) booleans: a later branch, whose queries start after the prompt)."""

    queries: int
    keys: list[int]
    allowed: torch.Tensor | None = None


class Segments:
    """The documents of laid-out rows as the kernel calls of :func:`document_attention`: per row,
    the lengths of its runs (a document's prompt, each branch, padding), by which its keys are
    split, and its calls, whose queries tile the row in order."""

    def __init__(self, doc_ids: torch.Tensor, branch: torch.Tensor, device: torch.device):
        self.rows: list[tuple[list[int], list[_Call]]] = []
        for docs, branches in zip(doc_ids.tolist(), branch.tolist(), strict=True):
            runs: list[tuple[int, int, int]] = []  # (document, branch, length)
            for doc, part in zip(docs, branches, strict=True):
                if runs and runs[-1][:2] == (doc, part):
                    runs[-1] = (doc, part, runs[-1][2] + 1)
                else:
                    runs.append((doc, part, 1))
            calls: list[_Call] = []
            prompt: tuple[int, int] | None = None  # (run index, length) of the document's prompt
            for index, (doc, part, length) in enumerate(runs):
                starts = index == 0 or runs[index - 1][0] != doc
                if doc == PAD_DOC:
                    calls.append(_Call(length, []))
                elif part == PROMPT:
                    prompt = (index, length)
                    calls.append(_Call(length, [index]))
                elif starts or prompt is None or runs[prompt[0]][0] != doc:
                    prompt = None  # a document without a prompt: one causal run
                    calls.append(_Call(length, [index]))
                elif prompt[0] == index - 1:
                    # The first branch continues its prompt: one causal run.
                    calls[-1] = _Call(prompt[1] + length, [prompt[0], index])
                else:
                    allowed = torch.ones(length, prompt[1] + length, dtype=torch.bool)
                    calls.append(
                        _Call(length, [prompt[0], index], allowed.tril(prompt[1]).to(device))
                    )
            self.rows.append(([run[2] for run in runs], calls))


def document_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: Segments,
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """Attention over laid-out rows, one sdpa call per document (and per further branch of a
    prefix-shared one), each on its own keys: what the dense mask of :func:`layout_attention`
    computes, without the work on the pairs of positions it hides. ``query`` (rows, heads, L,
    dim), ``key`` and ``value`` (rows, key-value heads, L, dim); returns (rows, L, heads, dim),
    as transformers' attention functions do. Padding attends nothing and gives zeros."""
    gqa = query.shape[1] != key.shape[1]
    out_rows = []
    for (run_lengths, calls), q_row, k_row, v_row in zip(
        segments.rows, query.unbind(0), key.unbind(0), value.unbind(0), strict=True
    ):
        queries = q_row.split([call.queries for call in calls], dim=1)
        keys, values = k_row.split(run_lengths, dim=1), v_row.split(run_lengths, dim=1)
        outputs = []
        for call, q in zip(calls, queries, strict=True):
            if not call.keys:  # values may be narrower than queries (latent attention)
                outputs.append(q.new_zeros(*q.shape[:-1], v_row.shape[-1]))
                continue
            k = _joined([keys[i] for i in call.keys])
            v = _joined([values[i] for i in call.keys])
            shared = gqa
            if gqa and call.allowed is not None:
                # A masked call with shared key-value heads would fall to the math kernel on
                # CUDA (the memory-efficient one has no GQA): give each query head its own.
                k, v = (t.repeat_interleave(q.shape[0] // t.shape[0], dim=0) for t in (k, v))
                shared = False
            outputs.append(
                F.scaled_dot_product_attention(
                    q[None],
                    k[None],
                    v[None],
                    attn_mask=call.allowed,
                    dropout_p=dropout,
                    is_causal=call.allowed is None,
                    scale=scaling,
                    enable_gqa=shared,
                )[0]
            )
        out_rows.append(_joined(outputs))
    return torch.stack(out_rows).transpose(1, 2).contiguous()


def _joined(pieces: list[torch.Tensor]) -> torch.Tensor:
    """Pieces of (heads, length, dim) joined along the length (one piece as it is)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def inner_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside distributed and adapter wrappers."""
    # The wrappers are known by their attributes, which torch types only as Tensor | Module.
    inner: Any = model
    while hasattr(inner, "module"):
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner
