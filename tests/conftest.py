from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_TRAIN = ROOT / "examples" / "data" / "sums_train.jsonl"
SAMPLE_EVAL = ROOT / "examples" / "data" / "sums_eval.jsonl"
SAMPLE_SFT = ROOT / "examples" / "data" / "sums_sft.jsonl"


def accelerate_launch(*engine: str) -> list[str]:
    """``accelerate launch`` of two processes on one machine with ``engine``'s options, as it
    runs them without a GPU."""
    accelerate = str(Path(sys.prefix, "bin", "accelerate"))
    fixed = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    return [accelerate, "launch", *engine, *fixed, "--dynamo_backend", "no"]


LAUNCHER = accelerate_launch("--multi_gpu")


def fresh_launcher() -> list[str]:
    """:data:`LAUNCHER` on a port no other launch used: a launch right after one killed with
    SIGKILL then never meets that one's sockets (gloo has been seen to wait forever there)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [*LAUNCHER, "--main_process_port", str(port)]


@pytest.fixture(autouse=True, scope="session")
def _private_reference_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Reference log-probs cached by the tests stay in a temporary directory of the session."""
    os.environ["PREFTUNE_CACHE"] = str(tmp_path_factory.mktemp("preftune-cache"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def run_cli(*args: str, launcher: list[str] | None = None, cwd: Path = ROOT):
    """Run ``python -m preftune`` (or under ``launcher``) in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    command = [*(launcher or [sys.executable]), "-m", "preftune", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def small_run(tmp_path: Path) -> list[str]:
    """Overrides for a few-second DPO run of the tiny preset on the bundled sample."""
    return [
        f"data.train={SAMPLE_TRAIN}",
        "data.max_length=48",
        "data.max_prompt_length=24",
        "train.batch_size=8",
        "train.max_steps=6",
        "train.learning_rate=1e-3",
        "train.log_every=1",
        f"output_dir={tmp_path / 'out'}",
    ]


@pytest.fixture(scope="module")
def tiny() -> Any:
    """The tiny preset's byte-level tokenizer."""
    from preftune.models.tiny import build_tokenizer

    return build_tokenizer()
