"""Per-sequence log-probabilities of the labelled tokens of a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from preftune.models.attention import inner_model, layout_attention

IGNORE = -100


def sequence_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_rows: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log π(token | prefix) over each row's labelled tokens, and how many there are.

    ``batch`` holds ``input_ids``, ``attention_mask`` (2-D) and unshifted ``labels`` (``-100``
    where a token is not scored), each (rows, length). Returns two (rows,) tensors: summed
    log-probs in float32 and token counts. ``chunk_rows`` 0 scores from the model's own logits
    (the plain computation); > 0 runs the output layer on the labelled positions only, in
    chunks, as :func:`layout_logps` does.
    """
    labels = batch["labels"][:, 1:]
    scored = labels != IGNORE
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if chunk_rows <= 0:
        logits = model(**inputs, use_cache=False).logits
        token_logps = -F.cross_entropy(
            logits[:, :-1].float().flatten(0, 1),
            labels.flatten(),
            ignore_index=IGNORE,
            reduction="none",
        ).view_as(labels)
        return (token_logps * scored).sum(-1), scored.sum(-1)
    with FinalHidden(model) as final:
        model(**inputs, use_cache=False)
    rows, width = batch["labels"].shape
    row, column = scored.nonzero(as_tuple=True)
    sums = _scored_sums(
        model, final.hidden, row * width + column, labels[scored], row, rows, chunk_rows
    )
    return sums, scored.sum(-1)


def layout_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_rows: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and token counts per sequence of a batch from ``layout_pairs``.

    The decoder runs once over the laid-out rows, each layer attending as the model defines it
    (see :func:`~preftune.models.attention.layout_attention`); the output layer then runs only
    on the positions that predict a response token. ``chunk_rows`` > 0 takes those positions
    that many at a time and recomputes each chunk's logits in the backward pass, so no
    (tokens × vocabulary) tensor larger than one chunk ever exists; 0 applies the output layer
    to every position of every row at once, as a plain forward does.
    """
    with layout_attention(model, batch) as (inputs, _), FinalHidden(model) as final:
        model(input_ids=batch["input_ids"], use_cache=False, **inputs)
    sequences = int(batch["num_sequences"].sum())
    seq = batch["score_seq"]
    index, target = batch["score_index"], batch["score_target"]
    sums = _scored_sums(model, final.hidden, index, target, seq, sequences, chunk_rows)
    return sums, torch.bincount(seq, minlength=sequences)


def _scored_sums(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    index: torch.Tensor,
    target: torch.Tensor,
    seq: torch.Tensor,
    sequences: int,
    chunk_rows: int,
) -> torch.Tensor:
    """(sequences,) float32: the log-prob of each ``target`` token, predicted by the final hidden
    state at flat position ``index``, summed per sequence ``seq``."""
    head = OutputLayer(model)
    if chunk_rows > 0:
        hidden = hidden.flatten(0, 1).index_select(0, index)
        token_logps = (
            torch.cat(
                [
                    _checkpointed(
                        head, hidden[start : start + chunk_rows], target[start:][:chunk_rows]
                    )
                    for start in range(0, hidden.shape[0], chunk_rows)
                ]
            )
            if hidden.shape[0]
            else hidden.new_zeros(0, dtype=torch.float32)
        )
    else:
        logits = head.logits(hidden).flatten(0, 1).index_select(0, index)
        token_logps = -F.cross_entropy(logits, target, reduction="none")
    sums = torch.zeros(sequences, dtype=torch.float32, device=token_logps.device)
    return sums.index_add(0, seq, token_logps.float())


def _checkpointed(head: OutputLayer, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return head.token_logps(hidden, target)
    return checkpoint(head.token_logps, hidden, target, use_reentrant=False)


class OutputLayer:
    """The model's output layer and the logit transforms its forward applies after it."""

    def __init__(self, model: torch.nn.Module) -> None:
        inner = inner_model(model)
        self.layer: torch.nn.Module = inner.get_output_embeddings()
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


class FinalHidden:
    """Within the context, the output layer records its input and computes nothing.

    The model's forward is still called as a whole (through any distributed wrapper, so gradient
    synchronisation stays in place); only the full-vocabulary projection of every position is
    skipped, leaving the caller to project just the positions it scores.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.layer: torch.nn.Module = inner_model(model).get_output_embeddings()
        self._hidden: torch.Tensor | None = None

    @property
    def hidden(self) -> torch.Tensor:
        """The output layer's input, recorded by the forward run within the context."""
        if self._hidden is None:
            raise RuntimeError("the model's forward never reached its output layer")
        return self._hidden

    def __enter__(self) -> FinalHidden:
        self.handle = self.layer.register_forward_pre_hook(self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()
        if self._hidden is None and exc[0] is None:
            raise RuntimeError("the model's forward never reached its output layer")

    def _record(self, module: torch.nn.Module, args: tuple) -> tuple:
        self._hidden = args[0]
        return (args[0][..., :0, :], *args[1:])
