"""Pictures of results: a grouped bar chart of accuracy per model and question type."""

from __future__ import annotations

import math
from typing import Any


def accuracy_chart(results: dict[str, dict[str, Any]], path: str, title: str = "",
                   metric: str = "accuracy") -> str:
    """Write a PNG: one group per metric (overall, then per question type), one bar per model,
    with the overall score's interval (``<metric>_low``/``_high``) as error bars when given."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    models = list(results)
    metrics = [metric] + sorted({k for r in results.values() for k in r
                                 if k.startswith(f"{metric}/")})
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(metrics) * max(len(models), 2) / 2), 4))
    for i, name in enumerate(models):
        xs = [j + i * width for j in range(len(metrics))]
        values = [float(results[name].get(m, 0.0)) for m in metrics]
        low, high = results[name].get(f"{metric}_low"), results[name].get(f"{metric}_high")
        err = None
        if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
            err = [[max(values[0] - low, 0)] + [0] * (len(metrics) - 1),
                   [max(high - values[0], 0)] + [0] * (len(metrics) - 1)]
        ax.bar(xs, values, width, label=name, yerr=err, capsize=3)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(metrics))])
    ax.set_xticklabels([m.replace(f"{metric}/", "") for m in metrics], rotation=30, ha="right")
    top = max((float(r.get(m, 0.0)) for r in results.values() for m in metrics), default=1.0)
    ax.set_ylim(0, 1 if top <= 1 else top * 1.1)
    ax.set_ylabel(metric)
    ax.set_title(title or "held-out VQA accuracy")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
