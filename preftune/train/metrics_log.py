"""Where metrics go: ``metrics.jsonl``, the trackers of ``train.report_to`` and a live progress
bar."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from preftune.errors import TrainingError
from preftune.files import write_text_atomically
from preftune.train.trackers import Tracker

SHOWN = ("loss", "rewards/accuracies", "rewards/margins")
SAMPLES = "samples.jsonl"
"""The policy's continuations of fixed eval prompts at each evaluation (``train.eval_samples``)."""


class MetricsLog:
    """Writes on the main process only; on resume, forgets records after the resumed step.

    Each record is one JSON line appended whole; a non-finite value is written as ``null``.
    """

    def __init__(
        self,
        output_dir: str | Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        desc: str,
        trackers: Sequence[Tracker] = (),
    ) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tokens = 0
        self._clock = time.perf_counter()
        self.latest: dict[str, float] = {}
        """Everything logged at the newest logged step, train and eval merged."""
        self.trackers = list(trackers)
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._drop_samples_after(start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)

    def count_tokens(self, tokens: int) -> None:
        self._tokens += tokens

    def log(self, step: int, metrics: dict[str, float], prefix: str = "") -> dict[str, float]:
        """Record ``metrics`` for ``step``; train records also get ``tokens_per_second``."""
        record = {f"{prefix}{key}": value for key, value in metrics.items()}
        if not prefix:
            now = time.perf_counter()
            record["tokens_per_second"] = self._tokens / max(now - self._clock, 1e-9)
            self._tokens, self._clock = 0, now
        self._remember(step, record)
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": step, **_finite(record)}) + "\n")
            for tracker in self.trackers:
                tracker.log(record, step)
            shown = {k.removeprefix("rewards/"): f"{record[k]:.4g}" for k in SHOWN if k in record}
            self.bar.set_postfix(shown, refresh=False)
        return record

    def samples(self, step: int, rows: list[dict[str, object]]) -> None:
        """Record the policy's continuations of fixed eval prompts at ``step``: one JSON line
        each in ``samples.jsonl``, and a text table for trackers that show text."""
        if not self.enabled or not rows:
            return
        path = self.path.with_name(SAMPLES)
        with path.open("a") as handle:
            handle.writelines(json.dumps({"step": step, **row}) + "\n" for row in rows)
        table = "\n".join(f"**{row['prompt']!s}**\n\n{row['completion']!s}\n\n---" for row in rows)
        for tracker in self.trackers:
            text = getattr(tracker, "text", None)
            if text is not None:
                text("samples", table, step)

    def _drop_samples_after(self, step: int) -> None:
        """A resumed run forgets the samples of the steps it will take again."""
        path = self.path.with_name(SAMPLES)
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (ValueError, TypeError, KeyError):
                continue  # a line cut short by a kill
        write_text_atomically(path, "".join(kept))

    def advance(self) -> None:
        if self.enabled:
            self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            for tracker in self.trackers:
                tracker.close()
            self.bar.close()

    def _remember(self, step: int, record: dict[str, float]) -> None:
        if self.latest.get("step") != step:
            self.latest = {"step": step}
        self.latest |= record

    def _truncate_after(self, step: int) -> None:
        """Keep the records up to ``step``, rewriting the file atomically.

        A process killed while appending leaves a partial last line, which is dropped; any other
        line that is not JSON means the file is damaged, and is an error rather than a guess.
        """
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        kept = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step_of_record = record["step"]
            except (ValueError, TypeError, KeyError):
                if number == len(lines):
                    break
                damaged = f"{self.path}: line {number} is not a metrics record"
                raise TrainingError(f"{damaged}; move the file away to resume") from None
            if step_of_record <= step:
                kept.append(line)
                self._remember(record.pop("step"), record)
        write_text_atomically(self.path, "".join(line + "\n" for line in kept))


def _finite(record: dict[str, float]) -> dict[str, float | None]:
    """Strict JSON has no NaN or infinity: such values are written as ``null``."""
    return {key: value if math.isfinite(value) else None for key, value in record.items()}
