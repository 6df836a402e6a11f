"""Batched greedy generation gives exactly the answers of asking one question at a time
(``evaluate.generate_answer``): tiny fp32 LLaVAs (left padding + KV cache) and merged wrappers
loaded with ``load_any_model`` (batched among prompts of equal length), on a mix of image and
text-only questions of different lengths, with rows stopping at different steps."""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter

import pytest
import torch

from workloads.data.eval_examples import EvalExample, iter_eval_examples
from workloads.data.source import DataSource
from workloads.evaluation.evaluate import generate_answer
from workloads.evaluation.generation import batching, generate_answers, prompt_text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mmkd_test_plugins.data_tiny import build_tiny_data

    root = tmp_path_factory.mktemp("gen")
    data = build_tiny_data(root / "data", num_samples=48)
    shapes = list(iter_eval_examples(DataSource(format="webdataset", paths=data["eval"])))
    return {"root": root, "data": data, "shapes": shapes}


def _questions(shapes: list[EvalExample], n: int) -> list[EvalExample]:
    """``n`` questions: the shapes eval split's (image, the `<image>` already in the text), the
    same without the token (added by the prompt), and text-only ones of 1-12 extra words."""
    out = []
    for i in range(n):
        ex = shapes[i % len(shapes)]
        q = ex.prompt_conversation[0]["value"].replace("<image>\n", "")
        if i % 3 == 0:
            out.append(dataclasses.replace(ex, key=f"{i}"))
        elif i % 3 == 1:
            out.append(dataclasses.replace(ex, key=f"{i}", prompt_conversation=[
                {"from": "human", "value": q}]))
        else:
            words = " ".join(["small red circle"] * (1 + i % 4))
            out.append(dataclasses.replace(ex, key=f"{i}", image=None, prompt_conversation=[
                {"from": "human", "value": f"{q} {words}?"}]))
    return out


def _stop_often(model, processor, questions):
    """Add the token most questions start their answer with as an end-of-sequence token, so
    rows of one batch stop at different steps (random tiny models rarely emit the real one)."""
    first = Counter()
    for ex in questions[:8]:
        enc = processor(images=[ex.image] if ex.image is not None else None,
                        text=prompt_text(processor, ex), return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=2, do_sample=False)
        first.update(out[0, enc["input_ids"].shape[1]:].tolist())
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    model.generation_config.eos_token_id = eos + [first.most_common(1)[0][0]]


@pytest.mark.parametrize("preset", ["tiny-student", "tiny-teacher"])
def test_batched_answers_are_the_one_by_one_answers(tiny, preset):
    from workloads.models import build_model

    torch.manual_seed(0)
    model, processor = build_model({"preset": preset}, tiny["data"]["tokenizer"])
    model.eval()
    questions = _questions(tiny["shapes"], 30)
    assert batching(model, processor) == "left_padding"
    lengths = {len(processor.tokenizer(prompt_text(processor, q))["input_ids"])
               for q in questions}
    assert len(lengths) >= 5  # real padding in every batch
    for stops in (False, True):
        if stops:
            _stop_often(model, processor, questions)
        expected = [generate_answer(model, processor, q, 8) for q in questions]
        if stops:
            assert len({len(a) for a in expected}) > 1  # rows ended at different steps
        for batch_size in ((1, 5, 16) if not stops else (7, 16)):
            assert generate_answers(model, processor, questions, 8, batch_size) == expected


def test_merged_wrappers_batch_equal_lengths_only(tiny):
    from workloads.merging import load_any_model
    from workloads.merging.cross import CrossMergedModel
    from workloads.merging.ensemble import ensemble_merge
    from workloads.models import build_model

    torch.manual_seed(1)
    base, processor = build_model({"preset": "tiny-student"}, tiny["data"]["tokenizer"])
    parents = []
    for _ in range(2):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        parents.append(m.eval())
    cross_dir = tiny["root"] / "cross"
    CrossMergedModel(*copy.deepcopy(parents), cross_every=1).save(str(cross_dir))
    processor.save_pretrained(str(cross_dir))
    cross, cross_processor = load_any_model(str(cross_dir))
    ensemble = ensemble_merge(parents, params={"router": "soft"},
                              centroids=torch.randn(2, 64).numpy()).eval()
    # same text on several images (equal lengths) plus questions of other lengths
    shapes = tiny["shapes"]
    same = [dataclasses.replace(shapes[i], key=f"same{i}",
                                prompt_conversation=shapes[0].prompt_conversation)
            for i in range(4)]
    questions = same + _questions(shapes, 6)
    for model, proc in ((cross, cross_processor), (ensemble, processor)):
        assert batching(model, proc) == "same_length"
        expected = [generate_answer(model, proc, q, 4) for q in questions]
        calls = []
        original = model.generate
        model.generate = lambda **kw: calls.append(kw["input_ids"].shape[0]) or original(**kw)
        try:
            assert generate_answers(model, proc, questions, 4, batch_size=16) == expected
        finally:
            del model.generate
        assert max(calls) >= 4 and sum(calls) == len(questions)


def test_edge_cases(tiny):
    from workloads.models import build_model

    model, processor = build_model({"preset": "tiny-student"}, tiny["data"]["tokenizer"])
    assert generate_answers(model.eval(), processor, [], 8) == []
    with pytest.raises(ValueError, match="batch_size"):
        generate_answers(model, processor, tiny["shapes"][:1], 8, batch_size=0)
