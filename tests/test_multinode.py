"""Several nodes: two launches on one machine, each a "node" with its own rank range, joined by
a local rendezvous, train as one unsharded process does; and a directory that not every process
can see is one line."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate import Accelerator

from preftune.data.digest import examples_digest
from preftune.data.encode import Budget
from preftune.errors import ConfigError
from preftune.models.tiny import build_tokenizer
from preftune.train.run_dir import check_shared
from tests.conftest import ROOT, SAMPLE_TRAIN
from tests.test_data_cache import LAUNCHED
from tests.test_data_scale import whole
from tests.test_fsdp import COMMON, assert_same_losses, preftune
from tests.test_resume import environment


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def node(
    rank: int, port: int, args: list[str], env: dict[str, str] | None = None
) -> subprocess.Popen:
    """One "node": a launcher of one process, rank ``rank`` of two; ``args`` follow
    ``python`` (``-m preftune ...`` or a script)."""
    launcher = [
        str(Path(sys.prefix, "bin", "accelerate")),
        "launch",
        "--multi_gpu",
        "--num_machines",
        "2",
        "--machine_rank",
        str(rank),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    return subprocess.Popen(
        [*launcher, *args],
        cwd=ROOT,
        env={**environment(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(launches: list[subprocess.Popen]) -> list[str]:
    """Each launch's standard output, once all have ended well."""
    outputs = []
    for launched in launches:
        out, err = launched.communicate(timeout=600)
        assert launched.returncode == 0, err[-3000:]
        outputs.append(out)
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_nodes_train_as_one_process(tmp_path: Path, engine: str) -> None:
    """Each node with a cache directory of its own, as on local disks: the first node's holds
    the reference log-probs (from the one-process run), the second node's nothing; they are
    read once and sent."""
    one, nodes = tmp_path / "one", tmp_path / "nodes"
    caches = [tmp_path / f"cache-{rank}" for rank in (0, 1)]
    run = ["dpo", f"data.train={SAMPLE_TRAIN}", *COMMON, "train.micro_batch_size=2"]
    preftune([*run, f"output_dir={one}"], env={"PREFTUNE_CACHE": str(caches[0])})
    port = free_port()
    sharded = ["-m", "preftune", *run, f"train.distributed={engine}", f"output_dir={nodes}"]
    first, _ = finish(
        [node(rank, port, sharded, {"PREFTUNE_CACHE": str(caches[rank])}) for rank in (0, 1)]
    )
    assert_same_losses(one, nodes)
    assert "train: reference log-probs from the cache" in first
    assert not caches[1].exists()


@pytest.mark.slow
def test_each_node_tokenizes_into_its_own_examples_cache(tmp_path: Path) -> None:
    """A large dataset (every dataset, here) is tokenized once on each node whose disk does
    not hold the main process's entry, and every process reads the same examples."""
    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED)
    caches = [tmp_path / f"cache-{rank}" for rank in (0, 1)]
    port = free_port()
    outputs = finish(
        [
            node(
                rank,
                port,
                [str(script), str(SAMPLE_TRAIN), "-"],
                {"PREFTUNE_CACHE": str(caches[rank])},
            )
            for rank in (0, 1)
        ]
    )
    lines = [line for out in outputs for line in out.splitlines() if line.startswith("process")]
    expected = whole(SAMPLE_TRAIN, "pairs", build_tokenizer(), False, Budget(512, 256))[0]
    digest = examples_digest(expected)
    assert lines == [f"process {rank}: 1 encoded, 256 pairs, digest {digest}" for rank in (0, 1)], (
        outputs
    )
    for cache in caches:
        assert len(list((cache / "examples").glob("*.arrow"))) == 1


def test_an_output_dir_one_process_cannot_see_is_one_line(tmp_path: Path) -> None:
    """What another node would find: a lock file naming a holder other than the main process."""
    (tmp_path / ".preftune-lock").write_text('{"host": "node-0", "pid": 1}')
    with pytest.raises(ConfigError, match="is not shared by every process: process 0 cannot see"):
        check_shared(tmp_path, {"host": "node-0", "pid": 2}, Accelerator(cpu=True))
    check_shared(tmp_path, {"host": "node-0", "pid": 1}, Accelerator(cpu=True))
