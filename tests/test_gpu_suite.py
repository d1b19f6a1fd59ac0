"""The GPU suite exists and its CPU-capable parts run: the scripts parse, and the checks that
need no GPU pass on the CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("script", ["gpu_suite.sh", "gpu_wheels.sh"])
def test_the_scripts_parse(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(ROOT / "bench" / script)], capture_output=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_the_checks_that_need_no_gpu_pass_on_the_cpu() -> None:
    command = [sys.executable, "bench/gpu_checks.py", "--device", "cpu", "--quick"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    table = result.stdout.splitlines()
    assert any(line.startswith("| layouts |") and '"ok": true' in line for line in table)
    assert any(line.startswith("| fsdp2, one device |") and '"ok": true' in line for line in table)
