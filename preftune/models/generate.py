"""Sampling completions from a policy, and scoring them under another."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from tqdm.auto import tqdm

from preftune.data.collate import collate_demos
from preftune.data.encode import EncodedDemo
from preftune.models.logps import sequence_logps
from preftune.progress import bars_shown

if TYPE_CHECKING:
    from transformers import GenerationMixin


@dataclass(frozen=True)
class Completion:
    """One sampled completion: the ids scored (ending with EOS if the model stopped) and text."""

    prompt: str
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str


@dataclass(frozen=True)
class Sampling:
    """How to continue a prompt: up to ``max_new_tokens`` tokens, sampled at ``temperature``
    from the smallest set of tokens holding ``top_p`` of the probability (nucleus sampling),
    or, without ``do_sample``, the most likely token each time."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = True

    def generate_kwargs(self) -> dict[str, Any]:
        if not self.do_sample:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        # top_k=0: no top-k cut, whatever the model's generation config says.
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_k": 0,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
        }


def sample(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    num_samples: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    desc: str | None = None,
) -> list[Completion]:
    """``num_samples`` completions of each prompt, prompt-major, by ancestral sampling.

    ``desc`` shows a progress bar with that label (when :func:`~preftune.progress.bars_shown`).
    """
    jobs = [prompt for prompt in prompts for _ in range(num_samples)]
    encoded = [tokenizer(prompt).input_ids for prompt in jobs]
    settings = Sampling(max_new_tokens=max_new_tokens, temperature=temperature)
    generated = generate_ids(model, encoded, tokenizer, settings, batch_size, seed, desc)
    return [
        Completion(prompt, ids, new, tokenizer.decode(new, skip_special_tokens=True))
        for prompt, ids, new in zip(jobs, encoded, generated, strict=True)
    ]


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    prompts: list[list[int]],
    tokenizer,
    settings: Sampling,
    batch_size: int = 64,
    seed: int = 0,
    desc: str | None = None,
) -> list[list[int]]:
    """The continuation of each prompt's token ids, ending with EOS if the model stopped.

    Prompts go ``batch_size`` at a time, left-padded; the global random state is seeded with
    ``seed`` for the call and restored after it. ``desc`` shows a progress bar with that label
    (when :func:`~preftune.progress.bars_shown`).
    """
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    out: list[list[int]] = []
    try:
        starts = range(0, len(prompts), batch_size)
        shown = desc is not None and bars_shown()
        for start in tqdm(starts, desc=desc, disable=not shown, dynamic_ncols=True):
            chunk = prompts[start : start + batch_size]
            width = max(len(ids) for ids in chunk)
            # Left padding keeps every prompt's last token at the same position for generate.
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk])
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk])
            # A causal LM's own method; torch types any attribute of a Module as Tensor | Module.
            sequences = cast("GenerationMixin", model).generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                eos_token_id=eos,
                pad_token_id=pad,
                **settings.generate_kwargs(),
            )
            out.extend(until_eos(new, eos) for new in sequences[:, width:].tolist())
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return out


class PolicySampler:
    """Continuations from transformers' ``generate`` on the policy itself (the ``hf`` backend):
    it always samples from the weights as they are, so it has nothing to sync."""

    def __init__(self, policy: torch.nn.Module, tokenizer: Any, batch_size: int) -> None:
        self.policy, self.tokenizer, self.batch_size = policy, tokenizer, batch_size

    def sync(self, policy: torch.nn.Module) -> None:
        return None

    def generate(self, prompts: list[list[int]], settings: Sampling, seed: int) -> list[list[int]]:
        return generate_ids(self.policy, prompts, self.tokenizer, settings, self.batch_size, seed)


class Sampler(Protocol):
    """What continues prompts for a run that samples: :class:`PolicySampler`, or an engine
    holding a copy of the policy (:class:`~preftune.models.vllm_sampler.VLLMSampler`)."""

    def sync(self, policy: torch.nn.Module) -> None:
        """Take the policy's current weights (before sampling from it after it trained)."""

    def generate(self, prompts: list[list[int]], settings: Sampling, seed: int) -> list[list[int]]:
        """The continuation of each prompt, ending with EOS if the model stopped."""


@torch.no_grad()
def completion_logps(
    model: torch.nn.Module, completions: list[Completion], pad_id: int, batch_size: int = 64
) -> torch.Tensor:
    """log π(completion | prompt) summed over each completion's tokens, shape (len,)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    values = []
    for start in range(0, len(completions), batch_size):
        chunk = completions[start : start + batch_size]
        batch = collate_demos([EncodedDemo(c.prompt_ids, c.completion_ids) for c in chunk], pad_id)
        logps, _ = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
        values.append(logps.cpu())
    model.train(was_training)
    return torch.cat(values)


def until_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id) + 1] if eos_id in ids else ids
