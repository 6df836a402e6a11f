"""Results that flag themselves: checks ``evaluate`` runs beside the scores.

- **Answer floors**: per question type, the share of the most frequent reference answer, i.e.
  what a model that ignores the question and always gives that answer scores. A model below
  the floor of a type has learned something worse than the answer prior there (the KD students
  of issue #24 answered "red" to most colour questions, below "always green").
- **Image reliance**: the same questions with every image replaced by one constant grey image;
  the drop in accuracy is how much the model's answers depend on what it sees. A model (or a
  teacher) whose accuracy does not drop does not use the image.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from typing import Any, Sequence

from workloads.evaluation.metrics import normalize_answer

__all__ = ["answer_floors", "below_floor", "blind_examples", "floor_lines"]

BLIND_RGB = (128, 128, 128)


def answer_floors(refs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{type: {"answer", "floor", "n"}}`` and ``"overall"`` (each type answered with its
    own most frequent answer) from the reference records (``question_type``, ``answer``)."""
    by_type: dict[str, Counter] = defaultdict(Counter)
    for r in refs:
        by_type[str(r.get("question_type", "unknown"))][normalize_answer(str(r["answer"]))] += 1
    out: dict[str, dict[str, Any]] = {}
    for t, counts in sorted(by_type.items()):
        answer, top = counts.most_common(1)[0]
        n = sum(counts.values())
        out[t] = {"answer": answer, "floor": top / n, "n": n}
    total = sum(v["n"] for v in out.values())
    if total:
        out["overall"] = {"answer": "", "floor": sum(v["floor"] * v["n"] for v in out.values())
                          / total, "n": total}
    return out


def below_floor(by_type: dict[str, float], floors: dict[str, dict[str, Any]]
                ) -> dict[str, dict[str, float]]:
    """Types whose accuracy is strictly below their floor: ``{type: {"accuracy", "floor"}}``."""
    return {t: {"accuracy": acc, "floor": floors[t]["floor"]}
            for t, acc in sorted(by_type.items())
            if t in floors and t != "overall" and acc < floors[t]["floor"] - 1e-12}


def blind_examples(examples: Sequence[Any]) -> list[Any]:
    """The examples with every image replaced by a constant grey image of the same size."""
    from PIL import Image

    out = []
    for ex in examples:
        image = getattr(ex, "image", None)
        if image is None:
            out.append(ex)
            continue
        out.append(dataclasses.replace(ex, image=Image.new("RGB", image.size, BLIND_RGB)))
    return out


def floor_lines(flags: dict[str, dict[str, dict[str, float]]],
                floors: dict[str, dict[str, Any]], reliance: dict[str, dict[str, float]]
                ) -> list[str]:
    """Markdown lines for the summary: floors, models below them, image reliance."""
    lines = ["", "Most-frequent-answer floor per question type (always giving that answer): "
             + ", ".join(f"{t} {v['floor']:.3f} ({v['answer']!r})" for t, v in floors.items()
                         if t != "overall") + "."]
    flagged = {m: f for m, f in flags.items() if f}
    if flagged:
        lines += ["", "**Below the floor** (worse than always giving the most frequent answer):"]
        lines += [f"- {m}: " + ", ".join(f"{t} {v['accuracy']:.3f} < {v['floor']:.3f}"
                                        for t, v in f.items()) for m, f in flagged.items()]
    else:
        lines += ["", "No model is below the floor of any question type."]
    if reliance:
        lines += ["", "Image reliance (same questions, every image replaced by a grey one; a "
                      "drop near 0 means the answers do not depend on the image):", ""]
        lines += [f"- {m}: {v['accuracy']:.3f} → {v['blind_accuracy']:.3f} blind "
                  f"(drop {v['drop']:+.3f} on {int(v['n'])} questions)"
                  for m, v in reliance.items()]
    return lines
