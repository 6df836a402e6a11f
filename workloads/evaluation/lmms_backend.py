"""lmms-eval as a backend of ``evaluate``: local task folders and a model class for mmkd dirs.

lmms-eval (an optional install, ``INSTALL`` below) brings the field's task format,
metrics and aggregation. Two things make it run here, offline:

- **tasks read local files**: ``write_local_task`` turns an eval split mmkd reads (the shapes
  eval shards, a LLaVA JSON, ...) into a task folder — ``data.jsonl`` + ``images/`` + a task
  YAML (``dataset_path: json`` with ``data_files``) + ``utils.py`` — that lmms-eval loads with
  ``datasets`` from disk. Any other task YAML whose ``dataset_path`` is local works the same way
  through ``include_path``; lmms-eval's own task list (hub datasets) is not indexed by default.
- **the model is mmkd's**: ``lmms_model="mmkd"`` loads any dir ``merge``/``train`` write with
  ``load_any_model`` (plain LLaVA, JAM-Cross, ensembles) and asks exactly as the built-in
  ``evaluate`` path does (the model's chat template, ``<image>`` before the question, greedy,
  the model's own stop tokens). Another lmms-eval model name (e.g. ``llava_hf``) is passed
  ``pretrained=<model dir>``.

lmms_eval is imported only inside these functions: mmkd imports and runs without it. It patches
process-wide state when it runs (loguru sinks, ``ssl.SSLContext.__reduce__``, filelock), so call
it in a worker process (the ``evaluate`` stage's), not in a long-lived driver. Local tasks open
no network connection (checked with a patched ``socket.connect``), so no offline switch is set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Iterable

__all__ = ["INSTALL", "LmmsUnavailable", "write_local_task", "run_lmms_eval", "flatten_results",
           "mmkd_lmms_class"]

# lmms-eval's declared dependencies pull a CUDA torch, torchvision (a CUDA build that breaks CPU
# torch), opencv, wandb, ...; what its evaluator, task loader and metrics import is much less.
# `decord` is for lmms-eval's own `llava_hf` model class only.
INSTALL = ("pip install --no-deps lmms-eval==0.7.3 && pip install accelerate datasets evaluate "
           "loguru tenacity sacrebleu pytablewriter decord")

# lmms-eval's stock exact_match, normalised like ``workloads.evaluation.evaluate.normalize_answer``
# (lowercase, no punctuation, no articles, whitespace ignored); regexes run before lowercasing.
_EXACT_MATCH = {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                "ignore_case": True, "ignore_punctuation": True,
                "regexes_to_ignore": [r"(?i)\b(a|an|the)\b", r"\s+"]}

_UTILS_PY = '''"""Written by mmkd (workloads/evaluation/lmms_backend.py); images lie beside data.jsonl."""
import os

from PIL import Image

_HERE = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc):
    if not doc.get("image"):
        return []
    with Image.open(os.path.join(_HERE, doc["image"])) as im:
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"
'''


class LmmsUnavailable(RuntimeError):
    """lmms-eval is not installed; the message says how to install it."""


def _import_lmms() -> Any:
    try:
        import lmms_eval.evaluator as ev
        import lmms_eval.tasks  # noqa: F401
    except ImportError as e:
        raise LmmsUnavailable(f"evaluate: `backend: lmms_eval` needs lmms-eval ({e}); install "
                              f"it without CUDA wheels: `{INSTALL}`") from e
    import importlib.util

    # lmms-eval 0.7.3 patches filelock 3's `filelock._api` so several ranks share dataset locks;
    # filelock 4 (what ray/huggingface_hub install here) has no such module and the patch raises
    # ModuleNotFoundError. One process needs no cross-rank lock sharing: mark it done.
    if importlib.util.find_spec("filelock._api") is None:
        ev._enable_reentrant_filelocks._patched = True
    return ev


# ---- task folders --------------------------------------------------------------------------

def _examples(source: Any) -> Iterable[Any]:
    from workloads.data.eval_examples import iter_eval_examples
    from workloads.data.source import DataSource

    if isinstance(source, (str, os.PathLike)):
        source = DataSource(format="webdataset", paths=[str(source)])
    return iter_eval_examples(source)


def write_local_task(source: Any, out_dir: str, task: str = "mmkd_eval", *,
                     max_samples: int | None = None, max_new_tokens: int = 8,
                     image_token: str = "<image>") -> str:
    """Write an lmms-eval task folder for the eval split ``source`` into ``out_dir``; return
    ``task`` (its name, to pass in ``tasks`` with ``include_path=[out_dir]``).

    ``source``: a ``DataSource`` (any format ``evaluate`` reads) or a WebDataset shards dir.
    Each question must be one human turn (``<image>`` in it is dropped: the model class puts
    the image); the target is the example's short answer, scored by exact match.
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", task):
        raise ValueError(f"lmms task name {task!r}: use letters, digits and underscores")
    # a fresh folder: no images or datasets cache left from an earlier split
    for stale in ("images", "hf_cache"):
        shutil.rmtree(os.path.join(out_dir, stale), ignore_errors=True)
    os.makedirs(os.path.join(out_dir, "images"))
    rows = []
    for i, ex in enumerate(_examples(source)):
        if max_samples is not None and i >= max_samples:
            break
        humans = [t for t in ex.prompt_conversation if t["from"] == "human"]
        if len(humans) != 1 or len(ex.prompt_conversation) != 1:
            raise ValueError(f"lmms task {task!r}: example {ex.key!r} ({ex.source}) asks "
                             f"{len(ex.prompt_conversation)} turns; lmms-eval tasks ask one "
                             f"question, so keep multi-turn data on the built-in backend")
        question = humans[0]["value"].replace(image_token, "").strip()
        image = None
        if ex.image is not None:
            image = f"images/{i:06d}.png"
            ex.image.save(os.path.join(out_dir, image))
        rows.append({"doc_id": i, "key": ex.key, "question": question, "answer": ex.answer,
                     "answers": list(getattr(ex, "answers", None) or [ex.answer]),
                     "question_type": ex.question_type, "image": image})
    if not rows:
        raise ValueError(f"lmms task {task!r}: eval data {source} has no eval examples")
    data = os.path.join(os.path.abspath(out_dir), "data.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(out_dir, "utils.py"), "w") as f:
        f.write(_UTILS_PY)
    # JSON is YAML; only the `!function` tags need writing by hand.
    j = json.dumps
    cache = os.path.join(os.path.abspath(out_dir), "hf_cache")  # datasets' Arrow cache
    # no stop strings: the model's own end-of-turn token ends the answer, as in `evaluate`
    gen = {"max_new_tokens": max_new_tokens, "temperature": 0, "do_sample": False, "until": []}
    yaml_text = "\n".join([
        f"task: {j(task)}",
        "dataset_path: json",
        f"dataset_kwargs: {j({'data_files': {'test': data}, 'cache_dir': cache})}",
        "test_split: test",
        "output_type: generate_until",
        "doc_to_visual: !function utils.doc_to_visual",
        "doc_to_text: !function utils.doc_to_text",
        "doc_to_target: answer",
        f"generation_kwargs: {j(gen)}",
        f"metric_list: {j([_EXACT_MATCH])}",
        f"metadata: {j({'version': 0.0, 'rows': len(rows)})}",
        "",
    ])
    with open(os.path.join(out_dir, f"{task}.yaml"), "w") as f:
        f.write(yaml_text)
    return task


# ---- the model class -----------------------------------------------------------------------

_CLASS: list[type] = []


def mmkd_lmms_class() -> type:
    """lmms-eval model class (``lmms`` subclass) for any model dir mmkd writes."""
    if _CLASS:
        return _CLASS[0]
    _import_lmms()
    import torch
    from lmms_eval.api.model import lmms

    from workloads.merging import load_any_model

    class MmkdLmms(lmms):
        """``generate_until`` with mmkd's prompt: the model's chat template over one user turn,
        ``<image>`` tokens first, greedy unless the task asks to sample. One request at a time;
        errors propagate (a failed generation is not scored as an empty answer)."""

        def __init__(self, pretrained: str, device: str = "cpu", batch_size: int = 1,
                     **kwargs: Any) -> None:
            super().__init__()
            if kwargs:
                raise ValueError(f"lmms model `mmkd`: unknown model_args {sorted(kwargs)}")
            self.model, self.processor = load_any_model(pretrained)
            self.model.eval()
            self._device = torch.device(device)
            if self._device.type != "cpu":
                self.model.to(self._device)
            self.pretrained = pretrained
            self.batch_size_per_gpu = int(batch_size)
            self.chat_template = None

        @property
        def device(self) -> Any:
            return self._device

        @property
        def batch_size(self) -> int:
            return self.batch_size_per_gpu

        def _prompt(self, context: str, n_images: int) -> str:
            if hasattr(self.processor, "prompt"):  # a FamilyProcessor (its own placeholders)
                if n_images > 1:
                    raise ValueError("mmkd's lmms-eval model takes one image per question")
                return self.processor.prompt([{"role": "user", "content": context}],
                                             n_images == 1)
            tok = self.processor.image_token
            if n_images and tok not in context:
                context = f"{' '.join([tok] * n_images)}\n{context}"
            return self.processor.tokenizer.apply_chat_template(
                [{"role": "user", "content": context}], tokenize=False, add_generation_prompt=True)

        def _encode(self, context: str, visuals: list) -> Any:
            enc = self.processor(images=visuals or None, text=self._prompt(context, len(visuals)),
                                 return_tensors="pt")
            return enc.to(self._device) if self._device.type != "cpu" else enc

        def generate_until(self, requests: list) -> list[str]:
            out = []
            for req in requests:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                visuals = list(doc_to_visual(self.task_dict[task][split][doc_id]) or [])
                gen = dict(gen_kwargs or {})
                until = gen.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                kw: dict[str, Any] = {"max_new_tokens": int(gen.get("max_new_tokens") or 32),
                                      "do_sample": False}
                if float(gen.get("temperature") or 0) > 0 or gen.get("do_sample"):
                    kw.update(do_sample=True, temperature=float(gen.get("temperature") or 1.0),
                              top_p=gen.get("top_p") or 1.0)
                enc = self._encode(context, visuals)
                with torch.no_grad():
                    ids = self.model.generate(**enc, **kw)
                text = self.processor.tokenizer.decode(ids[0, enc["input_ids"].shape[1]:],
                                                       skip_special_tokens=True)
                for stop in until:  # lmms-eval's stop strings, as its HF models apply them
                    if stop:
                        text = text.split(stop)[0]
                out.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            return out

        def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
            raise NotImplementedError("lmms model `mmkd` generates answers (output_type "
                                      "generate_until); score multiple choice by generating the "
                                      "option letter, or use another lmms-eval model")

        def generate_until_multi_round(self, requests: list) -> list[str]:
            raise NotImplementedError("lmms model `mmkd` asks one question per document; "
                                      "multi-round tasks need another lmms-eval model")

    _CLASS.append(MmkdLmms)
    return MmkdLmms


# ---- running -------------------------------------------------------------------------------

def flatten_results(results: dict[str, Any]) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` from ``simple_evaluate``'s ``results["results"]``
    (filter ``none`` dropped from the key, else ``<metric>_<filter>``), plus ``<task>/n``."""
    out: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or isinstance(value, str) or value is None:
                continue  # "alias", "N/A" stderr
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}_{filt}"
            out[f"{task}/{name}"] = float(value)
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        if n is not None:
            out[f"{task}/n"] = float(n)
    return out


def run_lmms_eval(model_dir: str, tasks: list[str], include_path: list[str] | None = None, *,
                  lmms_model: str = "mmkd", model_args: dict[str, Any] | None = None,
                  limit: int | None = None, device: str = "cpu", seed: int = 0,
                  include_defaults: bool = False, samples_path: str | None = None,
                  bootstrap_iters: int = 1000, force_simple: bool = True) -> dict[str, float]:
    """Run lmms-eval's ``simple_evaluate`` on one model dir; return ``{task/metric: value}``.

    ``tasks``: task names found under ``include_path`` (folders of task YAMLs, e.g. from
    ``write_local_task``); ``include_defaults`` also indexes lmms-eval's own tasks (they read the
    hub). ``lmms_model``: ``"mmkd"`` (``mmkd_lmms_class``) or an lmms-eval model name, built with
    ``pretrained=model_dir`` + ``model_args``. ``samples_path``: write each answer there as JSONL
    (task, doc_id, target, prediction, per-document metrics) for paired tests.
    ``bootstrap_iters``: lmms-eval's stderr setting (``<metric>_stderr``; a mean's is closed
    form, 0 turns stderrs off). ``force_simple``: for a named lmms-eval model, its "simple" class
    (string prompts through the tokenizer's chat template, as mmkd's templates expect) rather
    than its "chat" class (structured content). lmms-eval's ``llava_hf`` also needs ``decord``
    and ``model_args={"device_map": "cpu", "dtype": "float32"}`` on CPU.
    """
    _import_lmms()
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    tm = TaskManager("WARNING", include_path=[os.path.abspath(p) for p in include_path or []],
                     include_defaults=include_defaults)
    missing = [t for t in tasks if t not in tm.all_tasks]
    if missing:
        raise ValueError(f"evaluate: lmms-eval tasks {missing} not found under include_path "
                         f"{include_path}; found {tm.all_tasks[:20]}")
    args = {"pretrained": model_dir, **(model_args or {})}
    if lmms_model == "mmkd":
        model: Any = mmkd_lmms_class()(device=device, **args)
        arg_string = None
    else:  # lmms-eval parses "k=v,k=v"
        model, arg_string = lmms_model, ",".join(f"{k}={v}" for k, v in args.items())
    res = simple_evaluate(model=model, model_args=arg_string,
                          tasks=list(tasks), task_manager=tm, limit=limit, device=device,
                          batch_size=1, log_samples=samples_path is not None, verbosity="WARNING",
                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                          fewshot_random_seed=seed, bootstrap_iters=bootstrap_iters,
                          process_docs_parallel=1, force_simple=force_simple)
    if res is None:  # non-zero ranks get None; we run one process
        raise RuntimeError("lmms-eval returned no results (not rank 0?)")
    if samples_path is not None:
        _write_samples(res.get("samples", {}), res.get("higher_is_better", {}), samples_path)
    return flatten_results(res)


def _write_samples(samples: dict[str, list[dict]], metrics: dict[str, dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for task, rows in samples.items():
            for s in rows:
                resp = s.get("filtered_resps") or s.get("resps") or [""]
                while isinstance(resp, list) and resp:
                    resp = resp[0]
                doc = s.get("doc") or {}
                rec = {"task": task, "doc_id": s.get("doc_id"), "key": doc.get("key"),
                       "target": s.get("target"), "prediction": resp,
                       **{k: s[k] for k in metrics.get(task, {}) if k in s}}
                f.write(json.dumps(rec, default=str) + "\n")
