"""The demo's outputs: ``results.json``, the reward/KL frontier, training curves, a table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from preftune.train.plots import pyplot, read_records

COLOURS = {"sft": "black", "dpo": "tab:blue", "preferred-ft": "tab:orange"}


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
        f"| policy | reward ({judge}) | KL(π‖π_SFT) | pair accuracy |",
        "|---|---|---|---|",
    ]
    for row in rows:
        accuracy = "" if row["pair_accuracy"] is None else f"{row['pair_accuracy']:.2f}"
        lines.append(
            f"| {label(row)} | {row['reward']:+.3f} ± {row['reward_stderr']:.3f} "
            f"| {row['kl']:.2f} | {accuracy} |"
        )
    return "\n".join(lines)


def label(row: dict[str, Any]) -> str:
    if row["method"] == "dpo":
        return f"DPO β={row['beta']:g}"
    return {"sft": "SFT", "preferred-ft": "Preferred-FT"}[row["method"]]


def plot_frontier(plt, rows: list[dict[str, Any]], path: Path, judge: str = "VADER") -> None:
    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for method in COLOURS:
        mine = [row for row in rows if row["method"] == method]
        if not mine:
            continue
        axes.errorbar(
            [row["kl"] for row in mine],
            [row["reward"] for row in mine],
            yerr=[row["reward_stderr"] for row in mine],
            fmt="o",
            color=COLOURS[method],
            label={"sft": "SFT", "dpo": "DPO", "preferred-ft": "Preferred-FT"}[method],
        )
        for row in mine:
            axes.annotate(
                label(row),
                (row["kl"], row["reward"]),
                textcoords="offset points",
                # DPO labels left of their points, the baselines' right, so none collide.
                xytext=(-7, 3) if method == "dpo" else (7, -3),
                ha="right" if method == "dpo" else "left",
                fontsize=8,
            )
    axes.set_xlabel("KL(π ‖ π_SFT), nats per sample")
    axes.set_ylabel(
        "mean reward (VADER compound)" if judge == "VADER" else f"mean reward ({judge})"
    )
    axes.set_title("Controlled sentiment: reward vs KL")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_curves(plt, policies: list, path: Path) -> None:
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for policy in policies:
        records = read_records(policy.directory / "metrics.jsonl")
        train = [r for r in records if "loss" in r]
        name = policy.method if policy.beta is None else f"DPO β={policy.beta:g}"
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
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
