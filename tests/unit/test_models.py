"""Model specs, part freezing, compatibility checks and the loop's pure helpers (no Ray)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from workloads.models import (ModelCompatError, ModelSpec, build_model, build_processor,
                              check_compat, describe_model, save_model, set_trainable)
from mmkd_test_plugins.train_fixtures import build_tiny_tokenizer
from workloads.train_loop_parts import (ResourceError, TrainParams, build_optimizer, check_resources,
                                   deepspeed_config, warmup_cosine)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_spec_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one"):
        ModelSpec()
    with pytest.raises(ValueError, match="exactly one"):
        ModelSpec(preset="tiny-student", path="/x")
    assert ModelSpec(parts={"vision": "google/siglip-base-patch16-224", "llm": "Qwen/Qwen2-0.5B"})


def test_describe_is_offline_and_sizes_presets():
    parts = describe_model({"parts": {"vision": "google/siglip-so400m", "llm": "Qwen/Qwen2-0.5B"}})
    assert parts["vision"] == {"ref": "google/siglip-so400m", "local": False}
    t = describe_model({"preset": "tiny-teacher"}, vocab_size=100)
    s = describe_model({"preset": "tiny-student"}, vocab_size=100)
    assert t["image_tokens"] == s["image_tokens"] == 16
    assert t["params"]["total"] > 5 * s["params"]["total"]
    assert describe_model({"path": "/nonexistent"})["exists"] is False


def test_build_save_load_roundtrip(tok_dir, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model, proc = build_model({"preset": "tiny-student"}, tok_dir)
    assert model.config.image_token_id == proc.tokenizer.convert_tokens_to_ids("<image>")
    assert model.config.text_config.vocab_size == len(proc.tokenizer)
    out = save_model(model, proc, str(tmp_path / "m" / "model"))
    loaded = LlavaForConditionalGeneration.from_pretrained(out)
    p2 = AutoProcessor.from_pretrained(out)
    assert p2.patch_size == 8 and p2.vision_feature_select_strategy == "full"
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".tmp")]


def test_set_trainable_freezes_parts_and_optimizer_skips_them(tok_dir):
    model, _ = build_model({"preset": "tiny-student"}, tok_dir)
    counts = set_trainable(model, ["projector"])
    assert counts["vision"] == counts["llm"] == 0 and counts["projector"] > 0
    assert all(not p.requires_grad for p in model.model.vision_tower.parameters())
    assert all(not p.requires_grad for p in model.lm_head.parameters())
    opt, _ = build_optimizer(model, TrainParams(max_steps=10), total_steps=10)
    in_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert in_opt == counts["projector"]
    with pytest.raises(ValueError, match="subset"):
        set_trainable(model, ["decoder"])


def test_compat_errors_say_what_to_change(tok_dir):
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer

    model, proc = build_model({"preset": "tiny-student"}, tok_dir)
    with pytest.raises(ModelCompatError, match="vision tower expects 32"):
        check_compat(model, build_processor(proc.tokenizer, image_size=64, patch_size=8))
    model.config.text_config.vocab_size = 10
    with pytest.raises(ModelCompatError, match="vocab_size"):
        check_compat(model, proc)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    vocab = {k: v for k, v in tok.get_vocab().items() if k != "<image>"}
    bare = tok.__class__(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>")))
    with pytest.raises(ModelCompatError, match="no '<image>' token"):
        build_processor(bare, 32, 8)


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(5, 10, 0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_deepspeed_config_from_stage_settings():
    p = TrainParams(batch_size=4, grad_accum=2, max_grad_norm=0.5)
    c = deepspeed_config({"zero_stage": 3, "precision": "bf16", "offload_optimizer": True,
                          "offload_params": True}, p, world_size=2)
    assert c["train_batch_size"] == 16 and c["gradient_clipping"] == 0.5
    assert c["zero_optimization"]["stage"] == 3 and c["bf16"]["enabled"]
    assert c["zero_optimization"]["offload_param"] == {"device": "cpu"}
    with pytest.raises(ValueError, match="offload_params needs zero_stage 3"):
        deepspeed_config({"zero_stage": 2, "offload_params": True}, p, 1)
    with pytest.raises(ValueError, match="precision"):
        deepspeed_config({"precision": "fp8"}, p, 1)
    # one worker: ZeRO-1/2 has nothing to partition and runs as ZeRO-0, unless it offloads
    assert deepspeed_config({"zero_stage": 2}, p, 1)["zero_optimization"]["stage"] == 0
    assert deepspeed_config({"zero_stage": 2}, p, 2)["zero_optimization"]["stage"] == 2
    assert deepspeed_config({"zero_stage": 2, "offload_optimizer": True}, p, 1)[
        "zero_optimization"]["stage"] == 2


def test_check_resources_names_stage_and_fix():
    check_resources("sft", 2, 1, 0, {"CPU": 2.0})
    with pytest.raises(ResourceError, match=r"stage 'sft'.*8 CPUs.*has 2.*num_workers"):
        check_resources("sft", 4, 2, 0, {"CPU": 2.0})
    with pytest.raises(ResourceError, match="gpus_per_worker"):
        check_resources("sft", 1, 1, 1, {"CPU": 2.0})


@pytest.mark.parametrize("preset", ["tiny-teacher", "tiny-student"])
def test_image_reaches_the_llm(tok_dir, preset):
    """The answer's loss must depend on the image: 16 image tokens with the model's id, vision
    features scattered into them, and gradient flowing back to the pixels and the vision tower
    (a model that cannot see the image trains to the answer prior and nothing distils)."""
    from PIL import Image

    torch.manual_seed(0)
    model, proc = build_model({"preset": preset}, tok_dir)
    text = "<|im_start|>user\n<image>\nwhat color is the square ?<|im_end|>\n<|im_start|>assistant\nred"
    images = [Image.new("RGB", (32, 32), c) for c in ((220, 40, 40), (40, 80, 220))]
    enc = proc(images=images, text=[text, text], return_tensors="pt")
    ids = enc["input_ids"]
    assert ((ids == model.config.image_token_id).sum(1) == 16).all()
    pixels = enc["pixel_values"].requires_grad_(True)
    out = model(input_ids=ids, attention_mask=enc["attention_mask"], pixel_values=pixels)
    answer_logits = out.logits[:, -2]  # predicts the answer token
    assert not torch.allclose(answer_logits[0], answer_logits[1], atol=1e-6)
    answer_logits[:, ids[0, -1]].sum().backward()
    assert pixels.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.model.vision_tower.embeddings.patch_embedding.parameters())


def test_deepspeed_is_imported_without_mlflow_and_mlflow_still_imports():
    """The training worker's DeepSpeed import skips the autotuner's MLflow import (1 s a worker);
    afterwards MLflow imports as usual. A fresh interpreter: this one may hold either already."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from workloads.train_loop_parts import import_deepspeed\n"
            "ds = import_deepspeed()\n"
            "assert 'mlflow' not in sys.modules, 'deepspeed pulled in mlflow'\n"
            "import deepspeed.autotuning.autotuner as a\n"
            "assert a.has_mlflow is False\n"
            "assert import_deepspeed() is ds\n"
            "import mlflow\n"
            "assert mlflow.__version__\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
