"""The evaluate stage's numbers: accuracy per question type, each model's interval, a paired
test for every pair of models, seed arms, and the markdown/CSV tables they are printed in."""

from __future__ import annotations

import csv
import io
import itertools
import re
from collections import defaultdict
from typing import Any, Iterable, Sequence

from workloads.evaluation.metrics import Metric

__all__ = ["accuracy_by_type", "results_table", "score_interval", "compare_models", "seed_arms",
           "summary_markdown"]


def accuracy_by_type(records: Iterable[dict[str, Any]], key: str = "correct"
                     ) -> dict[str, float]:
    """``{"overall": mean, "<type>": mean, ...}`` of ``key`` (a 0/1 or soft score) over
    records with ``question_type``."""
    hits: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for r in records:
        for k in ("overall", r["question_type"]):
            hits[k][0] += float(r[key])
            hits[k][1] += 1
    return {k: c / n for k, (c, n) in sorted(hits.items(), key=lambda kv: kv[0] != "overall")}


def _integral_columns(results: dict[str, dict[str, Any]], cols: list[str], first: str
                      ) -> set[str]:
    """Columns whose every value is a whole number (counts, parameters): printed as integers."""
    out = set()
    for c in cols:
        if c.startswith(first):
            continue
        values = [m[c] for m in results.values() if m.get(c) is not None]
        if values and all(isinstance(v, (int, float)) and float(v).is_integer() for v in values) \
                and not c.startswith(("accuracy", "caption")) and not c.endswith(("_low", "_high")):
            out.add(c)
    return out


def results_table(results: dict[str, dict[str, Any]], first: str = "accuracy") -> tuple[str, str]:
    """Markdown and CSV tables: one row per model, one column per metric (union, sorted; the
    headline ``first`` and its interval first). Counts print as integers."""
    lead = [first, f"{first}_low", f"{first}_high"]
    cols = sorted({c for m in results.values() for c in m},
                  key=lambda c: (c not in lead, lead.index(c) if c in lead else 0,
                                 not c.startswith(first), c))
    ints = _integral_columns(results, cols, first)

    def fmt(c: str, v: Any) -> str:
        if v is None:
            return ""
        if c in ints:
            return str(int(v))
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    md = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", *cols])
    for name, m in results.items():
        md.append(f"| {name} | " + " | ".join(fmt(c, m.get(c)) for c in cols) + " |")
        w.writerow([name, *(fmt(c, m.get(c)) for c in cols)])
    return "\n".join(md) + "\n", buf.getvalue()


def _image_of(r: dict[str, Any]) -> Any:
    return r.get("image_id", r.get("image", r.get("question_id")))


def score_interval(metric: Metric, records: Sequence[dict[str, Any]], scores: Sequence[float],
                   confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
                   ) -> tuple[float, float]:
    """Interval of the metric's headline: Wilson for a proportion (0/1 scores averaged), a
    percentile bootstrap of the mean for soft scores, and a bootstrap that recomputes the
    headline for the others (POPE F1 over questions; MME over images, both questions of an
    image together, since acc+ needs the pair)."""
    import numpy as np

    from workloads.evaluation.stats import bootstrap_interval, wilson_interval

    if not scores:
        return float("nan"), float("nan")
    if metric.mean_headline and metric.binary:
        return wilson_interval(int(round(sum(scores))), len(scores), confidence)
    if metric.mean_headline:
        return bootstrap_interval(scores, confidence, n_resamples, seed)
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[_image_of(r) if metric.name == "mme" else i].append(r)
    units = list(groups.values())
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(max(200, n_resamples // 4)):  # each resample rescores every record
        pick = rng.integers(0, len(units), len(units))
        sample = [r for j in pick for r in units[j]]
        stats.append(metric.aggregate(sample)[metric.headline])
    alpha = (1 - confidence) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def compare_models(scores: dict[str, list[float]], confidence: float = 0.95,
                   n_resamples: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """A paired test for every pair of models scored on the same questions (later − earlier):
    McNemar's test for 0/1 scores, a paired bootstrap otherwise; the difference's interval
    from the paired bootstrap."""
    from workloads.evaluation.stats import format_comparison, paired_comparison

    out = []
    for a, b in itertools.combinations(scores, 2):
        if len(scores[a]) != len(scores[b]) or not scores[a]:
            continue
        c = paired_comparison(scores[a], scores[b], confidence, n_resamples, seed)
        out.append({"a": a, "b": b, "diff": c.diff, "low": c.low, "high": c.high, "p": c.p,
                    "test": c.test, "n": c.n, "text": format_comparison(b, a, c)})
    return out


_SEED = re.compile(r"^(?P<arm>.+?)_seed-(?P<seed>-?\d+)$")


def seed_arms(results: dict[str, dict[str, Any]], headline: str,
              confidence: float = 0.95) -> dict[str, dict[str, Any]]:
    """Models named ``<arm>_seed-<n>`` grouped per arm (two seeds or more): mean ± std of the
    headline across seeds and the t-interval of the mean."""
    from workloads.evaluation.stats import seed_summary

    arms: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for name, res in results.items():
        m = _SEED.match(name)
        if m and res.get(headline) is not None:
            arms[m["arm"]].append((int(m["seed"]), float(res[headline])))
    out = {}
    for arm, values in arms.items():
        if len(values) < 2:
            continue
        s = seed_summary([v for _, v in sorted(values)], confidence)
        out[arm] = {"mean": s.mean, "std": s.std, "low": s.low, "high": s.high, "seeds": s.n}
    return out


def summary_markdown(table: str, metric: str, head: str, comparisons: list[dict[str, Any]],
                      arms: dict[str, dict[str, Any]], confidence: float) -> str:
    pct = int(round(confidence * 100))
    lines = [table, f"{head} ({metric}) with its {pct}% interval (`{head}_low`, `{head}_high`)."]
    if comparisons:
        test = "McNemar" if all(c["test"] == "mcnemar" for c in comparisons) else "paired test"
        lines += ["", f"Paired comparisons (same questions; {pct}% interval of the difference, "
                      f"{test} p-value):", ""]
        lines += [f"- {c['text']}" for c in comparisons]
    if arms:
        lines += ["", f"Seed arms ({head}, mean ± std across seeds, {pct}% interval "
                      "of the mean):", "", "| arm | seeds | mean | std | low | high |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {a} | {v['seeds']} | {v['mean']:.4f} | {v['std']:.4f} | {v['low']:.4f} | "
                  f"{v['high']:.4f} |" for a, v in arms.items()]
    return "\n".join(lines) + "\n"
