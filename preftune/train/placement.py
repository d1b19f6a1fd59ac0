"""Where a model lives in a run: whole on each process, sharded by FSDP2 (PyTorch's
``fully_shard``, each decoder layer a unit and the model the root), or partitioned by DeepSpeed
ZeRO-3; and a frozen reference placed as its policy is."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from preftune.errors import ConfigError
from preftune.models.load import decoder_layers
from preftune.train.settings import TrainSettings

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def shard(model: torch.nn.Module, acc: Accelerator, settings: TrainSettings) -> torch.nn.Module:
    """``model`` sharded over the processes with ``fully_shard`` when
    ``train.distributed=fsdp2``, each decoder layer its own unit and the model the root; as it
    is otherwise. Parameters are kept in float32 and, under mixed precision, gathered in its
    dtype with gradients reduced in float32."""
    if settings.distributed != "fsdp2":
        return model
    _join(acc)
    mesh = dist.device_mesh.init_device_mesh(acc.device.type, (acc.num_processes,))
    options: dict[str, Any] = {"mesh": mesh}
    if acc.mixed_precision in PRECISIONS:
        precision = PRECISIONS[acc.mixed_precision]
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=precision, reduce_dtype=torch.float32
        )
    if settings.fsdp_cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(
            f"train.distributed=fsdp2: {type(model).__name__} has no layers marked as decoder "
            "layers to shard by"
        )
    # A model still on the CPU moves to the device one unit at a time as it is sharded: no
    # device ever holds the whole of it.
    for layer in layers:
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def before_sharding(
    acc: Accelerator, settings: TrainSettings, reference: bool = False
) -> torch.device:
    """Where a model waits until it is sharded: the CPU under FSDP2 (:func:`shard` moves it to
    the device a layer at a time), and for a frozen ``reference`` under ZeRO-3 too (its
    inference engine moves it a parameter at a time), so no device holds it whole; else this
    process's device. A ZeRO-3 policy is moved whole: DeepSpeed partitions it when the run is
    prepared, after the cached reference pass has run on it."""
    on_cpu = settings.distributed == "fsdp2" or (reference and zero3(acc))
    return torch.device("cpu") if on_cpu else acc.device


def zero3(acc: Accelerator) -> bool:
    """Whether the run partitions parameters with DeepSpeed ZeRO stage 3."""
    if not is_deepspeed(acc):
        return False
    config = acc.state.deepspeed_plugin.deepspeed_config
    return bool(config.get("zero_optimization", {}).get("stage") == 3)


def prepare_reference(
    reference: torch.nn.Module, acc: Accelerator, settings: TrainSettings
) -> torch.nn.Module:
    """A frozen reference model distributed as the policy will be: sharded the same way under
    FSDP2; under ZeRO stage 3, partitioned by an inference engine of its own (so no process
    holds it whole); as it is otherwise."""
    if settings.distributed == "fsdp2":
        return shard(reference, acc, settings)
    if not zero3(acc):
        return reference
    import deepspeed

    config = acc.state.deepspeed_plugin.deepspeed_config
    micro = settings.micro_batch_size or settings.batch_size // acc.num_processes
    inference = {
        "zero_optimization": {"stage": 3},
        "train_micro_batch_size_per_gpu": micro,
        "train_batch_size": micro * acc.num_processes,
    }
    for precision in ("bf16", "fp16"):
        if config.get(precision, {}).get("enabled") is True:
            inference[precision] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=reference, config=inference)
    engine.eval()
    return engine


def _join(acc: Accelerator) -> None:
    """One process alone has no process group to shard over: make it one of one."""
    if not dist.is_initialized():
        backend = "nccl" if acc.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def is_sharded(module: torch.nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def reshard(model: torch.nn.Module) -> None:
    """Put every parameter of a sharded model back to its shard (after a forward outside
    training, the root's stay gathered)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_deepspeed(acc: Accelerator) -> bool:
    return acc.distributed_type == DistributedType.DEEPSPEED
