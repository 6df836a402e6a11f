"""``evaluate``: greedy answers to held-out questions (batched, with the KV cache), scored with
the benchmark's own metric (``workloads.evaluation.metrics``: exact match, VQA soft accuracy, GQA,
POPE, multiple choice, MME), each model's score with its 95% interval, a paired test for every
pair of models (``workloads.evaluation.stats``), one row per arm with mean ± std across seeds when
the models come from a seed matrix, caption perplexity, a predictions JSONL per model and a
results table (markdown + CSV + JSON + chart) with each model's parameter count (an ensemble
counts all its experts) and, from its lineage (``workloads.lineage``), the samples and wall
seconds of every stage that made it.

Inputs:
  models    list of model dirs, or a dict name -> model dir
  data      held-out split (shards dir), e.g. ``shapes.eval``; or ``params.data`` (a LLaVA
            question file, conversation JSON or Parquet: ``workloads/data/eval_examples.py``)
  captions  optional caption split for perplexity, e.g. ``shapes.captions``

Model names: a dict input keeps its keys; a list takes ``config.names`` when given, else the
upstream stage names (``sft_seed-0``, ... for a matrix reference).
Seed arms: models named ``<arm>_seed-<n>`` (a ``matrix: {seed: [...]}`` stage) are also
summarised per arm.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Iterable, Literal

from pydantic import Field

from orchestrator.plugin import HEADLINE_FILE, SUMMARY_FILE, StageContext, WorkloadConfig, workload
from workloads.evaluation.checks import answer_floors, below_floor, blind_examples, floor_lines
from workloads.data.preflight import validate_config_sources
from workloads.data.source import DataSource
from workloads.evaluation.metrics import METRICS, exact_match, normalize_answer
from workloads.evaluation.charts import accuracy_chart
from workloads.evaluation.tables import (accuracy_by_type, compare_models, results_table,
                                         score_interval, seed_arms, summary_markdown)

__all__ = ["EvalConfig", "evaluate", "normalize_answer", "exact_match", "model_names",
           "generate_answer", "caption_perplexity"]

EVERY_QUESTION = 2**62  # SampleQuality's min_samples: no in-stream verdict


def model_names(models: Any, names: list[str] | None = None,
                stages: list[str] | None = None) -> dict[str, str]:
    """Name → model dir for the ``models`` input (see module docstring)."""
    if isinstance(models, dict):
        return {str(k): str(v) for k, v in models.items()}
    models = [models] if isinstance(models, str) else list(models)
    if names is not None:
        if len(names) != len(models):
            raise ValueError(f"evaluate: `names` has {len(names)} entries for {len(models)} models")
        return dict(zip(names, models))
    if stages and len(stages) == len(models) and len(set(stages)) == len(stages):
        return dict(zip(stages, models))
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
    models: dict[str, str] = Field(
        default_factory=dict, description="models given by path, name -> local model dir (a "
                                          "checkpoint trained elsewhere), besides input `models`")
    metric: Literal[tuple(METRICS)] = Field(  # type: ignore[valid-type]
        "exact_match", description="how answers are scored: " + ", ".join(METRICS))
    max_new_tokens: int = Field(8, ge=1, description="greedy tokens generated per question")
    batch_size: int = Field(16, ge=1, description="questions per generate call (left padding)")
    max_samples: int | None = Field(None, ge=1, description="evaluate at most this many questions")
    caption_samples: int = Field(64, ge=1, description="captions scored for perplexity")
    max_length: int = Field(256, ge=8)
    confidence: float = Field(0.95, gt=0.5, lt=1, description="level of every interval")
    bootstrap_samples: int = Field(2000, ge=100, description="resamples of bootstrap intervals")
    image_reliance_samples: int = Field(
        200, ge=0, description="questions asked again with every image replaced by a grey one "
                               "(the accuracy drop says how much a model uses the image); 0: off")
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="error budget, as in training: the stage fails if more "
                                      "than this fraction of eval samples is unusable")
    backend: Literal["builtin", "lmms_eval"] = Field(
        "builtin", description="builtin: mmkd's batched generation and metrics; lmms_eval: "
                               "lmms-eval (pip install mmkd[lmms]) on local task folders")
    tasks: list[str] = Field(
        default_factory=list, description="lmms_eval: task names under `include_path`; empty: "
                                          "the eval data itself as a local task")
    include_path: list[str] = Field(default_factory=list,
                                    description="lmms_eval: folders of local task YAMLs")
    lmms_model: str = Field("mmkd", description="lmms_eval: `mmkd` (any mmkd model dir) or an "
                                                "lmms-eval model name such as llava_hf")
    data: DataSource | None = Field(
        None, description="held-out questions with answers (a LLaVA question file, conversation "
                          "JSON or Parquet); omit to use input `data` (WebDataset shards such as "
                          "shapes.eval)")


def conversation_messages(conv: list[dict[str, str]]) -> list[dict[str, str]]:
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    return [{"role": role[t["from"]], "content": t["value"]} for t in conv]


def generate_answer(model: Any, processor: Any, example: Any, max_new_tokens: int) -> str:
    """Greedy answer to one ``EvalExample``, one question per ``generate`` call: the reference
    the batched ``workloads.evaluation.generation.generate_answers`` is tested against."""
    import torch

    from workloads.evaluation.generation import prompt_text

    text = prompt_text(processor, example)
    images = [example.image] if example.image is not None else None
    enc = processor(images=images, text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def caption_perplexity(model: Any, batches: Iterable[dict[str, Any]]) -> float:
    """exp(mean next-token NLL over label tokens) on collated batches."""
    import torch

    from workloads.train_loop_parts import model_inputs

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


# ----------------------------------------------------------------------------- statistics


def _reference(ex: Any) -> dict[str, Any]:
    """What a metric scores a prediction against (``EvalExample`` fields)."""
    meta = dict(getattr(ex, "meta", None) or {})
    answers = list(getattr(ex, "answers", None) or [ex.answer])
    ref = {**meta, "key": ex.key, "question_id": getattr(ex, "question_id", ex.key),
           "question_type": ex.question_type, "answer": ex.answer, "answers": answers}
    if getattr(ex, "options", None):
        ref["options"] = dict(ex.options)
    return ref


# ----------------------------------------------------------------------------- the workload


def _source(path: Any) -> Any:
    path = path[0] if isinstance(path, list) else path
    return DataSource(format="webdataset", paths=[path])


def eval_problems(config: EvalConfig, inputs: dict | None = None) -> list[str]:
    """``mmkd validate`` hook: unreadable data, and `models` given by a path that holds no
    model (a local path, not a hub id: a stage is evaluated on files it can open)."""
    from workloads.merging.io import MERGED_META  # here: the merging package imports torch

    problems = validate_config_sources(config, inputs)
    for name, path in config.models.items():
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", MERGED_META)):
            problems.append(f"models.{name}: {path} holds no model (no config.json there); "
                            f"give the folder a `save_pretrained` or an mmkd stage wrote")
    return problems


@workload("evaluate", config=EvalConfig, version="3", outputs=("results",), distributed=False,
          validate=eval_problems)
def evaluate(config: EvalConfig, ctx: StageContext) -> dict[str, float]:
    """Score models on held-out questions with the benchmark's metric, intervals and paired
    tests, and caption perplexity; write tables."""
    from itertools import islice

    import torch

    from workloads.data.eval_examples import iter_eval_examples
    from workloads.data.quality import SampleQuality
    from workloads.evaluation.generation import generate_answers
    from workloads.lineage import totals as lineage_totals
    from workloads.merging import load_any_model

    torch.set_num_threads(max(1, int(ctx.resources.cpus_per_worker)))
    models = (model_names(ctx.input("models"), config.names, ctx.input_stages.get("models"))
              if ctx.inputs.get("models") or not config.models else {})
    models.update(config.models)
    source = config.data or _source(ctx.input("data"))
    if config.backend == "lmms_eval":
        return _evaluate_lmms(config, ctx, models, source)
    # the budget is judged once, over every question read (below), not on a prefix: one bad
    # question among the first few of a clean set must not fail the stage
    quality = SampleQuality.create(max_bad_fraction=config.max_bad_fraction,
                                   min_samples=EVERY_QUESTION, use_ray=False,
                                   name=f"stage {ctx.stage!r} eval data")
    examples = list(islice(iter_eval_examples(source, quality), config.max_samples))
    quality.report(ctx)
    quality.check()
    if not examples:
        raise ValueError(f"stage {ctx.stage!r}: eval data {source.paths} has no eval examples")
    metric = METRICS[config.metric]
    head = metric.headline
    refs = [_reference(ex) for ex in examples]
    out_dir = os.path.join(ctx.output_dir, "results")
    os.makedirs(out_dir, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    scores: dict[str, list[float]] = {}
    checks: dict[str, Any] = {"floors": answer_floors(refs), "below_floor": {}, "reliance": {}}
    for name, path in models.items():
        model, processor = load_any_model(path)  # plain LLaVA or a merged wrapper
        model.eval()
        preds = generate_answers(model, processor, examples, config.max_new_tokens,
                                 config.batch_size)
        records = [{**ref, "prediction": pred} for ref, pred in zip(refs, preds)]
        for r in records:
            r["score"] = metric.item_score(str(r["prediction"]), r)
            r["correct"] = r["score"] >= 1.0
        with open(os.path.join(out_dir, f"predictions_{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r, default=str) + "\n" for r in records)
        scores[name] = metric.scores(records)
        agg = metric.aggregate(records)
        low, high = score_interval(metric, records, scores[name], config.confidence,
                                   config.bootstrap_samples, ctx.seed)
        by_type = accuracy_by_type(records, "score")
        by_type.pop("overall")
        flags = checks["below_floor"][name] = below_floor(by_type, checks["floors"])
        reliance = _image_reliance(model, processor, examples, scores[name], metric, refs,
                                   config)
        if reliance:
            checks["reliance"][name] = reliance
        res = {head: agg[head], f"{head}_low": low, f"{head}_high": high,
               **{k: v for k, v in agg.items() if k not in (head, "n")},
               **({f"{head}/{k}": v for k, v in by_type.items()} if len(by_type) > 1 else {}),
               "below_floor_types": len(flags),
               **({"blind_accuracy": reliance["blind_accuracy"], "image_drop": reliance["drop"]}
                  if reliance else {}),
               "n": len(scores[name]), "params": sum(p.numel() for p in model.parameters()),
               **{k: v for k, v in lineage_totals(path).items() if k != "stages"}}
        if ctx.inputs.get("captions"):
            res["caption_ppl"] = _caption_ppl(model, path, ctx.inputs["captions"], config, ctx.seed)
        results[name] = res
        ctx.log(f"{name}: {head} {res[head]:.3f} [{low:.3f}, {high:.3f}] on "
                f"{len(scores[name])} questions")
    return _write_results(ctx, config, models, metric.name, head, results, scores, checks)


def _image_reliance(model: Any, processor: Any, examples: list, scores: list[float], metric: Any,
                    refs: list[dict[str, Any]], config: EvalConfig) -> dict[str, float] | None:
    """Accuracy on the first ``image_reliance_samples`` questions with their images replaced
    by a grey one, against the same questions with their images."""
    from workloads.evaluation.generation import generate_answers

    k = min(config.image_reliance_samples, len(examples))
    if k == 0 or not any(getattr(ex, "image", None) is not None for ex in examples[:k]):
        return None
    blind = generate_answers(model, processor, blind_examples(examples[:k]),
                             config.max_new_tokens, config.batch_size)
    blind_scores = [metric.item_score(str(p), r) for p, r in zip(blind, refs[:k])]
    seen = sum(scores[:k]) / k
    unseen = sum(blind_scores) / k
    return {"accuracy": seen, "blind_accuracy": unseen, "drop": seen - unseen, "n": float(k)}


def _write_results(ctx: StageContext, config: EvalConfig, models: dict[str, str], metric_name: str,
                   head: str, results: dict[str, dict[str, Any]],
                   scores: dict[str, list[float]], checks: dict[str, Any] | None = None
                   ) -> dict[str, float]:
    """Comparisons, seed arms, the tables (md/csv/json/png), the summary and the headline."""
    from orchestrator.provenance import environment

    comparisons = compare_models(scores, config.confidence, config.bootstrap_samples, ctx.seed)
    arms = seed_arms(results, head, config.confidence)
    md, table_csv = results_table(results, head)
    out_dir = os.path.join(ctx.output_dir, "results")
    summary = summary_markdown(md, metric_name, head, comparisons, arms, config.confidence)
    if checks:
        summary += "\n".join(floor_lines(checks["below_floor"], checks["floors"],
                                         checks["reliance"])) + "\n"
        for name, flags in checks["below_floor"].items():
            if flags:
                ctx.log(f"{name}: below the most-frequent-answer floor on "
                        + ", ".join(f"{t} ({v['accuracy']:.3f} < {v['floor']:.3f})"
                                    for t, v in flags.items()))
    for c in comparisons:
        ctx.log(c["text"])
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(summary)
    with open(os.path.join(ctx.output_dir, SUMMARY_FILE), "w") as f:  # printed by mmkd run/show
        f.write(summary)
    with open(os.path.join(out_dir, "results.csv"), "w") as f:
        f.write(table_csv)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"models": models, "metric": metric_name, "headline": head,
                   "confidence": config.confidence, "results": results,
                   "comparisons": comparisons, "arms": arms, "checks": checks or {},
                   "environment": environment()},
                  f, indent=2)
    accuracy_chart(results, os.path.join(out_dir, "results.png"), f"{ctx.pipeline}: {ctx.stage}",
                   metric=head)
    with open(os.path.join(ctx.output_dir, HEADLINE_FILE), "w") as f:
        flagged = (checks or {}).get("below_floor", {})
        headline = {f"{name}/{k}": r[k] for name, r in results.items()
                    for k in (head, "image_drop", "below_floor_types") if k in r}
        json.dump({"metrics": headline,
                   # MLflow tags on the pipeline's run: which models are below a floor, where
                   "tags": {f"mmkd.below_floor.{name}": ",".join(f) or "none"
                            for name, f in flagged.items()},
                   "artifacts": ["results/results.md", "results/results.csv",
                                 "results/results.png"]}, f)
    metrics = {f"{name}/{k}": float(v) for name, m in results.items() for k, v in m.items()}
    for c in comparisons:
        metrics[f"compare/{c['b']}-{c['a']}/diff"] = c["diff"]
        metrics[f"compare/{c['b']}-{c['a']}/p"] = c["p"]
    return metrics


def _evaluate_lmms(config: EvalConfig, ctx: StageContext, models: dict[str, str],
                   source: DataSource) -> dict[str, float]:
    """lmms-eval on every model: its scores (``<task>/<metric>``) in the same table, intervals
    and paired tests on its per-question scores, the same MLflow headline."""
    from workloads.evaluation.stats import wilson_interval
    from workloads.lineage import totals as lineage_totals
    from workloads.evaluation.lmms_backend import run_lmms_eval, write_local_task

    tasks, include = list(config.tasks), list(config.include_path)
    if not tasks:  # the eval data itself as a local task
        root = os.path.join(ctx.output_dir, "lmms_tasks")
        write_local_task(source, os.path.join(root, "mmkd_eval"), "mmkd_eval",
                         max_samples=config.max_samples, max_new_tokens=config.max_new_tokens)
        tasks, include = ["mmkd_eval"], include + [root]
    out_dir = os.path.join(ctx.output_dir, "results")
    os.makedirs(out_dir, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    scores: dict[str, list[float]] = {}
    head = f"{tasks[0]}/exact_match"
    for name, path in models.items():
        samples = os.path.join(out_dir, f"predictions_{name}.jsonl")
        res: dict[str, Any] = dict(run_lmms_eval(path, tasks, include, lmms_model=config.lmms_model,
                                                 limit=config.max_samples, seed=ctx.seed,
                                                 samples_path=samples))
        rows = [json.loads(line) for line in open(samples)]
        first = [r for r in rows if r["task"] == tasks[0] and "exact_match" in r]
        if first:  # per-question 0/1 scores of the first task: interval and paired tests
            scores[name] = [float(r["exact_match"]) for r in sorted(first, key=lambda r: r["doc_id"])]
            res[f"{head}_low"], res[f"{head}_high"] = wilson_interval(
                int(round(sum(scores[name]))), len(scores[name]), config.confidence)
        res.update({"params": _count_params(path),
                    **{k: v for k, v in lineage_totals(path).items() if k != "stages"}})
        results[name] = res
        ctx.log(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()
                                         if k.startswith(tuple(tasks)) and "stderr" not in k))
    if not all(head in r for r in results.values()):
        head = next(iter(next(iter(results.values()))))
    return _write_results(ctx, config, models, "lmms_eval", head, results, scores)


def _count_params(path: str) -> int:
    from workloads.merging import load_any_model

    model, _ = load_any_model(path)
    return sum(p.numel() for p in model.parameters())


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
