"""Attention over laid-out rows, with every layer's attention pattern as the model defines it.

A model built on transformers asks its mask builders for one mask per kind of layer it has
(causal; sliding-window, Mistral, Qwen2, Gemma 2/3, Phi-3; chunked, …), each described by a mask
function of query and key index. Within :func:`layout_attention` those requests are answered for
the laid-out rows instead: the model's own mask function is applied to the tokens' positions in
their documents (where a plain forward of each sequence alone would have them) and intersected
with the layout's :func:`~preftune.data.layout.visibility`. Each layer type thus keeps its window,
chunking or whatever else its function encodes, and the mask takes whatever form the kernel
needs (booleans for sdpa, additive floats for eager, a block mask for flex attention).

Flash-attention kernels take no mask: they read document boundaries from position ids in a
single packed row (the variable-length route), which expresses packing but not prefix sharing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, and_masks

from preftune.data.layout import visibility
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
    """Counts the mask requests answered for laid-out rows: a forward that made none built its
    masks some other way, and the layout did not reach it."""

    def __init__(self) -> None:
        self.requests = 0


@contextmanager
def layout_attention(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> Iterator[tuple[dict[str, Any], LayoutAttention]]:
    """Within the context, ``model`` attends over ``batch``'s rows (from
    :func:`~preftune.data.layout.layout_pairs`) as each sequence alone would. Yields the keyword
    arguments of the forward (``attention_mask``, ``position_ids``) and a request counter."""
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

    def layout_mask(*args: Any, mask_function, **kwargs: Any):
        counter.requests += 1
        # Never skip the mask in favour of a kernel's own causal flag, and build it by
        # broadcasting: every function involved is an index lookup.
        kwargs |= {"allow_is_causal_skip": False, "use_vmap": False}
        return build(*args, mask_function=in_documents(mask_function), **kwargs)

    mapping = ALL_MASK_ATTENTION_FUNCTIONS._local_mapping
    previous = mapping.get(kernel)
    mapping[kernel] = layout_mask
    try:
        # A 2-D mask of ones makes the model build its masks (a 4-D one would be taken as it
        # is) without reading packed documents from the position ids itself.
        yield {"attention_mask": torch.ones_like(doc_ids), "position_ids": positions}, counter
    finally:
        if previous is None:
            del mapping[kernel]
        else:
            mapping[kernel] = previous


def inner_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside distributed and adapter wrappers."""
    # The wrappers are known by their attributes, which torch types only as Tensor | Module.
    inner: Any = model
    while hasattr(inner, "module"):
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner
