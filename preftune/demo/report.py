"""The demo's outputs: ``results.json``, the reward/KL frontier, training curves, a table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from preftune.train.plots import pyplot, read_records

COLOURS = {
    "sft": "black",
    "dpo": "tab:blue",
    "preferred-ft": "tab:orange",
    "unlikelihood": "tab:brown",
    "ppo": "tab:green",
    "ppo-gt": "tab:red",
    "rloo": "tab:purple",
    "online-dpo": "tab:cyan",
}
NAMES = {
    "sft": "SFT",
    "dpo": "DPO",
    "preferred-ft": "Preferred-FT",
    "unlikelihood": "Unlikelihood",
    "ppo": "PPO",
    "ppo-gt": "PPO-GT",
    "rloo": "RLOO",
    "online-dpo": "Online DPO",
}


def write_report(
    out: Path, rows: list[dict[str, Any]], policies: list, judge: str = "VADER"
) -> None:
    (out / "results.json").write_text(json.dumps({"judge": judge, "rows": rows}, indent=2) + "\n")
    plt = pyplot("preftune demo")
    plot_frontier(plt, rows, out / "frontier.png", judge)
    plot_curves(plt, policies, out / "curves.png")
    print(table(rows, judge))
    print(f"wrote {out / 'results.json'}, {out / 'frontier.png'} and {out / 'curves.png'}")


def table(rows: list[dict[str, Any]], judge: str = "VADER") -> str:
    lines = [
        f"| policy | reward ({judge}) | KL(π‖π_SFT) | win rate vs SFT [95% CI] | pair accuracy |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        accuracy = "" if row["pair_accuracy"] is None else f"{row['pair_accuracy']:.2f}"
        win = row.get("win_rate")
        wins = (
            ""
            if win is None
            else (
                f"{100 * win['win_rate']:.1f}% [{100 * win['interval'][0]:.1f}, "
                f"{100 * win['interval'][1]:.1f}]"
            )
        )
        lines.append(
            f"| {label(row)} | {row['reward']:+.3f} ± {row['reward_stderr']:.3f} "
            f"| {row['kl']:.2f} | {wins} | {accuracy} |"
        )
    return "\n".join(lines)


def label(row: dict[str, Any]) -> str:
    """The policy's name: DPO with its β, PPO and PPO-GT with their β_KL."""
    name = NAMES[row["method"]]
    if row["method"] in ("dpo", "online-dpo"):
        return f"{name} β={row['beta']:g}"
    if row["method"] in ("ppo", "ppo-gt"):
        return f"{name} β_KL={row['beta']:g}"
    return name


def plot_frontier(plt, rows: list[dict[str, Any]], path: Path, judge: str = "VADER") -> None:
    """Reward against KL, one curve per method (its settings joined in order of KL). A policy
    far off the others' KL scale (Unlikelihood's degenerate text) is drawn at the right edge,
    its KL written beside it, so that it does not squash the frontier."""
    figure, axes = plt.subplots(figsize=(7.2, 5.0), dpi=120)
    edge = kl_scale(rows)
    for method in COLOURS:
        mine = sorted((row for row in rows if row["method"] == method), key=lambda r: r["kl"])
        if not mine:
            continue
        xs = [min(row["kl"], edge) for row in mine]
        axes.errorbar(
            xs,
            [row["reward"] for row in mine],
            yerr=[row["reward_stderr"] for row in mine],
            fmt="o-" if len(mine) > 1 else "o",
            color=COLOURS[method],
            label=NAMES[method],
            markersize=5,
            linewidth=1,
        )
        for x, row in zip(xs, mine, strict=True):
            text = label(row) if row["kl"] <= edge else f"{label(row)} (KL {row['kl']:.0f} →)"
            axes.annotate(
                text,
                (x, row["reward"]),
                textcoords="offset points",
                # DPO labels left of their points, the others' right, so fewer collide.
                xytext=(-7, 3) if method == "dpo" or row["kl"] > edge else (7, -3),
                ha="right" if method == "dpo" or row["kl"] > edge else "left",
                fontsize=7,
            )
    axes.set_xlim(-0.05 * edge, edge * 1.05)
    axes.set_xlabel("KL(π ‖ π_SFT), nats per sample")
    axes.set_ylabel(
        "mean reward (VADER compound)" if judge == "VADER" else f"mean reward ({judge})"
    )
    axes.set_title("Controlled sentiment: reward vs KL")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def kl_scale(rows: list[dict[str, Any]]) -> float:
    """The KL axis's extent: past the policies' KLs, but not past 4 × their median."""
    kls = sorted(row["kl"] for row in rows if row["kl"] > 0) or [1.0]
    median = kls[len(kls) // 2]
    return max(kl for kl in kls if kl <= 4 * median) * 1.1


def plot_curves(plt, policies: list, path: Path) -> None:
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for policy in policies:
        records = read_records(policy.directory / "metrics.jsonl")
        train = [r for r in records if "loss" in r]
        if not train:  # the policy-gradient runs log rewards, not a loss to compare
            continue
        name = label({"method": policy.method, "beta": policy.beta})
        loss_axes.plot([r["step"] for r in train], [r["loss"] for r in train], label=name)
        evals = [r for r in records if "eval/rewards/accuracies" in r]
        if evals:
            accuracy_axes.plot(
                [r["step"] for r in evals],
                [r["eval/rewards/accuracies"] for r in evals],
                marker="o",
                label=name,
            )
    loss_axes.set(xlabel="step", ylabel="training loss", title="Loss per stage")
    accuracy_axes.set(
        xlabel="step", ylabel="held-out pair accuracy", title="Implicit-reward accuracy (DPO)"
    )
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
