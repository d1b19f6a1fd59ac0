"""Self-play (SPIN; Chen et al., 2024, "Self-Play Fine-Tuning Converts Weak Language Models
to Strong Language Models", arXiv:2401.01335): the pairs of one iteration, each demonstration's
real completion chosen against the previous iterate's own, generated one rejected.

Iteration t generates a completion y' of every prompt x with iterate t−1 and trains iterate t−1
on the pairs with a paired loss, the reference being iterate t−1 itself; with the sigmoid loss
this is the paper's logistic loss:

    L(θ) = −E log σ(β log[π_θ(y|x) / π_{t−1}(y|x)] − β log[π_θ(y'|x) / π_{t−1}(y'|x)]),
    y' ∼ π_{t−1}(·|x)
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from preftune.data.encode import Budget, EncodedDemo, EncodedPair, TruncationReport, fit
from preftune.data.tokenize import Tokenized
from preftune.models.generate import Sampling, generate_ids
from preftune.objectives.settings import SPINSettings


def spin_pairs(
    demos: Sequence[EncodedDemo], generated: Sequence[list[int]], max_length: int, truncation: str
) -> tuple[list[EncodedPair], TruncationReport]:
    """One pair per demonstration: its completion chosen, the generated one rejected, both after
    the demonstration's own prompt ids (shared, not copied). A generated completion is cut to the
    room the prompt leaves in ``max_length``, as data rows are; the report counts those cut
    (``responses_truncated``) and those identical to the real completion (``identical``)."""
    examples = [
        Tokenized(demo.prompt_ids, [demo.completion_ids, ids], demo.row)
        for demo, ids in zip(demos, generated, strict=True)
    ]
    kept, report = fit(examples, Budget(max_length, None, truncation))
    return [EncodedPair(e.prompt, e.responses[0], e.responses[1], row=e.row) for e in kept], report


def sampling(settings: SPINSettings, max_length: int, demos: Sequence[EncodedDemo]) -> Sampling:
    room = max_length - min(len(demo.prompt_ids) for demo in demos)
    return Sampling(
        max_new_tokens=settings.max_new_tokens or room,
        temperature=settings.temperature,
        top_p=settings.top_p,
        do_sample=settings.do_sample,
    )


def generate_rejected(
    model: torch.nn.Module,
    prompts: list[list[int]],
    tokenizer,
    settings: Sampling,
    batch_size: int,
    seed: int,
    acc: Accelerator,
    desc: str,
) -> list[list[int]]:
    """A completion of each prompt by ``model``. Each process generates every
    ``num_processes``-th prompt, shortest first so that a batch pads little, and every process
    gets all the completions."""
    mine = sorted(
        range(acc.process_index, len(prompts), acc.num_processes),
        key=lambda index: len(prompts[index]),
    )
    with acc.autocast():
        ids = generate_ids(
            model,
            [prompts[index] for index in mine],
            tokenizer,
            settings,
            batch_size,
            seed,
            desc if acc.is_main_process else None,
        )
    completions = dict(gather_object(list(zip(mine, ids, strict=True))))
    return [completions[index] for index in range(len(prompts))]


def generation_rows(demos, generated, tokenizer) -> str:
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    rows = [
        {
            "row": demo.row,
            "prompt": decode(demo.prompt_ids),
            "real": decode(demo.completion_ids),
            "generated": decode(ids),
            "generated_ids": ids,
        }
        for demo, ids in zip(demos, generated, strict=True)
    ]
    return "".join(json.dumps(row) + "\n" for row in rows)
