"""Attention masks for laid-out batches, in the form the model's attention kernel takes."""

from __future__ import annotations

import torch

from preftune.data.layout import attention_allowed
from preftune.errors import ConfigError

# Kernels that take an arbitrary (rows, 1, L, L) mask. Flash-attention kernels only know causal
# and variable-length masks, which cannot keep a rejected response from seeing the chosen one.
DENSE_MASK_KERNELS = ("sdpa", "eager")


def layout_mask(model: torch.nn.Module, doc_ids: torch.Tensor, branch: torch.Tensor):
    """The mask of :func:`attention_allowed` for this model's attention implementation.

    SDPA takes booleans (True: attend); eager attention adds a float mask to its scores; flex
    attention takes a block mask, which skips blocks no token attends to.
    """
    kernel = attention_kernel(model)
    if kernel == "flex_attention":
        return _block_mask(doc_ids, branch)
    if kernel not in DENSE_MASK_KERNELS:
        raise ConfigError(
            f"attention '{kernel}' cannot mask prefix-shared or packed pairs: set "
            f"model.attn_implementation to sdpa or flex_attention, or speed.prefix_sharing=false "
            f"and speed.packing=false"
        )
    allowed = attention_allowed(doc_ids, branch)
    if kernel == "sdpa":
        return allowed
    dtype = _compute_dtype(model)
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def attention_kernel(model: torch.nn.Module) -> str:
    config = getattr(inner_model(model), "config", None)
    return getattr(config, "_attn_implementation", None) or "eager"


def _block_mask(doc_ids: torch.Tensor, branch: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, k):
        same_doc = doc_ids[b, q] == doc_ids[b, k]
        same_branch = (branch[b, k] == 0) | (branch[b, q] == branch[b, k])
        return same_doc & same_branch & (k <= q)

    rows, length = doc_ids.shape
    return create_block_mask(mask_mod, rows, None, length, length, device=doc_ids.device)


def _compute_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside distributed and adapter wrappers."""
    while hasattr(model, "module"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model
