"""Memory stays flat over a long run: thousands of steps keep no tensor, record or graph alive."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from preftune.commands.dpo import DPOConfig, run_dpo
from preftune.config import load_config
from preftune.train import metrics_log
from tests.conftest import SAMPLE_EVAL, SAMPLE_TRAIN

STEPS = 2000
WARM_UP = 500


def resident_kib() -> int:
    """This process's resident set size, from the kernel."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def live_objects() -> tuple[int, int]:
    """Memory blocks Python has allocated, and tensors alive, after a full collection."""
    gc.collect()
    # type(), not isinstance(): the latter wakes deprecated module attributes into warnings.
    tensors = sum(issubclass(type(thing), torch.Tensor) for thing in gc.get_objects())
    return sys.getallocatedblocks(), tensors


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny steps run fastest on one thread, whatever else the machine is doing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_memory_is_flat_over_thousands_of_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    samples: dict[int, tuple[int, int, int]] = {}
    advance = metrics_log.MetricsLog.advance

    def measured(self: metrics_log.MetricsLog) -> None:
        advance(self)
        step = self.totals.step if self.enabled else 0
        if step in (WARM_UP, STEPS):
            samples[step] = (resident_kib(), *live_objects())

    monkeypatch.setattr(metrics_log.MetricsLog, "advance", measured)
    overrides = [
        f"data.train={SAMPLE_TRAIN}",
        f"data.eval={SAMPLE_EVAL}",
        "data.max_length=16",
        "data.max_prompt_length=8",
        "model.hidden_size=16",
        "model.num_layers=1",
        "model.num_heads=2",
        "train.batch_size=2",
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        "train.eval_every=500",
        "train.save_every=500",
        f"output_dir={tmp_path / 'out'}",
    ]
    run_dpo(load_config(DPOConfig, None, overrides))
    start, end = samples[WARM_UP], samples[STEPS]
    assert end[0] < 1.05 * start[0], ("resident KiB", start, end)
    assert end[1] < start[1] + 1000, ("Python blocks", start, end)
    assert end[2] <= start[2] + 16, ("tensors", start, end)
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS + STEPS // 500
