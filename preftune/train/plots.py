"""A run's training curves as a picture: ``output_dir/metrics.png``, from ``metrics.jsonl``.

At the end of a run the picture is drawn on a thread of its own (:class:`Drawing`) while the run
writes its model, so plotting (matplotlib takes a while to import and draw) is off the run's
critical path. It draws on a figure of its own, never through pyplot's global state.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError

# Panels, each of the metrics it shows, in order; a panel is drawn when its first metric was
# logged. Evaluation values (``eval/`` keys) are drawn as points on the same panel.
PANELS = (
    ("loss", ("loss",)),
    ("implicit reward", ("rewards/chosen", "rewards/rejected")),
    ("reward margin", ("rewards/margins",)),
    ("pair accuracy", ("rewards/accuracies",)),
    ("reward of samples", ("reward",)),
    ("KL to the reference", ("kl",)),
    ("policy-gradient losses", ("policy_loss", "value_loss")),
    ("entropy", ("entropy",)),
)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def figure_class(purpose: str) -> type:
    """matplotlib's Figure (which draws without pyplot's global state or a backend chosen), or
    a one-line error saying how to get matplotlib."""
    try:
        import matplotlib  # noqa: F401  (the package itself, whatever of it is imported already)
        from matplotlib.figure import Figure
    except ImportError:
        raise PreftuneError(f"{purpose} needs matplotlib: pip install 'preftune[demo]'") from None
    return Figure


def pyplot(purpose: str):
    """matplotlib's pyplot on a file-only backend, or a one-line error saying how to get it."""
    figure_class(purpose)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(output_dir: Path) -> Path | None:
    """Draw ``output_dir/metrics.png`` from ``output_dir/metrics.jsonl``: one panel per metric
    group, training values as lines and evaluation values as points. Returns its path, or None
    when nothing was logged."""
    records = read_records(output_dir / "metrics.jsonl")
    panels = [(title, keys) for title, keys in PANELS if any(keys[0] in r for r in records)]
    if not panels:
        return None
    figure = figure_class("plotting metrics")(figsize=(4 * len(panels), 3.4), dpi=110)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            label = key.removeprefix("rewards/")
            train = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            colour = None
            if train:
                (line,) = ax.plot(*zip(*train, strict=True), label=label)
                colour = line.get_color()
            evals = [
                (r["step"], r[f"eval/{key}"]) for r in records if r.get(f"eval/{key}") is not None
            ]
            if evals:
                ax.plot(*zip(*evals, strict=True), "o", color=colour, label=f"eval {label}")
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    path = output_dir / "metrics.png"
    figure.savefig(path)
    return path


class Drawing:
    """``output_dir/metrics.png`` being drawn on a thread of its own, started now."""

    def __init__(self, output_dir: Path) -> None:
        self.missing: str | None = None
        self.thread = threading.Thread(target=self._draw, args=(output_dir,), daemon=True)
        self.thread.start()

    def _draw(self, output_dir: Path) -> None:
        try:
            plot_metrics(output_dir)
        except PreftuneError as error:
            self.missing = str(error)
        except Exception as error:  # a picture that fails must not fail the trained run
            self.missing = f"drawing it failed ({type(error).__name__}: {error})"

    def wait(self) -> str | None:
        """Once drawn: None, or the line saying why there is no picture."""
        self.thread.join()
        return self.missing
