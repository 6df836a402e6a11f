"""``evaluate``: greedy VQA exact match (overall and per question type), caption perplexity, a
predictions JSONL per model and a results table (markdown + CSV) comparing the models, with each
model's parameter count (an ensemble counts all its experts) and, from its lineage
(``workloads.lineage``), the samples and wall seconds of every stage that made it.

Inputs:
  models    list of model dirs, or a dict name -> model dir (names: the upstream stage names)
  data      held-out VQA split (shards dir), e.g. ``shapes.eval``
  captions  optional caption split for perplexity, e.g. ``shapes.captions``

Model names: a dict input keeps its keys; a list takes ``config.names`` when given, else
``<parent dir>/model`` → the parent dir's name (the artifact store names stage outputs by stage).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import string
from collections import defaultdict
from typing import Any, Iterable

from pydantic import Field

from orchestrator.plugin import SUMMARY_FILE, StageContext
from workloads.data.preflight import validate_config_sources
from workloads.data.source import DataSource
from orchestrator.plugin import WorkloadConfig, workload
from workloads.report import accuracy_chart

__all__ = ["EvalConfig", "evaluate", "normalize_answer", "exact_match", "accuracy_by_type",
           "results_table", "model_names", "generate_answer", "caption_perplexity"]

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace."""
    text = _PUNCT.sub(" ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def accuracy_by_type(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """``{"overall": acc, "<type>": acc, ...}`` from records with ``correct`` and ``question_type``."""
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        for k in ("overall", r["question_type"]):
            hits[k][0] += int(bool(r["correct"]))
            hits[k][1] += 1
    return {k: c / n for k, (c, n) in sorted(hits.items(), key=lambda kv: kv[0] != "overall")}


def results_table(results: dict[str, dict[str, float]]) -> tuple[str, str]:
    """Markdown and CSV tables: one row per model, one column per metric (union, sorted;
    ``accuracy`` first)."""
    cols = sorted({c for m in results.values() for c in m},
                  key=lambda c: (c != "accuracy", not c.startswith("accuracy"), c))
    fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    md = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", *cols])
    for name, m in results.items():
        md.append(f"| {name} | " + " | ".join(fmt(m.get(c)) for c in cols) + " |")
        w.writerow([name, *(fmt(m.get(c)) for c in cols)])
    return "\n".join(md) + "\n", buf.getvalue()


def model_names(models: Any, names: list[str] | None = None) -> dict[str, str]:
    """Name → model dir for the ``models`` input (see module docstring)."""
    if isinstance(models, dict):
        return {str(k): str(v) for k, v in models.items()}
    models = [models] if isinstance(models, str) else list(models)
    if names is not None:
        if len(names) != len(models):
            raise ValueError(f"evaluate: `names` has {len(names)} entries for {len(models)} models")
        return dict(zip(names, models))
    out: dict[str, str] = {}
    for path in models:
        p = os.path.normpath(path)
        base = os.path.basename(p)
        name = os.path.basename(os.path.dirname(p)) if base == "model" else base
        while name in out:
            name += "_"
        out[name] = path
    return out


class EvalConfig(WorkloadConfig):
    names: list[str] | None = Field(None, description="names for a list `models` input, in order")
    max_new_tokens: int = Field(8, ge=1, description="greedy tokens generated per question")
    max_samples: int | None = Field(None, ge=1, description="evaluate at most this many questions")
    caption_samples: int = Field(64, ge=1, description="captions scored for perplexity")
    max_length: int = Field(256, ge=8)
    data: DataSource | None = Field(
        None, description="held-out questions with answers (e.g. a LLaVA JSON file); "
                          "omit to use input `data` (WebDataset shards such as shapes.eval)")


def conversation_messages(conv: list[dict[str, str]]) -> list[dict[str, str]]:
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"role": role[t["from"]], "content": t["value"]} for t in conv]


def generate_answer(model: Any, processor: Any, example: Any, max_new_tokens: int) -> str:
    """Greedy answer to one ``EvalExample``."""
    import torch

    conv = [dict(t) for t in example.prompt_conversation]
    tok = processor.image_token
    if example.image is not None and not any(tok in t["value"] for t in conv):
        first = next(t for t in conv if t["from"] == "human")
        first["value"] = f"{tok}\n{first['value']}"
    text = processor.tokenizer.apply_chat_template(conversation_messages(conv), tokenize=False,
                                                   add_generation_prompt=True)
    images = [example.image] if example.image is not None else None
    enc = processor(images=images, text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def caption_perplexity(model: Any, batches: Iterable[dict[str, Any]]) -> float:
    """exp(mean next-token NLL over label tokens) on collated batches."""
    import torch

    from workloads.train_setup import model_inputs

    nll, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(**model_inputs(b)).logits[:, :-1].float()
            labels = b["labels"][:, 1:]
            mask = labels != -100
            nll += float(torch.nn.functional.cross_entropy(
                logits[mask], labels[mask], reduction="sum"))
            count += int(mask.sum())
    return math.exp(nll / max(count, 1))


def _source(path: Any) -> Any:
    from workloads.data.source import DataSource

    path = path[0] if isinstance(path, list) else path
    return DataSource(format="webdataset", paths=[path])


@workload("evaluate", config=EvalConfig, version="2", outputs=("results",), distributed=False,
          validate=validate_config_sources)
def evaluate(config: EvalConfig, ctx: StageContext) -> dict[str, float]:
    """Score models on held-out VQA (exact match) and caption perplexity; write tables."""
    from itertools import islice

    import torch

    from workloads.data.eval_examples import iter_eval_examples
    from workloads.lineage import totals as lineage_totals
    from workloads.merging import load_any_model

    torch.set_num_threads(max(1, int(ctx.resources.cpus_per_worker)))
    models = model_names(ctx.input("models"), config.names)
    source = config.data or _source(ctx.input("data"))
    examples = list(islice(iter_eval_examples(source), config.max_samples))
    if not examples:
        raise ValueError(f"stage {ctx.stage!r}: eval data {source.paths} has no eval examples")
    out_dir = os.path.join(ctx.output_dir, "results")
    os.makedirs(out_dir, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    for name, path in models.items():
        model, processor = load_any_model(path)  # plain LLaVA or a merged wrapper
        model.eval()
        records = []
        for ex in examples:
            pred = generate_answer(model, processor, ex, config.max_new_tokens)
            records.append({"key": ex.key, "question_type": ex.question_type, "answer": ex.answer,
                            "prediction": pred, "correct": exact_match(pred, ex.answer)})
        with open(os.path.join(out_dir, f"predictions_{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        acc = accuracy_by_type(records)
        res = {"accuracy": acc.pop("overall"), **{f"accuracy/{k}": v for k, v in acc.items()},
               "n": len(records), "params": sum(p.numel() for p in model.parameters()),
               **{k: v for k, v in lineage_totals(path).items() if k != "stages"}}
        if ctx.inputs.get("captions"):
            res["caption_ppl"] = _caption_ppl(model, path, ctx.inputs["captions"], config, ctx.seed)
        results[name] = res
        ctx.log(f"{name}: accuracy {res['accuracy']:.3f} on {len(records)} questions")
    md, table_csv = results_table(results)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(ctx.output_dir, SUMMARY_FILE), "w") as f:  # printed by mmkd run/show
        f.write(md)
    with open(os.path.join(out_dir, "results.csv"), "w") as f:
        f.write(table_csv)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"models": models, "results": results}, f, indent=2)
    accuracy_chart(results, os.path.join(out_dir, "results.png"), f"{ctx.pipeline}: {ctx.stage}")
    return {f"{name}/{k}": float(v) for name, m in results.items() for k, v in m.items()}


def _caption_ppl(model: Any, model_dir: str, captions: Any, config: EvalConfig, seed: int) -> float:
    """Perplexity on the first ``caption_samples`` captions, preprocessed in process with the
    model's own processor (a few dozen rows: no Ray Dataset to start per model)."""
    from itertools import islice

    from workloads.data.collate import collate
    from workloads.data.preprocess import Preprocessor, rows_to_columns
    from workloads.data.readers import iter_rows

    pad = model.generation_config.pad_token_id or 0
    pre = Preprocessor(model_dir, config.max_length, quality=None)
    rows = list(islice(iter_rows(_source(captions)), config.caption_samples))

    def batches():
        for i in range(0, len(rows), 16):
            yield collate(pre(rows_to_columns(rows[i:i + 16])), pad)

    return caption_perplexity(model, batches())
