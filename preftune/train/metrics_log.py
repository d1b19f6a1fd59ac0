"""Where metrics go: ``metrics.jsonl``, the trackers of ``train.report_to``, and a live progress
bar or one plain line per logged step (see :mod:`preftune.progress`); and each run's closing
summary."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from preftune.errors import TrainingError
from preftune.files import write_text_atomically
from preftune.progress import bars_shown, current, logger
from preftune.train.trackers import Tracker

SHOWN = ("loss", "rewards/accuracies", "rewards/margins")
SAMPLES = "samples.jsonl"
"""The policy's continuations of fixed eval prompts at each evaluation (``train.eval_samples``)."""
LINE_KEYS = (
    ("loss", "loss", ".3g"),
    ("rewards/accuracies", "acc", ".2f"),
    ("rewards/margins", "margin", ".3g"),
    ("reward", "reward", ".3g"),
    ("kl", "kl", ".3g"),
)
"""The metrics a plain progress line and the summary show when logged: (key, name, format)."""


@dataclass
class Totals:
    """What a run did, counted as it trains, for its closing summary: the step it reached of
    ``steps``, the step it started from (a resumed run's checkpoint), and the tokens it read and
    seconds it trained in this process's run."""

    step: int = 0
    steps: int = 0
    start: int = 0
    tokens: int = 0
    seconds: float = 0.0


class MetricsLog:
    """Writes on the main process only; on resume, forgets records after the resumed step.

    Each record is one JSON line appended whole; a non-finite value is written as ``null``.
    ``totals`` is filled in as the run goes (a new one when not given).
    """

    def __init__(
        self,
        output_dir: str | Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        desc: str,
        trackers: Sequence[Tracker] = (),
        totals: Totals | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.totals = totals if totals is not None else Totals()
        self.totals.step = self.totals.start = start_step
        self.totals.steps = total_steps
        self.lines = current() == "plain"
        """One plain line per logged step and per evaluation, through the ``preftune`` logger."""
        self._tokens = 0
        self._clock = self._started = time.perf_counter()
        self.latest: dict[str, float] = {}
        """Everything logged at the newest logged step, train and eval merged."""
        self.trackers = list(trackers)
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._drop_samples_after(start_step)
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc=desc,
            dynamic_ncols=True,
            disable=not bars_shown(),
        )

    def count_tokens(self, tokens: int) -> None:
        self._tokens += tokens
        self.totals.tokens += tokens

    def log(self, step: int, metrics: dict[str, float], prefix: str = "") -> dict[str, float]:
        """Record ``metrics`` for ``step``; train records also get ``tokens_per_second``."""
        record = {f"{prefix}{key}": value for key, value in metrics.items()}
        if not prefix:
            now = time.perf_counter()
            record["tokens_per_second"] = self._tokens / max(now - self._clock, 1e-9)
            self._tokens, self._clock = 0, now
        self._remember(step, record)
        self.totals.step = step
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": step, **_finite(record)}) + "\n")
            for tracker in self.trackers:
                tracker.log(record, step)
            shown = {k.removeprefix("rewards/"): f"{record[k]:.4g}" for k in SHOWN if k in record}
            self.bar.set_postfix(shown, refresh=False)
            if self.lines:
                logger.info(self._line(step, record, prefix))
        return record

    def _line(self, step: int, record: dict[str, float], prefix: str) -> str:
        """``step 40/200 loss 0.512 acc 0.81 margin 0.93 lr 4.0e-07 2,140 tok/s eta 3m12s``, or
        for an evaluation ``eval step 40/200 loss 0.498 acc 0.84 margin 1.02``: the keys
        logged; the time left from the mean step time of this run so far."""
        where = f"step {step}/{self.totals.steps}"
        if prefix:
            return " ".join([f"{prefix.rstrip('/')} {where}", *_shown(record, prefix)])
        parts = [where, *_shown(record)]
        if "learning_rate" in record:
            parts.append(f"lr {record['learning_rate']:.1e}")
        parts.append(f"{record['tokens_per_second']:,.0f} tok/s")
        left, done = self.totals.steps - step, step - self.totals.start
        if left > 0 and done > 0:
            mean = (time.perf_counter() - self._started) / done
            parts.append(f"eta {duration(mean * left)}")
        return " ".join(parts)

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
        self.totals.seconds = time.perf_counter() - self._started
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


def summary_line(totals: Totals, metrics: dict[str, float], output_dir: str | Path) -> str:
    """The run in one line, for its end: ``done: 200 steps in 3m12s, 1.23M tokens; train loss
    0.41 acc 0.88 margin 1.2; eval loss 0.45 acc 0.85; model in runs/x``, from its ``totals``
    and the ``metrics`` of its last logged step (train and eval merged)."""
    done = f"done: {totals.step} steps"
    if totals.start:
        done += f" ({totals.step - totals.start} after resuming at step {totals.start})"
    parts = [f"{done} in {duration(totals.seconds)}, {_count(totals.tokens)} tokens"]
    for prefix, name in (("", "train"), ("eval/", "eval")):
        shown = _shown(metrics, prefix)
        if shown:
            parts.append(" ".join([name, *shown]))
    parts.append(f"model in {output_dir}")
    return "; ".join(parts)


def duration(seconds: float) -> str:
    """``45s``, ``3m12s`` or ``2h05m``."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _count(number: int) -> str:
    """``950``, ``12.3k``, ``1.23M``: three significant digits."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if number >= 0.9995 * size:  # 999,999 is 1M, not 1e+03k
            return f"{number / size:.3g}{unit}"
    return str(number)


def _shown(record: dict[str, float], prefix: str = "") -> list[str]:
    """``loss 0.512``, ``acc 0.81``, …: the :data:`LINE_KEYS` under ``prefix`` in ``record``."""
    return [
        f"{name} {record[prefix + key]:{spec}}"
        for key, name, spec in LINE_KEYS
        if prefix + key in record
    ]


def _finite(record: dict[str, float]) -> dict[str, float | None]:
    """Strict JSON has no NaN or infinity: such values are written as ``null``."""
    return {key: value if math.isfinite(value) else None for key, value in record.items()}
