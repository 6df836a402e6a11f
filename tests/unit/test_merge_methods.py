"""Merge methods on hand-computed tensors and on pico LLaVA checkpoints (no Ray).

Pico models: two tiny-student LLaVAs + a base, saved as real HF checkpoints once per module."""

from __future__ import annotations

import copy

import pytest
import torch

from workloads.merging import (MERGE_METHODS, MergeInputError, check_merge_inputs,
                               list_merge_methods, merge_state_dicts)
from workloads.merging.cross import CrossMergedModel
from workloads.merging.ensemble import ensemble_merge
from workloads.merging.linear import linear_tensor
from workloads.merging.router import route_weights
from workloads.merging.task_arithmetic import task_arithmetic_tensor
from workloads.merging.ties import ties_tensor, trim_top_k
from workloads.merging.width import width_merge


@pytest.fixture(scope="module")
def pico(tmp_path_factory):
    from workloads.models import build_model, save_model
    from mmkd_test_plugins.train_fixtures import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("pico")
    tok = build_tiny_tokenizer(str(root / "tok"))
    torch.manual_seed(0)
    base, proc = build_model({"preset": "tiny-student"}, tok)
    models = {"base": base}
    for i in (1, 2):  # experts = base + a small task vector
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
        models[f"expert{i}"] = m
    dirs = {k: save_model(m, proc, str(root / k / "model")) for k, m in models.items()}
    return {"dirs": dirs, "models": models, "processor": proc}


def _batch(model, proc, n=2, t=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    n_img = cfg.image_seq_length
    ids = torch.randint(3, cfg.text_config.vocab_size, (n, t), generator=g)
    ids[ids == cfg.image_token_id] = 3
    ids[:, 1:1 + n_img] = cfg.image_token_id
    pv = torch.randn(n, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pv}


# ---- pure per-tensor functions ---------------------------------------------------------------

def test_registry_lists_every_method():
    # mmkd's own (plugins of installed packages, e.g. the test plugin's, come on top)
    own = [m.name for m in list_merge_methods() if m.fn.__module__.startswith("workloads.")]
    assert own == sorted(
        ["uniform", "linear", "task_arithmetic", "ties", "dare", "width", "cross", "ensemble"])
    assert MERGE_METHODS["ties"].needs_base and MERGE_METHODS["ensemble"].needs_partition


def test_linear_hand_computed():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    assert torch.equal(linear_tensor([a, b], [1, 0]), a)
    assert torch.allclose(linear_tensor([a, b], [2, 1]), torch.tensor([5 / 3, 10 / 3]))
    assert torch.allclose(linear_tensor([a, b], [2, 1], normalize=False), torch.tensor([5.0, 10.0]))
    assert torch.allclose(linear_tensor([a, b]), torch.tensor([2.0, 4.0]))


def test_task_arithmetic_and_ties_hand_computed():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    t1 = torch.tensor([2.0, 1.0, 0.5, 1.0])   # τ1 = [1, 0, -.5, 0]
    t2 = torch.tensor([3.0, 0.0, 1.0, 1.1])   # τ2 = [2, -1, 0, .1]
    assert torch.allclose(task_arithmetic_tensor(base, [t1, t2], 0.5),
                          base + 0.5 * torch.tensor([3.0, -1.0, -0.5, 0.1]))
    assert torch.equal(trim_top_k(torch.tensor([0.1, -3.0, 2.0, 0.5]), 0.5),
                       torch.tensor([0.0, -3.0, 2.0, 0.0]))
    # density 1: elected sign of Σ; mean over agreeing non-zero entries only
    out = ties_tensor(base, [t1, t2], density=1.0)
    assert torch.allclose(out, base + torch.tensor([1.5, -1.0, -0.5, 0.1]))
    # density .5 keeps τ1: [1, 0, -.5, 0]→ top2 = [1, -.5]; τ2 → [2, -1]
    out = ties_tensor(base, [t1, t2], density=0.5)
    assert torch.allclose(out, base + torch.tensor([1.5, -1.0, -0.5, 0.0]))


def test_route_weights_top1_picks_nearest_and_soft_sums_to_one():
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    emb = torch.tensor([[0.9, 0.1], [0.1, 0.8], [-2.0, 0.3]])
    w = route_weights(emb, centroids, "top1")
    assert w.argmax(-1).tolist() == [0, 1, 2] and torch.equal(w.sum(-1), torch.ones(3))
    s = route_weights(emb, centroids, "soft", temperature=0.1)
    assert torch.allclose(s.sum(-1), torch.ones(3)) and s.argmax(-1).tolist() == [0, 1, 2]
    assert (s > 0).all()


# ---- identities on pico checkpoints ----------------------------------------------------------

def test_linear_one_zero_is_first_model_and_uniform_of_identical_is_identity(pico):
    sds = [pico["models"][k].state_dict() for k in ("expert1", "expert2")]
    out = merge_state_dicts("linear", sds, params={"weights": [1.0, 0.0]})
    assert all(torch.equal(out[k], v) for k, v in sds[0].items())
    same = merge_state_dicts("uniform", [sds[1], sds[1], sds[1]])
    assert all(torch.allclose(same[k], v, atol=1e-6, rtol=0) for k, v in sds[1].items())


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_zero_task_vectors_return_the_base(pico, method):
    base = pico["models"]["base"].state_dict()
    out = merge_state_dicts(method, [base, base], base=base, params={"lambda_": 0.7})
    assert all(torch.equal(out[k], v) for k, v in base.items())


def test_width_doubles_shapes_loads_and_trains_a_step(pico, tmp_path):
    from transformers import LlavaForConditionalGeneration

    m1, m2 = pico["models"]["expert1"], pico["models"]["expert2"]
    merged = width_merge([m1, m2])
    merged.save_pretrained(tmp_path / "w")
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "w")
    t1, t = m1.config.text_config, loaded.config.text_config
    assert (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads) == (
        2 * t1.hidden_size, 2 * t1.intermediate_size, 2 * t1.num_attention_heads,
        2 * t1.num_key_value_heads)
    sd = loaded.state_dict()
    assert sd["model.language_model.layers.0.self_attn.q_proj.weight"].shape == (
        2 * m1.state_dict()["model.language_model.layers.0.self_attn.q_proj.weight"].shape[0],
        2 * t1.hidden_size)
    assert sd["model.multi_modal_projector.linear_1.weight"].shape[0] == 2 * t1.hidden_size
    batch = _batch(m1, pico["processor"])
    loaded.train()
    before = {k: v.clone() for k, v in loaded.named_parameters()}
    opt = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    loss = loaded(**batch, labels=batch["input_ids"]).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    changed = [k for k, v in loaded.named_parameters() if not torch.equal(v, before[k])]
    assert any("q_proj" in k for k in changed) and any("lm_head" in k for k in changed)


def test_width_of_a_model_with_itself_is_exact(pico):
    # Both halves carry the same stream, so the RMSNorm coupling vanishes: logits must match.
    m = pico["models"]["expert1"]
    merged = width_merge([m, m]).eval()
    batch = _batch(m, pico["processor"])
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, m(**batch).logits, atol=1e-4)


def test_cross_forward_backward_only_new_layers_get_gradients(pico, tmp_path):
    from workloads.merging import load_merged

    m1 = copy.deepcopy(pico["models"]["expert1"])
    m2 = copy.deepcopy(pico["models"]["expert2"])
    cross = CrossMergedModel(m1, m2, cross_every=1)
    assert cross.bridge_layers == [0, 1]
    batch = _batch(m1, pico["processor"])
    out = cross(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (2, 20, m1.config.text_config.vocab_size)
    out.loss.backward()
    new = {id(p) for p in cross.new_parameters()}
    assert all(p.grad is None for p in cross.parameters() if id(p) not in new)
    assert all(p.grad is not None for p in cross.new_parameters())
    assert any(float(p.grad.abs().sum()) > 0 for p in cross.new_parameters())
    cross.save(str(tmp_path / "c"))
    loaded = load_merged(str(tmp_path / "c"))
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, cross.eval()(**batch).logits, atol=1e-5)
        gen = loaded.generate(**batch, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] <= 23


def test_ensemble_of_one_expert_is_that_expert(pico):
    m = pico["models"]["expert1"]
    ens = ensemble_merge([m], params={"router": "soft"}, centroids=torch.randn(1, 64).numpy())
    batch = _batch(m, pico["processor"])
    with torch.no_grad():
        p_ens = torch.softmax(ens(**batch).logits, -1)
        p_one = torch.softmax(m(**batch).logits, -1)
    assert torch.allclose(p_ens, p_one, atol=1e-6)


def test_ensemble_top1_routes_to_nearest_centroid(pico):
    from workloads.merging.router import embed_images

    m1, m2 = pico["models"]["expert1"], pico["models"]["expert2"]
    batch = _batch(m1, pico["processor"], n=2)
    emb = embed_images(m1.model.vision_tower, batch["pixel_values"])
    # centroid k = sample k's own embedding → sample k goes to expert k
    ens = ensemble_merge([m1, m2], params={"router": "top1"}, centroids=emb.numpy())
    with torch.no_grad():
        out = ens(**batch)
        assert out.routing.argmax(-1).tolist() == [0, 1]
        for k, m in enumerate((m1, m2)):
            one = {key: v[k:k + 1] for key, v in batch.items()}
            assert torch.allclose(torch.softmax(out.logits[k], -1),
                                  torch.softmax(m(**one).logits[0], -1), atol=1e-6)


def test_incompatible_inputs_name_the_method_and_the_need(pico):
    assert "'cross' merges at most 2" in check_merge_inputs("cross", 3, False, False)[0]
    assert "'width' merges at most 2" in check_merge_inputs("width", 3, False, False)[0]
    assert "'ties' needs input `base`" in check_merge_inputs("ties", 2, False, False)[0]
    assert "'task_arithmetic' needs input `base`" in check_merge_inputs(
        "task_arithmetic", 2, False, False)[0]
    assert "'ensemble' needs input `partition`" in check_merge_inputs("ensemble", 2, False, False)[0]
    assert "`weights` has 1 entries for 2" in check_merge_inputs("linear", 2, False, False, [1])[0]
    with pytest.raises(MergeInputError, match="unknown merge method 'soup'"):
        check_merge_inputs("soup", 2, False, False)
    student = pico["models"]["expert1"].state_dict()
    other = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) if k == "lm_head.weight" else v
             for k, v in student.items()}
    with pytest.raises(MergeInputError, match="'uniform' needs models with identical shapes; "
                                              "lm_head.weight"):
        merge_state_dicts("uniform", [student, other])
    with pytest.raises(MergeInputError, match="'cross' needs exactly K=2"):
        MERGE_METHODS["cross"].fn([pico["models"]["base"]] * 3)


def test_wrappers_score_mixed_image_text_batches_like_evaluate(pico):
    """evaluate's caption_perplexity passes images only for rows that have one."""
    from workloads.evaluation.evaluate import caption_perplexity

    m1, m2 = pico["models"]["expert1"], pico["models"]["expert2"]
    b = _batch(m1, pico["processor"], n=2)
    b["input_ids"][1, 1:17] = 5  # row 1: text only
    batch = {**b, "labels": b["input_ids"].clone(), "has_image": torch.tensor([1, 0])}
    ens = ensemble_merge([m1, m2], params={"router": "top1"}, centroids=torch.randn(2, 64).numpy())
    cross = CrossMergedModel(copy.deepcopy(m1), copy.deepcopy(m2), cross_every=2).eval()
    for model in (ens, cross):
        ppl = caption_perplexity(model, [batch])
        assert ppl == ppl and 1.0 < ppl < 1e6
    w = ens.routing(batch["input_ids"], b["pixel_values"][:1])
    assert torch.allclose(w[1], torch.tensor([0.5, 0.5])) and w[0].sum() == 1
