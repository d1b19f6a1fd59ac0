"""Which speed levers a paired objective uses on a given model: every lever is exact where it
stands, so all are on by default, and one that cannot be exact on a model turns itself off."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from preftune.models.attention import (
    VARLEN_ROW,
    attention_kernel,
    check_kernel,
    inner_model,
    is_varlen,
)
from preftune.models.layout_check import check_layout
from preftune.models.logps import chunk_rows_of
from preftune.objectives.settings import LayoutSettings


@dataclass(frozen=True)
class PairScoring:
    """How a paired objective lays out and scores a micro-batch: the levers in effect for one
    model. With neither layout lever, pairs are two right-padded rows each under a 2-D mask,
    and with ``logits_chunk`` 0 they are scored from the model's full logits: the plain
    computation."""

    prefix_sharing: bool = False
    packing: bool = False
    pack_length: int = 0
    logits_chunk: int = 0
    documents: bool = True

    @classmethod
    def from_config(cls, speed: LayoutSettings) -> PairScoring:
        return cls(
            prefix_sharing=speed.prefix_sharing,
            packing=speed.packing,
            pack_length=speed.pack_length,
            logits_chunk=chunk_rows_of(speed.logits_chunk),
            documents=speed.attention == "documents",
        )

    @property
    def laid_out(self) -> bool:
        return self.prefix_sharing or self.packing


def choose_scoring(model: torch.nn.Module, speed: LayoutSettings) -> tuple[PairScoring, str | None]:
    """The levers of ``speed`` that are exact on ``model``, and a line saying which were turned
    off and why (None when all stand).

    Flash-attention kernels take packed documents through position ids, in one row; they
    cannot express prefix sharing, which is an error. Any other model is checked on made-up
    pairs (:func:`~preftune.models.layout_check.check_layout`): if laid-out pairs would not score
    as each sequence alone, both layout levers are turned off.
    """
    scoring = PairScoring.from_config(speed)
    if not scoring.laid_out:
        return scoring, None
    kernel = attention_kernel(model)
    check_kernel(kernel, scoring.prefix_sharing)
    if is_varlen(kernel):
        return replace(scoring, pack_length=VARLEN_ROW), None
    reason, masks = check_layout(model, scoring.prefix_sharing, scoring.packing, scoring.documents)
    if reason is None:
        if masks is not None and masks.dense == 0 and scoring.packing and not scoring.pack_length:
            # Every layer attends document by document, with no (L, L) mask: one row holds
            # every document of a micro-batch, so no position is padding.
            scoring = replace(scoring, pack_length=VARLEN_ROW)
        return scoring, None
    levers = [
        name
        for name, on in (("prefix_sharing", speed.prefix_sharing), ("packing", speed.packing))
        if on
    ]
    named = " and ".join(f"speed.{lever}" for lever in levers)
    model_type = getattr(inner_model(model).config, "model_type", type(model).__name__)
    return replace(scoring, prefix_sharing=False, packing=False), (
        f"{named}: off for this model ({model_type}): {reason}; pairs are scored as plain "
        "padded rows"
    )
