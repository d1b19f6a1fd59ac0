"""Reference providers: where the reference policy's log-probabilities come from when they are
not precomputed (see :mod:`preftune.models.refcache`): a model of its own, frozen (a copy of the
starting policy, or ``reference.model``), or, under LoRA, the policy's base with its adapters
switched off or another adapter in their place; and TR-DPO's reference, which the run moves
toward the policy as it trains (:class:`SyncedReference`)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from preftune.errors import ConfigError
from preftune.models.logps import sequence_logps

if TYPE_CHECKING:
    from peft import PeftModel

Batch = dict[str, torch.Tensor]
Score = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]

REFERENCE_ADAPTER = "reference"
"""The name of the reference's LoRA adapter on the policy's base, beside the policy's own."""


class ReferenceProvider(Protocol):
    def logps(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probabilities and token counts per sequence, as :func:`sequence_logps`."""
        ...


class FrozenModel:
    """A reference model of its own (``reference.model``, loaded and placed), frozen and in
    eval mode."""

    def __init__(self, model: torch.nn.Module, score: Score = sequence_logps) -> None:
        self.model = model.eval().requires_grad_(False)
        self.score = score

    @torch.no_grad()
    def logps(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.score(self.model, batch)

    def weights(self) -> dict[str, torch.Tensor]:
        """What TR-DPO mixes: every weight."""
        return dict(self.model.named_parameters())

    def pairs(self, policy: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each weight with the policy's of the same name (``policy`` as the loop holds it)."""
        return _matched(self.weights(), dict(_unwrapped(policy).named_parameters()))


class FrozenCopy(FrozenModel):
    """An exact in-memory copy of the starting policy, frozen and in eval mode.

    Copied rather than re-loaded, so it is bit-identical to the policy at step 1 whatever the
    policy's source (tiny preset, local directory, hub id).
    """

    def __init__(
        self, policy: torch.nn.Module, device: torch.device, score: Score = sequence_logps
    ) -> None:
        super().__init__(copy.deepcopy(policy).to(device), score)


class AdapterDisabled:
    """The base model under a LoRA policy: the same weights with the adapters switched off, so
    no second copy of the model exists."""

    def __init__(self, policy: PeftModel, score: Score = sequence_logps) -> None:
        self.model = policy
        self.score = score

    @torch.no_grad()
    def logps(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return self.score(self.model, batch)
        finally:
            self.model.train(was_training)


class ReferenceAdapter:
    """The policy's base under the reference's LoRA adapter (:func:`add_reference_adapter`) in
    place of the policy's own: a reference that differs from the base by an adapter, with no
    second copy of the base."""

    def __init__(self, policy: PeftModel, score: Score = sequence_logps) -> None:
        self.model = policy
        self.score = score
        self.own = policy.active_adapter

    @torch.no_grad()
    def logps(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = self.model.training
        self.model.eval()
        try:
            with adapter_in_use(self.model, REFERENCE_ADAPTER):
                return self.score(self.model, batch)
        finally:
            self.model.train(was_training)

    def weights(self) -> dict[str, torch.Tensor]:
        """What TR-DPO mixes: the reference adapter's weights (the base is shared)."""
        return _adapter_weights(self.model, REFERENCE_ADAPTER)

    def pairs(self, policy: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each weight of the reference adapter with the policy adapter's in its place (the
        scale α/r included: adapters of other scales are not mixed)."""
        model: Any = _unwrapped(policy)
        for module in model.modules():
            scaling = getattr(module, "scaling", None)
            if not isinstance(scaling, dict):
                continue
            ours, theirs = scaling.get(REFERENCE_ADAPTER), scaling.get(self.own)
            if ours != theirs:
                raise ConfigError(
                    f"{_MIXING}, and the reference adapter scales its update by {ours}, the "
                    f"policy's by {theirs} (lora.alpha / lora.r): train adapters of the "
                    "reference's r and alpha"
                )
        return _matched(self.weights(), _adapter_weights(model, self.own))


@contextmanager
def adapter_in_use(model: PeftModel, adapter: str) -> Iterator[None]:
    """Within the context, ``model`` computes with its LoRA adapter ``adapter`` in place of
    its own. Switching adapters sets which one trains (peft's ``set_adapter``): on leaving, its
    own is back and trainable, every other frozen, as they were."""
    own = model.active_adapter
    model.set_adapter(adapter, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(own)


def is_adapter(path: str) -> bool:
    """Whether ``path`` is a directory of LoRA adapters, as peft's ``save_pretrained`` writes."""
    return (Path(path).expanduser() / "adapter_config.json").is_file()


def add_reference_adapter(policy: PeftModel, path: str | None) -> None:
    """Put the reference's adapter on ``policy``'s base beside its own, frozen: the adapter
    saved in the directory ``path`` (``reference.model``), or, without one, a copy of the
    policy's own as they start (the starting policy, for TR-DPO to move)."""
    if path is not None:
        try:
            policy.load_adapter(
                str(Path(path).expanduser()), adapter_name=REFERENCE_ADAPTER, is_trainable=False
            )
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ConfigError(
                f"reference.model {path}: cannot put this LoRA adapter on the policy's base "
                f"({message or type(error).__name__})"
            ) from None
        return
    config = copy.deepcopy(policy.peft_config[policy.active_adapter])
    config.inference_mode = True
    policy.add_adapter(REFERENCE_ADAPTER, config)
    reference = _adapter_weights(policy, REFERENCE_ADAPTER)
    with torch.no_grad():
        for name, weight in _adapter_weights(policy, policy.active_adapter).items():
            reference[name].copy_(weight)
    for weight in reference.values():
        weight.requires_grad_(False)


class SyncedReference:
    """TR-DPO's reference (Gorbatovski et al., 2024, "Learn your reference model for real good
    alignment"): a live reference that, every ``every`` optimizer steps, becomes

        π_ref ← α·π_θ + (1 − α)·π_ref,

    weight by weight, α being ``mix`` (α = 1 copies the policy: a hard update; less, a soft
    one). Under LoRA the weights mixed are the adapters' (the base is shared), A and B each: a
    soft mix of two adapters is then not the mix of their updates B·A, as TR-DPO's is of whole
    weights; a hard one is exact.
    Every process mixes its own whole copy with its own whole policy, which DDP keeps equal, so
    the copies stay equal. The weights change as the run trains, so checkpoints keep them
    (``weights``, the objective's ``state_modules``) and a resumed run goes on from them."""

    def __init__(
        self,
        live: FrozenModel | ReferenceAdapter,
        policy: torch.nn.Module,
        every: int,
        mix: float,
    ) -> None:
        live.pairs(policy)  # what could not be mixed is refused now, not at the first sync
        self.live = live
        self.every = every
        self.mix = mix
        self.weights = Weights(live.weights())

    def logps(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.live.logps(batch)

    @torch.no_grad()
    def after_step(self, policy: torch.nn.Module, step: int) -> None:
        """Mix the policy in after optimizer step ``step`` when it is one of every ``every``;
        ``lerp`` computes α·θ + (1 − α)·ref and gives θ itself at α = 1."""
        if step % self.every == 0:
            for reference, weight in self.live.pairs(policy):
                reference.lerp_(weight, self.mix)


class Weights(torch.nn.Module):
    """Tensors of other modules held as the buffers of this one (``/`` for ``.`` in their
    names), so that a checkpoint of it holds them all and loading one writes them in place: a
    reference's frozen weights, which a checkpoint of a partly frozen model leaves out."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, tensor in tensors.items():
            self.register_buffer(name.replace(".", "/"), tensor.detach())


_MIXING = "reference.sync_every mixes the policy into the reference weight by weight"


def _matched(
    reference: dict[str, torch.Tensor], policy: dict[str, torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each of ``reference`` with the tensor of ``policy`` of its name; one line naming the
    first difference when the two do not have the same names and shapes."""
    for name in sorted(reference.keys() ^ policy.keys()):
        side = "policy" if name in reference else "reference"
        raise ConfigError(f"{_MIXING}, and the {side} has no weight {name}")
    for name, tensor in reference.items():
        if tensor.shape != policy[name].shape:
            raise ConfigError(
                f"{_MIXING}, and {name} is {tuple(tensor.shape)} in the reference, "
                f"{tuple(policy[name].shape)} in the policy"
            )
    return [(tensor, policy[name]) for name, tensor in reference.items()]


def _adapter_weights(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The weights of LoRA adapter ``adapter``, named without the adapter's name."""
    weights: dict[str, torch.Tensor] = {}
    for name, parameter in model.named_parameters():
        parts = name.split(".")
        if adapter in parts:
            weights[".".join(part for part in parts if part != adapter)] = parameter
    return weights


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` without the wrappers of distributed training (DDP's ``module``)."""
    inner: Any = model
    while hasattr(inner, "module"):
        inner = inner.module
    return inner
