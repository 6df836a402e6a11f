"""The ``pretrain`` → ``sft`` → ``evaluate`` workloads called directly, as the runner calls them,
on the data layer's tiny shapes set: 2 Ray Train workers, DeepSpeed ZeRO-2 on CPU."""

from __future__ import annotations

import json
import os

import pytest
import torch

from orchestrator.plugin import Resources, StageContext
from workloads.evaluation.evaluate import EvalConfig, evaluate
from workloads.evaluation.tables import accuracy_by_type
from workloads.pretrain_sft import PretrainConfig, SFTConfig, pretrain, sft


def _ctx(root, stage, inputs, workers=2):
    return StageContext(pipeline="test", stage=stage, key=f"{stage}-key",
                        output_dir=str(root / stage), inputs=inputs,
                        resources=Resources(num_workers=workers, cpus_per_worker=1),
                        deepspeed={"zero_stage": 2, "precision": "fp32", "offload_optimizer": False,
                                   "offload_params": False},
                        checkpoint_storage=str(root / "ckpt"), run_name=f"{stage}-run", seed=1)


def _state(path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path).state_dict()


@pytest.fixture(scope="module")
def chain(ray_session, tmp_path_factory):
    from mmkd_test_plugins.data_tiny import build_tiny_data

    root = tmp_path_factory.mktemp("chain")
    data = build_tiny_data(root / "data", num_samples=64, vocab_size=320)
    pt = _ctx(root, "teacher_pt", {"tokenizer": data["tokenizer"], "data": data["captions"]})
    pt_metrics = pretrain(PretrainConfig(model={"preset": "tiny-teacher"}, max_steps=6, batch_size=8,
                                         lr=3e-3, checkpoint_every=3), pt)
    sft_ctx = _ctx(root, "teacher_sft", {"init": os.path.join(pt.output_dir, "model"),
                                         "data": data["instruct"]})
    sft_metrics = sft(SFTConfig(max_steps=12, batch_size=8, lr=3e-3, checkpoint_every=0), sft_ctx)
    return {"root": root, "data": data, "pt": pt, "sft": sft_ctx, "pt_metrics": pt_metrics,
            "sft_metrics": sft_metrics}


def test_pretrain_and_sft_learn_and_freeze(chain):
    pt, sft_ctx = chain["pt"], chain["sft"]
    assert chain["pt_metrics"]["steps"] == 6 and chain["sft_metrics"]["steps"] == 12
    pt_loss = [e["metrics"]["loss"] for e in pt.local_metrics]
    sft_loss = [e["metrics"]["loss"] for e in sft_ctx.local_metrics]
    assert pt_loss[-1] < pt_loss[0] and sft_loss[-1] < 0.8 * sft_loss[0], (pt_loss, sft_loss)
    assert {"loss", "lr", "tokens_per_s", "samples_per_s"} <= set(pt.local_metrics[0]["metrics"])

    from workloads.models import build_model

    torch.manual_seed(1)  # the loop seeds with the stage seed before building the preset
    init = build_model({"preset": "tiny-teacher"}, chain["data"]["tokenizer"])[0].state_dict()
    before, after = _state(os.path.join(pt.output_dir, "model")), _state(
        os.path.join(sft_ctx.output_dir, "model"))
    # Pretrain trains the projector only: vision tower and LLM are bit-identical to the init.
    for k in init:
        assert torch.equal(init[k], before[k]) != ("multi_modal_projector" in k), k
    # SFT trains projector + LLM; the vision tower is frozen and must be bit-identical.
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same if "vision_tower" in k else True, k
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])


def test_trained_model_loads_with_plain_transformers(chain):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from workloads.data.eval_examples import iter_eval_examples
    from workloads.data.source import DataSource
    from workloads.evaluation.evaluate import generate_answer

    path = os.path.join(chain["sft"].output_dir, "model")
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    proc = AutoProcessor.from_pretrained(path)
    assert model.config.image_token_id == proc.tokenizer.convert_tokens_to_ids("<image>")
    ex = next(iter_eval_examples(DataSource(format="webdataset", paths=[chain["data"]["eval"]])))
    # greedy answers of the plain-transformers load equal mmkd's own load of the same folder
    from workloads.models import load_model

    ours, our_proc = load_model(path)
    plain_answer = generate_answer(model, proc, ex, max_new_tokens=4)
    assert plain_answer == generate_answer(ours.eval(), our_proc, ex, max_new_tokens=4)
    torch.testing.assert_close(model.lm_head.weight, ours.lm_head.weight, rtol=0, atol=0)


def test_evaluate_writes_tables_and_consistent_scores(chain):
    root = chain["root"]
    models = {"teacher_pt": os.path.join(chain["pt"].output_dir, "model"),
              "teacher_sft": os.path.join(chain["sft"].output_dir, "model")}
    ctx = _ctx(root, "eval", {"models": list(models.values()), "data": chain["data"]["eval"],
                              "captions": chain["data"]["captions"]}, workers=1)
    metrics = evaluate(EvalConfig(max_samples=12, caption_samples=16), ctx)
    out = os.path.join(ctx.output_dir, "results")
    # List input: names come from the stage dirs holding `model/`.
    for name in models:
        records = [json.loads(line) for line in open(os.path.join(out, f"predictions_{name}.jsonl"))]
        assert len(records) == 12
        assert metrics[f"{name}/accuracy"] == pytest.approx(accuracy_by_type(records)["overall"])
        assert metrics[f"{name}/caption_ppl"] > 1.0
    # Cost columns from the models' lineage: 2 workers x batch 8 per step, pretrain counted in
    # the SFT model's total.
    assert metrics["teacher_pt/train_samples"] == 6 * 16
    assert metrics["teacher_sft/train_samples"] == 6 * 16 + 12 * 16
    assert metrics["teacher_sft/train_s"] > metrics["teacher_pt/train_s"] > 0
    assert metrics["teacher_sft/params"] == metrics["teacher_pt/params"] > 1e6
    # SFT saw captions only through pretraining; its caption perplexity stays finite.
    md = open(os.path.join(out, "results.md")).read()
    assert "| teacher_pt |" in md and "| teacher_sft |" in md
    assert open(os.path.join(out, "results.csv")).readline().startswith("model,accuracy")
    # results that flag themselves: floors counted here from the references, each model's
    # flags against them, and the same questions asked blind (grey images)
    from collections import Counter

    checks = json.load(open(os.path.join(out, "results.json")))["checks"]
    records = [json.loads(line) for line in open(os.path.join(out, "predictions_teacher_pt.jsonl"))]
    by_type: dict = {}
    for r in records:
        by_type.setdefault(r["question_type"], []).append(r["answer"].strip().lower())
    for t, answers in by_type.items():
        top = Counter(answers).most_common(1)[0][1]
        assert checks["floors"][t]["floor"] == pytest.approx(top / len(answers)), t
        acc = sum(r["correct"] for r in records if r["question_type"] == t) / len(answers)
        assert (t in checks["below_floor"]["teacher_pt"]) == (acc < top / len(answers)), t
    for name in models:
        blind = checks["reliance"][name]
        assert blind["n"] == 12 and 0 <= blind["blind_accuracy"] <= 1
        assert metrics[f"{name}/image_drop"] == pytest.approx(
            metrics[f"{name}/accuracy"] - blind["blind_accuracy"])
    assert "Most-frequent-answer floor per question type" in md and "Image reliance" in md
