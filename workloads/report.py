"""Pictures of results: a grouped bar chart of accuracy per model and question type."""

from __future__ import annotations

from typing import Any


def accuracy_chart(results: dict[str, dict[str, Any]], path: str, title: str = "") -> str:
    """Write a PNG: one group per metric (overall, then per question type), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    models = list(results)
    metrics = ["accuracy"] + sorted({k for r in results.values() for k in r
                                     if k.startswith("accuracy/")})
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(metrics) * max(len(models), 2) / 2), 4))
    for i, name in enumerate(models):
        xs = [j + i * width for j in range(len(metrics))]
        ax.bar(xs, [float(results[name].get(m, 0.0)) for m in metrics], width, label=name)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(metrics))])
    ax.set_xticklabels([m.replace("accuracy/", "") for m in metrics], rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(title or "held-out VQA accuracy")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
