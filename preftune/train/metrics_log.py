"""Where metrics go: ``metrics.jsonl``, TensorBoard event files and a live progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

SHOWN = ("loss", "rewards/accuracies", "rewards/margins")


class MetricsLog:
    """Writes on the main process only; on resume, forgets records after the resumed step."""

    def __init__(
        self, output_dir: str | Path, total_steps: int, start_step: int, enabled: bool, desc: str
    ) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tokens = 0
        self._clock = time.perf_counter()
        self.latest: dict[str, float] = {}
        """Everything logged at the newest logged step, train and eval merged."""
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self.writer = SummaryWriter(
            str(Path(output_dir) / "tensorboard"), purge_step=start_step + 1
        )
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
                handle.write(json.dumps({"step": step, **record}) + "\n")
            for key, value in record.items():
                self.writer.add_scalar(key, value, step)
            shown = {k.removeprefix("rewards/"): f"{record[k]:.4g}" for k in SHOWN if k in record}
            self.bar.set_postfix(shown, refresh=False)
        return record

    def advance(self) -> None:
        if self.enabled:
            self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.bar.close()

    def _remember(self, step: int, record: dict[str, float]) -> None:
        if self.latest.get("step") != step:
            self.latest = {"step": step}
        self.latest |= record

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            record = json.loads(line) if line.strip() else {"step": step + 1}
            if record["step"] <= step:
                kept.append(line)
                self._remember(record.pop("step"), record)
        self.path.write_text("".join(line + "\n" for line in kept))
