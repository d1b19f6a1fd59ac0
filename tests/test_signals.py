"""SIGTERM (a cluster's preemption) and Ctrl-C finish the step in progress, save a checkpoint
and exit with the conventional status and one line; the same command then resumes, and the run
ends with the weights of one never interrupted. A second signal stops at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.train.interrupt import REPEAT_WINDOW, Stopped, StopRequest
from tests.conftest import ROOT, fresh_launcher
from tests.test_resume import RUN as RESUME_RUN
from tests.test_resume import environment, logged_step

STEPS = 400
# The resume test's run, longer, checkpointing only at the end.
RUN = [
    *(arg for arg in RESUME_RUN if not arg.startswith(("data.eval", "train."))),
    "train.batch_size=4",
    f"train.max_steps={STEPS}",
    "train.learning_rate=1e-3",
    "train.log_every=1",
    "train.save_every=1000",
    "train.report_to=none",
]


def start(output_dir: Path, launcher: list[str] | None = None) -> subprocess.Popen:
    command = [*(launcher or [sys.executable]), "-m", "preftune", *RUN, f"output_dir={output_dir}"]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(output_dir: Path, launcher: list[str] | None = None) -> None:
    process = start(output_dir, launcher)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]


def interrupt(process: subprocess.Popen, output_dir: Path, signum: int, after: int) -> str:
    deadline = time.monotonic() + 300
    while logged_step(output_dir) < after:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    return err


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_and_the_run_resumes_exactly(
    tmp_path: Path, signum: int, status: int
) -> None:
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    finish(whole)
    process = start(stopped)
    err = interrupt(process, stopped, signum, after=5)
    assert process.returncode == status, err[-3000:]
    last = err.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert last.startswith(f"preftune: interrupted ({name}) at step "), err[-3000:]
    assert last.endswith(f" of {STEPS}; checkpoint saved; run the same command to resume")
    assert "Traceback" not in err
    step = int(last.split(" at step ")[1].split()[0])
    assert (stopped / "checkpoints" / f"step-{step:08d}").is_dir()
    assert logged_step(stopped) == step
    finish(stopped)
    expected, actual = (
        load_file(whole / "model.safetensors"),
        load_file(stopped / "model.safetensors"),
    )
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


@pytest.mark.slow
def test_sigterm_under_accelerate_launch_stops_every_process_at_one_step(tmp_path: Path) -> None:
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    finish(whole, fresh_launcher())
    process = start(stopped, fresh_launcher())
    err = interrupt(process, stopped, signal.SIGTERM, after=5)
    assert process.returncode != 0
    assert "checkpoint saved; run the same command to resume" in err, err[-3000:]
    assert len(list((stopped / "checkpoints").glob("step-*"))) == 1
    finish(stopped, fresh_launcher())
    expected, actual = (
        load_file(whole / "model.safetensors"),
        load_file(stopped / "model.safetensors"),
    )
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_the_first_signal_asks_and_a_second_one_stops_at_once() -> None:
    request = StopRequest()
    with request.watch():
        os.kill(os.getpid(), signal.SIGINT)
        assert request.requested and request.signum == signal.SIGINT
        # A repeat within the window (a launcher relaying the same Ctrl-C) is the same request.
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(REPEAT_WINDOW + 0.1)
        with pytest.raises(Stopped) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert stopped.value.status == 143
    assert "second SIGTERM during training" in str(stopped.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
