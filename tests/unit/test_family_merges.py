"""Merges of every VLM family (workloads/families): parameter averages through the merge stage's
body (``run_merge``) reload with ``AutoModelForImageTextToText`` and generate; the coverage audit
catches a dropped tensor; JAM-Width and JAM-Cross equal the references they claim to equal where
the family allows an exact construction, and are refused with the reason where it does not.

Tiny models: random-init students (teachers for Cross: two decoder layers) built from one trained
tokenizer, as tests/unit/test_families.py does. No Ray."""

from __future__ import annotations

import copy

import pytest
from family_fixtures import random_image
import torch

from workloads.families import (FAMILIES, build_tiny, collate, encode, get_family,
                                load_processor_parts, parameter_part, tiny_model,
                                tiny_processor_parts)
from workloads.merge import MergeConfig, run_merge
from workloads.merging import MergeInputError
from workloads.merging.anatomy import text_prefix
from workloads.merging.audit import CoverageError, audit_coverage
from workloads.merging.cross import CrossMergedModel
from workloads.merging.ties import ties_tensor
from workloads.merging.width import width_merge

NAMES = sorted(FAMILIES)
WIDTH_EXACT = ["idefics3", "internvl", "llava", "llava_next", "llava_onevision", "qwen2_5_vl",
               "qwen2_vl", "smolvlm"]
WIDTH_REFUSED = ["gemma3", "qwen3_vl"]
CROSS_STEPPABLE = [n for n in NAMES if n != "qwen3_vl"]
CONV = [{"role": "user", "content": "<image>\nWhat color is the shape?"},
        {"role": "assistant", "content": "It is a red square."}]
PROMPT = CONV[:1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok_dir):
    """(family, seed) -> a saved tiny student dir (seed 0 serves as the base), built once."""
    cache: dict[tuple[str, int], str] = {}

    def get(family: str, seed: int) -> str:
        if (family, seed) not in cache:
            out = tmp_path_factory.mktemp(f"{family}_{seed}")
            cache[family, seed] = build_tiny(family, "student", tok_dir, str(out), seed=seed)
        return cache[family, seed]

    return get


def _state(path: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path).state_dict()


def _batch(name: str, parts, conversations=(CONV,), images=None, generation=False):
    images = images or [random_image(30, 50)] * len(conversations)
    samples = [encode(name, parts, c, im, add_generation_prompt=generation)
               for c, im in zip(conversations, images)]
    batch = collate(name, samples, parts.tokenizer.pad_token_id)
    batch.pop("labels")
    return batch


# ---- parameter averages: every family, through run_merge ------------------------------------

@pytest.mark.parametrize("method", ["uniform", "linear", "ties"])
@pytest.mark.parametrize("name", NAMES)
def test_tensor_merge_of_every_family_reloads_and_generates(name, method, saved, tmp_path):
    from transformers import AutoModelForImageTextToText

    params = {"uniform": {}, "linear": {"weights": [0.25, 0.75]},
              "ties": {"density": 0.5, "lambda_": 1.0}}[method]
    parents = [saved(name, 1), saved(name, 2)]
    base = saved(name, 0) if method == "ties" else None
    out = str(tmp_path / "merged")
    metrics = run_merge(MergeConfig(method=method, **params), parents, out, base)

    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    assert type(merged).__name__ == get_family(name).model_class
    sd, p1, p2 = merged.state_dict(), _state(parents[0]), _state(parents[1])
    assert sd.keys() == p1.keys() and metrics["audited_tensors"] == 2 * len(p1)
    b = _state(base) if base else None
    for k, v in sd.items():  # every tensor, vision tower included
        if not torch.is_floating_point(v):
            continue
        if method == "uniform":
            want = (p1[k] + p2[k]) / 2
        elif method == "linear":
            want = 0.25 * p1[k] + 0.75 * p2[k]
        else:
            want = ties_tensor(b[k], [p1[k], p2[k]], density=0.5, lambda_=1.0)
        torch.testing.assert_close(v, want, rtol=1e-5, atol=1e-6, msg=k)
    assert any(parameter_part(name, k) == "vision" and not torch.equal(sd[k], p1[k]) for k in sd)

    parts = load_processor_parts(out)  # the first parent's processor files came along
    batch = _batch(name, parts, (PROMPT,), generation=True)
    with torch.no_grad():
        gen = merged.generate(**batch, max_new_tokens=3, do_sample=False)
    assert gen.shape[0] == 1 and batch["input_ids"].shape[1] < gen.shape[1] <= \
        batch["input_ids"].shape[1] + 3
    assert torch.equal(gen[:, : batch["input_ids"].shape[1]], batch["input_ids"])


@pytest.mark.parametrize("method,params", [("task_arithmetic", {"lambda_": 0.5}),
                                           ("dare", {"drop_rate": 0.0, "lambda_": 0.5})])
def test_task_vector_methods_on_a_family(method, params, saved, tmp_path):
    """task arithmetic and DARE (p = 0: the same) on Qwen2-VL: base + λ Σ (θ_k − base)."""
    parents, base = [saved("qwen2_vl", 1), saved("qwen2_vl", 2)], saved("qwen2_vl", 0)
    run_merge(MergeConfig(method=method, **params), parents, str(tmp_path / "m"), base)
    sd, b = _state(str(tmp_path / "m")), _state(base)
    p1, p2 = _state(parents[0]), _state(parents[1])
    for k in sd:
        want = b[k] + 0.5 * ((p1[k] - b[k]) + (p2[k] - b[k]))
        torch.testing.assert_close(sd[k], want, rtol=1e-5, atol=1e-6, msg=k)


def test_parents_of_two_families_or_architectures_are_refused(saved, tok_dir, tmp_path):
    with pytest.raises(MergeInputError, match=r"merges models of one family; models\[0\] .* is "
                                              r"llava .* but models\[1\] .* is qwen2_vl"):
        run_merge(MergeConfig(method="uniform"), [saved("llava", 1), saved("qwen2_vl", 1)],
                  str(tmp_path / "m"))
    teacher = build_tiny("internvl", "teacher", tok_dir, str(tmp_path / "teacher"))
    with pytest.raises(MergeInputError, match=r"'uniform' averages parameters and needs models "
                                              r"of the same architecture; .*\(both internvl .*"
                                              r"differ in parameter names: 'model\.vision_tower\."
                                              r"encoder\.layer\.1\..*' is in models\[1\]"):
        run_merge(MergeConfig(method="uniform"), [saved("internvl", 1), teacher],
                  str(tmp_path / "m"))
    assert not (tmp_path / "m").exists()


# ---- the coverage audit ---------------------------------------------------------------------

def test_audit_fails_a_merge_whose_writer_drops_a_vision_tensor(saved, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    real = mu.safe_save_file
    dropped = []

    def lossy(tensors, filename, metadata=None):  # mergekit-style: one vision weight lost
        key = next(k for k in tensors if k.startswith(("visual.", "model.visual.")))
        dropped.append(key)
        return real({k: v for k, v in tensors.items() if k != key}, filename, metadata=metadata)

    parents = [saved("qwen2_vl", 1), saved("qwen2_vl", 2)]
    monkeypatch.setattr(mu, "safe_save_file", lossy)
    with pytest.raises(CoverageError, match=r"1 of models\[0\] .*'s \d+ tensors are missing "
                                            r"\(e\.g\. model\.visual\."):
        run_merge(MergeConfig(method="uniform"), parents, str(tmp_path / "m"))
    assert dropped and not (tmp_path / "m").exists()  # nothing published
    monkeypatch.setattr(mu, "safe_save_file", real)
    metrics = run_merge(MergeConfig(method="uniform"), parents, str(tmp_path / "m"))
    assert metrics["audited_tensors"] == 2 * len(_state(parents[0]))


def test_audit_counts_tied_tensors_and_names_shape_changes(saved, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    path = saved("llava", 1)
    model = AutoModelForImageTextToText.from_pretrained(path)
    out = tmp_path / "copy"
    out.mkdir()
    tensors = load_file(f"{path}/model.safetensors")
    # legacy names on disk map back to the model's names: the copy passes as it is
    assert audit_coverage(path, model, [model], ["parent"]) == len(model.state_dict())
    key = next(k for k in tensors if "multi_modal_projector" in k and k.endswith("weight"))
    tensors[key] = tensors[key][:-1]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(CoverageError, match=r"1 have another shape \(e\.g\. "
                                            r"model\.multi_modal_projector\..*: expected"):
        audit_coverage(str(out), model, [model], ["parent"])
    # a tied lm_head is not written by save_pretrained: it counts as present via the embedding
    tied = copy.deepcopy(model)
    tied.lm_head.weight = tied.model.language_model.embed_tokens.weight
    tied.save_pretrained(tmp_path / "tied")
    written = load_file(f"{tmp_path}/tied/model.safetensors")
    assert not any(k.endswith("lm_head.weight") for k in written)
    assert audit_coverage(str(tmp_path / "tied"), tied, [tied], ["tied"]) > 0


# ---- JAM-Width -------------------------------------------------------------------------------

class _SplitNorm(torch.nn.Module):
    """A doubled-width norm applied to each half on its own (the parents' own statistics)."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.half = norm.weight.shape[0] // 2
        self.parts = torch.nn.ModuleList()
        for i in range(2):
            part = copy.deepcopy(norm)
            sl = slice(i * self.half, (i + 1) * self.half)
            part.weight = torch.nn.Parameter(norm.weight.data[sl].clone())
            if getattr(norm, "bias", None) is not None:
                part.bias = torch.nn.Parameter(norm.bias.data[sl].clone())
            if hasattr(part, "normalized_shape"):
                part.normalized_shape = (self.half,)
            self.parts.append(part)

    def forward(self, x):
        a, b = x[..., : self.half], x[..., self.half:]
        return torch.cat([self.parts[0](a), self.parts[1](b)], dim=-1)


def _split_doubled_norms(merged, parent) -> int:
    own = dict(parent.named_modules())
    count = 0
    for name, mod in list(merged.named_modules()):
        if "Norm" not in type(mod).__name__ or name not in own:
            continue
        if mod.weight.shape[0] == 2 * own[name].weight.shape[0]:
            holder, _, attr = name.rpartition(".")
            setattr(merged.get_submodule(holder), attr, _SplitNorm(mod))
            count += 1
    return count


def _width_parents(name: str, tok_dir: str):
    """Two students with different weights (norm weights and biases jittered, so folding them
    is exercised); for vision: first, parent 2 gets parent 1's tower (the exact case)."""
    parts = tiny_processor_parts(name, tok_dir)
    models = [tiny_model(name, "student", parts.tokenizer, seed=s).eval() for s in (1, 2)]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in models:
            for p in m.parameters():
                if p.dim() == 1:
                    p.add_(0.2 * torch.randn(p.shape, generator=g))
        if not name.startswith("qwen"):
            sd = models[1].state_dict()
            sd.update({k: v for k, v in models[0].state_dict().items()
                       if parameter_part(name, k) == "vision"})
            models[1].load_state_dict(sd)
    return parts, models


@pytest.mark.parametrize("name", WIDTH_EXACT)
def test_width_equals_the_weighted_ensemble_of_its_parents(name, tok_dir):
    """With every doubled norm split into its two halves (removing the documented norm
    coupling), the widened model's logits are exactly w_1 logits_1 + w_2 logits_2; merged with
    itself (equal halves: no coupling) it is exactly the parent."""
    parts, (m1, m2) = _width_parents(name, tok_dir)
    batch = _batch(name, parts, (CONV, CONV), [random_image(30, 50), random_image(64, 20, seed=2)])
    with torch.no_grad():
        l1, l2 = m1(**batch).logits, m2(**batch).logits
        merged = width_merge([m1, m2], params={"weights": [0.3, 0.7]}).eval()
        t = merged.config.text_config
        assert t.hidden_size == 2 * m1.config.text_config.hidden_size
        assert _split_doubled_norms(merged, m1) >= 2 * t.num_hidden_layers + 1
        torch.testing.assert_close(merged(**batch).logits, 0.3 * l1 + 0.7 * l2,
                                   atol=2e-5, rtol=1e-4)
        self_merge = width_merge([m1, copy.deepcopy(m1)]).eval()
        torch.testing.assert_close(self_merge(**batch).logits, l1, atol=2e-5, rtol=1e-4)


def test_width_merge_stage_writes_a_reloadable_qwen2_vl(saved, tmp_path):
    """vision: auto widens Qwen's tower (its projector lives inside it); the stage's output
    reloads with the Auto class and passes the audit with widened shapes."""
    from transformers import AutoModelForImageTextToText

    parents = [saved("qwen2_vl", 1), saved("qwen2_vl", 2)]
    metrics = run_merge(MergeConfig(method="width"), parents, str(tmp_path / "w"))
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "w").eval()
    assert merged.config.vision_config.embed_dim == 2 * 32
    assert metrics["audited_tensors"] == 2 * len(_state(parents[0]))
    batch = _batch("qwen2_vl", load_processor_parts(str(tmp_path / "w")), (PROMPT,),
                   generation=True)
    with torch.no_grad():
        assert merged.generate(**batch, max_new_tokens=2).shape[1] > batch["input_ids"].shape[1]
    with pytest.raises(MergeInputError, match="vision: first\\) cannot be exact for qwen2_vl"):
        run_merge(MergeConfig(method="width", vision="first"), parents, str(tmp_path / "w2"))


@pytest.mark.parametrize("name", WIDTH_REFUSED)
def test_width_refuses_families_with_shared_q_k_norms(name, tok_dir):
    parts = tiny_processor_parts(name, tok_dir)
    m = tiny_model(name, "student", parts.tokenizer)
    with pytest.raises(MergeInputError, match=rf"cannot build an exact JAM-Width model of {name} "
                                              rf".*q_norm/k_norm weight of size head_dim shared "
                                              rf"by all heads"):
        width_merge([m, m])


# ---- JAM-Cross -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CROSS_STEPPABLE)
def test_cross_at_init_equals_the_fused_parents(name, tok_dir):
    """Zero-initialised bridges: logits = lm_head_A((norm_A(h_A) + norm_B(h_B)) / 2), h_B being
    B's decoder run on A's multimodal embeddings (B' = B with A's vision, projector and token
    embedding, through its own forward). Two decoder layers, a bridge after each."""
    parts = tiny_processor_parts(name, tok_dir)
    fam = get_family(name)
    a, b = (tiny_model(name, "teacher", parts.tokenizer, seed=s).eval() for s in (1, 2))
    b_on_a = copy.deepcopy(b)
    sd, sa = b_on_a.state_dict(), a.state_dict()
    sd.update({k: sa[k] for k in sd if parameter_part(fam, k) != "llm"
               or k == text_prefix(fam) + "embed_tokens.weight"})
    b_on_a.load_state_dict(sd)
    short = CONV[:1] + [{"role": "assistant", "content": "Red."}]
    batch = _batch(name, parts, (CONV, short), [random_image(30, 50), random_image(64, 20, seed=2)])
    real = batch["attention_mask"].bool()
    cross = CrossMergedModel(a, b, cross_every=1).eval()
    assert cross.bridge_layers == [0, 1]
    with torch.no_grad():
        h_a, h_b = a.model(**batch).last_hidden_state, b_on_a.model(**batch).last_hidden_state
        want = a.lm_head((h_a + h_b) / 2)
        got = cross(**batch).logits
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(got[real], a(**batch).logits[real], atol=1e-3)  # B counts
        torch.nn.init.normal_(cross.bridges_ab["0"].o.weight, std=0.1)  # bridges are wired in
        assert not torch.allclose(cross(**batch).logits[real], got[real], atol=1e-4)


def test_cross_merge_stage_qwen2_vl_trains_new_layers_saves_reloads_and_generates(saved, tmp_path):
    from workloads.merging import load_any_model

    parents = [saved("qwen2_vl", 1), saved("qwen2_vl", 2)]
    metrics = run_merge(MergeConfig(method="cross", cross_every=1), parents, str(tmp_path / "c"))
    assert metrics["new_params"] > 0
    assert metrics["audited_tensors"] == 2 * len(_state(parents[0]))
    model, processor = load_any_model(str(tmp_path / "c"))
    batch = _batch("qwen2_vl", processor.parts, (CONV,))
    labels = encode("qwen2_vl", processor.parts, CONV, random_image(30, 50))["labels"]
    model.train()
    out = model(**batch, labels=torch.as_tensor(labels)[None])
    out.loss.backward()
    new = {id(p) for p in model.new_parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in new)
    assert any(float(p.grad.abs().sum()) > 0 for p in model.new_parameters())
    model.eval()
    gen_batch = _batch("qwen2_vl", processor.parts, (PROMPT,), generation=True)
    with torch.no_grad():
        gen = model.generate(**gen_batch, max_new_tokens=3)
    assert gen.shape[1] > gen_batch["input_ids"].shape[1]


def test_cross_refuses_qwen3_vl_with_the_reason(tok_dir):
    parts = tiny_processor_parts("qwen3_vl", tok_dir)
    m = tiny_model("qwen3_vl", "student", parts.tokenizer)
    with pytest.raises(MergeInputError, match=r"cannot do so for qwen3_vl .*DeepStack"):
        CrossMergedModel(m, copy.deepcopy(m), cross_every=1)
