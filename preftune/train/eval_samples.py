"""``train.eval_samples``: at each evaluation, the policy's greedy continuations of the first
prompts of the evaluation set, to read beside the metrics (``samples.jsonl``, TensorBoard text).

Greedy decoding makes the continuations of one step comparable with the next: what changes is
the policy, not the draw. A model each process holds whole is continued by the main process
alone; a sharded or partitioned one by every process in lockstep (the same prompts and greedy
steps, so the same number of forwards), the main process keeping the text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from accelerate import Accelerator

from preftune.models.generate import Sampling, generate_ids
from preftune.train.settings import TrainSettings
from preftune.train.state import lockstep, unwrapped


def continue_prompts(
    acc: Accelerator,
    model: torch.nn.Module,
    examples: Sequence[Any],
    tokenizer: Any,
    cfg: TrainSettings,
) -> list[dict[str, object]]:
    """One record per example with a prompt (``row``, ``prompt``, ``completion``), on the main
    process; an empty list elsewhere, and for a model that does not generate (a reward
    model)."""
    plain = unwrapped(acc, model)
    can_generate = getattr(plain, "can_generate", None)
    prompted = [e for e in examples if getattr(e, "prompt_ids", None)]
    if not prompted or can_generate is None or not can_generate():
        return []
    if not lockstep(acc, model) and not acc.is_main_process:
        return []
    settings = Sampling(max_new_tokens=cfg.eval_sample_tokens, do_sample=False)
    prompts = [list(e.prompt_ids) for e in prompted]
    continued = generate_ids(plain, prompts, tokenizer, settings, batch_size=len(prompts))
    if not acc.is_main_process:
        return []
    return [
        {
            "row": example.row,
            "prompt": tokenizer.decode(ids, skip_special_tokens=True),
            "completion": tokenizer.decode(new, skip_special_tokens=True),
        }
        for example, ids, new in zip(prompted, prompts, continued, strict=True)
    ]
