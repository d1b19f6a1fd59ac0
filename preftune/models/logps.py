"""Per-sequence log-probabilities of the labelled tokens of a batch."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from preftune.models.attention import inner_model, layout_attention

IGNORE = -100
# ``chunk_rows`` meaning "chunked only when the logits would not fit" (``speed.logits_chunk=auto``)
AUTO = -1
# Response positions per chunk when the logits are chunked and no size is given.
CHUNK = 1024
# Bytes per (position, vocabulary entry) while scoring: the logits in float32, their
# log-softmax kept for backward, its gradient, and the layer's own output.
SCORING_BYTES = 16


def chunk_rows_of(setting: int | str) -> int:
    """``speed.logits_chunk`` as ``chunk_rows``: ``auto`` as :data:`AUTO`, a number as it is."""
    return AUTO if setting == "auto" else int(setting)


def memory_budget(device: torch.device) -> int:
    """Bytes the logits of one micro-batch may take at once: a quarter of the memory free on
    ``device`` now (of the memory the system reports available, on a CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 30


def sequence_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_rows: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log π(token | prefix) over each row's labelled tokens, and how many there are.

    ``batch`` holds ``input_ids``, ``attention_mask`` (2-D) and unshifted ``labels`` (``-100``
    where a token is not scored), each (rows, length). Returns two (rows,) tensors: summed
    log-probs in float32 and token counts. ``chunk_rows`` 0 scores from the model's own logits
    (the plain computation); otherwise the output layer runs on the labelled positions only, as
    :func:`layout_logps` does.
    """
    labels = batch["labels"][:, 1:]
    scored = labels != IGNORE
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if chunk_rows == 0:
        logits = model(**inputs, use_cache=False).logits
        token_logps = -F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1),
            labels.flatten(),
            ignore_index=IGNORE,
            reduction="none",
        ).view_as(labels)
        return (token_logps * scored).sum(-1), scored.sum(-1)
    rows, width = batch["labels"].shape
    row, column = scored.nonzero(as_tuple=True)
    positions = ScoredPositions(row * width + column, labels[scored], row, rows, chunk_rows)
    return positions.forward(model, inputs), scored.sum(-1)


def layout_logps(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    chunk_rows: int = 0,
    documents: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and token counts per sequence of a batch from ``layout_pairs``.

    The decoder runs once over the laid-out rows, each layer attending as the model defines it
    (see :func:`~preftune.models.attention.layout_attention`); the output layer then runs only
    on the positions that predict a response token. ``chunk_rows`` > 0 takes those positions
    that many at a time and recomputes each chunk's logits in the backward pass, so no
    (tokens × vocabulary) tensor larger than one chunk ever exists; :data:`AUTO` takes them all
    at once, kept for backward, when their logits fit in :func:`memory_budget`, and chunks them
    by :data:`CHUNK` when not; 0 applies the output layer to every position of every row at
    once, as a plain forward does. ``documents``: see
    :func:`~preftune.models.attention.layout_attention`.
    """
    sequences = int(batch["num_sequences"].sum())
    seq = batch["score_seq"]
    positions = ScoredPositions(
        batch["score_index"], batch["score_target"], seq, sequences, chunk_rows
    )
    with layout_attention(model, batch, documents) as (inputs, _):
        sums = positions.forward(model, {"input_ids": batch["input_ids"], **inputs})
    return sums, torch.bincount(seq, minlength=sequences)


def _scored_sums(
    head: OutputLayer,
    hidden: torch.Tensor,
    index: torch.Tensor,
    target: torch.Tensor,
    seq: torch.Tensor,
    sequences: int,
    chunk_rows: int,
) -> torch.Tensor:
    """(sequences,) float32: the log-prob of each ``target`` token, predicted by the final hidden
    state at flat position ``index``, summed per sequence ``seq``."""
    if chunk_rows == AUTO:
        need = index.numel() * head.vocabulary * SCORING_BYTES
        chunk_rows = CHUNK if need > memory_budget(hidden.device) else 0
        recompute = chunk_rows > 0
        chunk_rows = chunk_rows or max(index.numel(), 1)
    else:
        recompute = True
    if chunk_rows > 0:
        hidden = hidden.flatten(0, 1).index_select(0, index)
        parts = [
            _checkpointed(
                head, hidden[start : start + chunk_rows], target[start:][:chunk_rows], recompute
            )
            for start in range(0, hidden.shape[0], chunk_rows)
        ]
        if not parts:
            token_logps = hidden.new_zeros(0, dtype=torch.float32)
        else:
            token_logps = parts[0] if len(parts) == 1 else torch.cat(parts)
    else:
        logits = head.logits(hidden).flatten(0, 1).index_select(0, index)
        token_logps = -F.cross_entropy(logits, target, reduction="none")
    sums = torch.zeros(sequences, dtype=torch.float32, device=token_logps.device)
    return sums.index_add(0, seq, token_logps.float())


def _checkpointed(
    head: OutputLayer, hidden: torch.Tensor, target: torch.Tensor, recompute: bool
) -> torch.Tensor:
    """The chunk's token log-probs; recomputed in backward with ``recompute`` (under grad)."""
    if not (recompute and torch.is_grad_enabled()):
        return head.token_logps(hidden, target)
    return checkpoint(head.token_logps, hidden, target, use_reentrant=False)


class OutputLayer:
    """The model's output layer and the logit transforms its forward applies after it."""

    def __init__(self, model: torch.nn.Module) -> None:
        inner = inner_model(model)
        self.layer: torch.nn.Module = inner.get_output_embeddings()
        weight = self.layer.weight
        # A weight partitioned by DeepSpeed ZeRO-3 is empty outside its forward; it keeps its
        # whole shape as ds_shape.
        self.vocabulary = int(getattr(weight, "ds_shape", weight.shape)[0])
        config = inner.config
        self.scale = getattr(config, "logit_scale", None)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.layer(hidden).float()
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def token_logps(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(self.logits(hidden), target, reduction="none")


class ScoredPositions:
    """The output layer run on chosen positions only, inside the model's own forward.

    For the forward called in :meth:`forward`, the output layer takes its input (the final
    hidden states of every position), scores the ``target`` token at each flat position of
    ``index`` (summed into sequence ``seq``; in chunks of ``chunk_rows`` recomputed in backward,
    or all at once with 0) and returns an empty projection: the full-vocabulary logits of every
    position are never computed. Scoring inside the forward, with the model's forward called
    as a whole (through any distributed wrapper), means the layer's weights are those the
    engine has gathered for it, and gradient synchronisation stays in place.
    """

    def __init__(
        self,
        index: torch.Tensor,
        target: torch.Tensor,
        seq: torch.Tensor,
        sequences: int,
        chunk_rows: int,
    ) -> None:
        self.index, self.target, self.seq = index, target, seq
        self.sequences, self.chunk_rows = sequences, chunk_rows
        self._sums: torch.Tensor | None = None

    def forward(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """(sequences,) float32 summed log-probs, from one forward of ``model`` on ``inputs``."""
        head = OutputLayer(model)

        scoring = False

        def score(module: torch.nn.Module, args: tuple) -> tuple | None:
            nonlocal scoring
            if scoring:
                return None  # the layer, called by the scoring below: let it run as it is
            scoring = True
            hidden = args[0]
            self._sums = _scored_sums(
                head, hidden, self.index, self.target, self.seq, self.sequences, self.chunk_rows
            )
            scoring = False
            return (hidden[..., :0, :], *args[1:])

        handle = head.layer.register_forward_pre_hook(score)
        try:
            outputs = model(**inputs, use_cache=False)
        finally:
            handle.remove()
        if self._sums is None:
            raise RuntimeError("the model's forward never reached its output layer")
        # The (empty) logits the forward returned join the result, so a distributed engine that
        # starts its backward work from the forward's outputs (FSDP) sees the backward begin.
        return self._sums + outputs.logits.float().sum() * 0
