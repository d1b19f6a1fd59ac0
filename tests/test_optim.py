"""The optimizer runs torch's fused (or multi-tensor) kernel where one serves the parameters,
and takes the same steps as the per-tensor loop; the learning-rate schedules are transformers'
own."""

from __future__ import annotations

import pytest
import torch

from preftune.train.optim import build_optimizer, build_scheduler
from preftune.train.settings import TrainSettings


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


@pytest.mark.parametrize(("name", "kernel"), [("adamw", "fused"), ("rmsprop", "foreach")])
def test_the_kernel_serving_every_tensor_takes_the_per_tensor_steps(name: str, kernel: str) -> None:
    settings = TrainSettings(optimizer=name, learning_rate=1e-2, weight_decay=0.1)
    fast, slow = model(), model()
    optimizer = build_optimizer([fast], settings)
    assert optimizer.defaults[kernel] is True
    loop_class = type(optimizer)
    loop = loop_class(slow.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    inputs = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for net, opt in ((fast, optimizer), (slow, loop)):
            opt.zero_grad()
            net(inputs).pow(2).mean().backward()
            opt.step()
    for a, b in zip(fast.parameters(), slow.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_parameters_no_fused_kernel_serves_get_torchs_own_choice() -> None:
    on_meta = torch.nn.Linear(4, 4, device="meta")
    optimizer = build_optimizer([on_meta], TrainSettings())
    assert optimizer.defaults["fused"] is None


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize(("warmup", "total"), [(0, 10), (3, 10), (4, 4), (5, 3), (0, 1)])
def test_the_schedules_are_transformers_own(kind: str, warmup: int, total: int) -> None:
    from transformers import get_scheduler

    names = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
    rates = []
    for build in (
        lambda opt: build_scheduler(
            opt, TrainSettings(lr_scheduler=kind, warmup_steps=warmup), total
        ),
        lambda opt: get_scheduler(
            names[kind], opt, num_warmup_steps=warmup, num_training_steps=total
        ),
    ):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
        scheduler = build(optimizer)
        seen = []
        for _ in range(total + 3):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        rates.append(seen)
    assert rates[0] == rates[1]
