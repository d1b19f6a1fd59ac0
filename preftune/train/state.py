"""Model state in and out of a run: the one module through which the loop runs the backward and
update, saves and loads the trained modules' weights, and chooses what evaluation runs on (where
a model lives, sharded or partitioned: :mod:`preftune.train.placement`).

Unsharded (one process, or DDP), each module is written whole by the main process from its
unwrapped form and read back by every process. Sharded (``train.distributed=fsdp2``: PyTorch's
``fully_shard``, each decoder layer a unit and the model the root), every process writes and
reads its own shards with ``torch.distributed.checkpoint``: no process ever holds the whole
model or optimizer state, except the main one when the final model is gathered into a Hugging
Face directory. Under DeepSpeed (an accelerate config with ``distributed_type: DEEPSPEED``,
ZeRO stage 2 or 3), the engine owns the update: its micro-batches' gradients are accumulated
and reduced by it, it steps at the step's last micro-batch, and it writes its own checkpoint
files, which are staged, checksummed and renamed like any other.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from preftune.errors import ConfigError, TrainingError
from preftune.models.load import untied
from preftune.shares import decide_on_main
from preftune.train import checkpoint, checkpoint_contents
from preftune.train.guard import newest_intact_phrase
from preftune.train.placement import is_deepspeed, is_sharded
from preftune.train.settings import TrainSettings

SHARDS = "sharded"
"""The directory of a sharded checkpoint's model and optimizer shards."""
ENGINE = "deepspeed"
"""The directory of a DeepSpeed checkpoint's files, as the engine writes them."""


@contextmanager
def accumulating(acc: Accelerator, model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Within the context, a backward adds to the gradients without synchronising them across
    processes unless ``sync``: the micro-batches of a step but its last."""
    if sync or is_deepspeed(acc):  # DeepSpeed: the engine is told where the step ends
        yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with acc.no_sync(model) if acc.num_processes > 1 else nullcontext():
            yield


def configure_deepspeed(acc: Accelerator, settings: TrainSettings, micro: int) -> None:
    """The batch and clipping settings of the DeepSpeed config, from ``train.*``: one global
    batch per optimizer step, of ``micro`` examples per process per forward."""
    config = acc.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro
    config["gradient_accumulation_steps"] = settings.batch_size // (acc.num_processes * micro)
    config["train_batch_size"] = settings.batch_size
    config["gradient_clipping"] = settings.max_grad_norm or 0.0
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        # The final model is gathered whole from the partitions when it is saved.
        zero["stage3_gather_16bit_weights_on_model_save"] = True


def backward(acc: Accelerator, model: torch.nn.Module, loss: torch.Tensor, sync: bool) -> None:
    """Backpropagate ``loss``; ``sync``: it is the step's last micro-batch. A DeepSpeed engine
    takes the loss as scaled here (not divided by the accumulation steps again) and updates
    the weights at the step's last micro-batch."""
    if not is_deepspeed(acc):
        acc.backward(loss)
        return
    engine: Any = model
    engine.set_gradient_accumulation_boundary(sync)
    engine.backward(loss, scale_wrt_gas=False)
    engine.step()


def lockstep(acc: Accelerator, model: torch.nn.Module) -> bool:
    """Whether every process must take part in each forward of ``model`` (it gathers its
    parameters from all of them): sharded by FSDP, or partitioned by ZeRO stage 3."""
    if is_sharded(model):
        return True
    if not is_deepspeed(acc):
        return False
    stage = acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage")
    return stage == 3


def clip_gradients(
    acc: Accelerator,
    model: torch.nn.Module,
    parameters: Sequence[torch.nn.Parameter],
    max_norm: float,
) -> float | None:
    """Clip the global gradient norm of ``parameters`` to ``max_norm``; returns the norm before.
    A DeepSpeed engine has clipped and stepped already: its norm, when it computed one."""
    if is_deepspeed(acc):
        engine: Any = model
        norm = engine.get_global_grad_norm()
        return None if norm is None else float(norm)
    norm = acc.clip_grad_norm_(parameters, max_norm)
    if isinstance(norm, DTensor):  # sharded gradients: the norm over every shard
        norm = norm.full_tensor()
    return float(norm)


def save(
    acc: Accelerator,
    output_dir: Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep: int,
    identity: dict[str, Any],
    tokenizer: Any = None,
) -> None:
    """Checkpoint ``step``; a failed write (a full disk) is one line on every process, the
    checkpoints written before it intact. An unsharded model's whole weights are written with
    its config and ``tokenizer``: a model directory of its own (see :mod:`.checkpoint`)."""
    model = modules["model"]
    try:
        if is_sharded(model) or is_deepspeed(acc):
            _save_parts(acc, output_dir, step, model, optimizer, scheduler, keep, identity)
            return

        def write() -> None:
            plain = {name: unwrapped(acc, module) for name, module in modules.items()}
            checkpoint.save_checkpoint(
                output_dir, step, plain, optimizer, scheduler, keep, identity, tokenizer
            )

        decide_on_main(acc, write)
    except OSError as error:
        raise TrainingError(
            f"cannot write the checkpoint of step {step} in {output_dir}: "
            f"{error.strerror or error}; stopped, {newest_intact_phrase(output_dir)}"
        ) from None


def _save_parts(
    acc: Accelerator,
    output_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep: int,
    identity: dict[str, Any],
) -> None:
    """Every process writes its part (its shards; a DeepSpeed engine's files) into one staging
    directory; then the main process writes the rest and renames it into place."""
    staging = decide_on_main(acc, lambda: checkpoint.stage(output_dir, step))
    if is_deepspeed(acc):
        engine: Any = model
        engine.save_checkpoint(str(staging / ENGINE), tag="state", save_latest=False)
    else:
        from torch.distributed.checkpoint import save as save_shards

        save_shards(_state_dicts(model, optimizer), checkpoint_id=str(staging / SHARDS))
    acc.wait_for_everyone()
    training = {"scheduler": scheduler.state_dict()}
    decide_on_main(acc, lambda: checkpoint.commit(staging, step, identity, training, keep))


def load(
    acc: Accelerator,
    path: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Restore the checkpoint at ``path`` into ``modules`` (wrapped or not), the optimizer and
    the scheduler, on every process; returns its ``state.json``."""
    model = modules["model"]
    if is_deepspeed(acc):
        if not (path / ENGINE).is_dir():
            raise ConfigError(f"{path} was not written by DeepSpeed: resume as it was written")
        engine: Any = model
        engine.load_checkpoint(str(path / ENGINE), tag="state", load_lr_scheduler_states=False)
        scheduler.load_state_dict(checkpoint.load_training_state(path)["scheduler"])
        return checkpoint.read_state(path)
    if not is_sharded(model):
        plain = {name: unwrapped(acc, module) for name, module in modules.items()}
        return checkpoint.load_checkpoint(path, plain, optimizer, scheduler)
    from torch.distributed.checkpoint import load as load_shards
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if not (path / SHARDS).is_dir():
        raise ConfigError(f"{path} is not a sharded checkpoint: resume with train.distributed=ddp")
    state = _state_dicts(model, optimizer)
    load_shards(state, checkpoint_id=str(path / SHARDS))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(checkpoint.load_training_state(path)["scheduler"])
    return checkpoint.read_state(path)


def load_whole(path: Path, model: torch.nn.Module) -> None:
    """The model weights of the checkpoint at ``path`` into ``model``, a whole copy of the run's
    model as it was built (see :func:`preftune.commands.common.rebuilt`) on one process, however
    the run wrote them: whole or its trainable ones only, shards (every process's, read here by
    one), or a DeepSpeed engine's partitions (their float32 master weights). The optimizer state
    is not read."""
    if (path / ENGINE).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(path / ENGINE), "state"))
    elif (path / SHARDS).is_dir():
        from torch.distributed.checkpoint import load as load_shards
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            set_model_state_dict,
        )

        state = {"model": get_model_state_dict(model)}
        load_shards(state, checkpoint_id=str(path / SHARDS))
        set_model_state_dict(model, state["model"])
    else:
        checkpoint_contents.load_weights(model, path / checkpoint_contents.weights_file("model"))


def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
    }


def full_state_dict(acc: Accelerator, model: torch.nn.Module) -> dict[str, Any] | None:
    """A sharded or partitioned model's whole state dict, gathered to the main process's CPU
    memory (every process must call this); None for a model each process holds whole."""
    if is_deepspeed(acc):
        # ``model`` may be the module as loaded; the engine holds its partitions.
        engine = acc.deepspeed_engine_wrapped.engine
        return acc.get_state_dict(engine)
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def unwrapped(acc: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` out of any distributed or compiled wrapper (``accelerate``'s unwrapping, which
    imports DeepSpeed whenever it is installed, only where there is something to unwrap)."""
    if is_deepspeed(acc) or hasattr(model, "module") or hasattr(model, "_orig_mod"):
        return acc.unwrap_model(model)
    return model


def for_evaluation(acc: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The module evaluation runs its forward passes through: a sharded or partitioned model as
    it is (every process must take part in each forward), else the unwrapped one."""
    return model if lockstep(acc, model) else unwrapped(acc, model)


def save_pretrained(
    acc: Accelerator,
    model: torch.nn.Module,
    directory: Path,
    state_dict: dict[str, Any] | None,
    max_shard_size: str,
) -> None:
    """``model`` as a Hugging Face model directory of safetensors files (split at
    ``max_shard_size``, with an index), from the main process; ``state_dict``, when given, is
    its gathered weights (see :func:`full_state_dict`)."""
    module: Any = unwrapped(acc, model)
    options: dict[str, Any] = {"safe_serialization": True, "max_shard_size": max_shard_size}
    if state_dict is not None:
        options["state_dict"] = untied(module, state_dict)
    module.save_pretrained(directory, **options)
