"""DARE (Yu et al. 2024) against its definition, and the typed merge-method params it rides on.

DARE per task vector δ_k = θ_k − θ_base: keep each entry with probability 1 − p (Bernoulli
mask m_k), rescale δ̂_k = m_k ⊙ δ_k / (1 − p); merged = θ_base + λ Σ_k w_k δ̂_k.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from workloads.merge import MergeConfig
from workloads.merging import (MERGE_METHODS, list_merge_methods, merge_state_dicts,
                               method_params, tensor_generator)
from workloads.merging.dare import DareParams, dare_tensor
from workloads.merging.task_arithmetic import task_arithmetic_tensor
from workloads.merging.ties import elect_and_mean, ties_tensor

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
T1 = torch.tensor([2.0, 0.0, 1.5, 1.2], dtype=torch.float64)  # δ1 = [1, -1, .5, .2]
T2 = torch.tensor([0.5, 3.0, 1.0, 1.4], dtype=torch.float64)  # δ2 = [-.5, 2, 0, .4]


def _generator(seed: int, name: str) -> torch.Generator:
    """The documented rule, written out: sha256(f"{seed}:{name}"), first 8 bytes, little-endian,
    top bit cleared."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _dare_by_definition(base, tensors, p, lam, weights, seed, name):
    """float64 numpy; masks m_k = U_k < 1 − p with U_k the generator's k-th rand draw."""
    g = _generator(seed, name)
    b = base.double().numpy()
    total = np.zeros_like(b)
    for w, t in zip(weights, tensors):
        m = (torch.rand(base.shape, generator=g, dtype=torch.float32) < 1 - p).numpy()
        total += w * (m * (t.double().numpy() - b) / (1 - p))
    return b + lam * total


# ---- golden values ------------------------------------------------------------------------

def test_dare_hand_computed_mask():
    # seed 0, name "w": the generator's first draws are
    #   model 1: [.1687, .6099, .7362, .2010] -> keep (U < .7) [1, 1, 0, 1]
    #   model 2: [.0747, .9238, .6740, .8118] -> keep          [1, 0, 1, 0]
    u = torch.rand(8, generator=tensor_generator(0, "w"))
    assert torch.allclose(u, torch.tensor([.1687, .6099, .7362, .2010,
                                           .0747, .9238, .6740, .8118]), atol=1e-4)
    out = merge_state_dicts("dare", [{"w": T1}, {"w": T2}], base={"w": BASE},
                            params={"drop_rate": 0.3}, seed=0)["w"]
    # δ̂1 = [1, -1, 0, .2] / .7, δ̂2 = [-.5, 0, 0, 0] / .7 (δ2[2] = 0 is kept but is zero)
    expected = BASE + torch.tensor([0.5, -1.0, 0.0, 0.2], dtype=torch.float64) / 0.7
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("p,lam,weights,seed", [(0.5, 1.0, [1.0, 1.0], 0),
                                                (0.9, 0.7, [0.3, 2.0], 11),
                                                (0.2, 1.5, None, 5)])
def test_dare_matches_its_definition_on_every_tensor(p, lam, weights, seed):
    g = torch.Generator().manual_seed(123)
    shapes = {"a.weight": (7, 5), "b.bias": (9,), "c": (3, 2, 4)}
    base = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    models = [{k: v + torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in
               base.items()} for _ in range(2)]
    params = {"drop_rate": p, "lambda_": lam, "weights": weights}
    out = merge_state_dicts("dare", models, base=base, params=params, seed=seed)
    for name in shapes:
        ref = _dare_by_definition(base[name], [m[name] for m in models], p, lam,
                                  weights or [1.0, 1.0], seed, name)
        np.testing.assert_allclose(out[name].numpy(), ref, rtol=0, atol=1e-12)


# ---- identities and properties ------------------------------------------------------------

def test_drop_rate_zero_is_task_arithmetic():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, generator=g)
    tensors = [base + torch.randn(50, generator=g) for _ in range(3)]
    got = dare_tensor(base, tensors, 0.0, tensor_generator(0, "x"), 0.6, [1.0, 0.5, 2.0])
    assert torch.equal(got, task_arithmetic_tensor(base, tensors, 0.6, [1.0, 0.5, 2.0]))


def test_expectation_is_task_arithmetic():
    """E[δ̂] = δ: the mean over many seeded draws approaches task arithmetic (within 5 σ)."""
    p, n = 0.6, 4000
    draws = torch.stack([dare_tensor(BASE, [T1, T2], p, tensor_generator(s, "w"))
                         for s in range(n)])
    ta = task_arithmetic_tensor(BASE, [T1, T2])
    # per entry Var(δ̂_k) = δ_k² p / (1 − p); the two models' masks are independent
    sigma = torch.sqrt(((T1 - BASE) ** 2 + (T2 - BASE) ** 2) * p / (1 - p) / n)
    assert ((draws.mean(0) - ta).abs() <= 5 * sigma + 1e-12).all()
    assert not torch.equal(draws[0], draws[1])  # it does drop


def test_same_seed_and_name_reproduce_and_order_does_not_matter():
    g = torch.Generator().manual_seed(1)
    names = [f"layer{i}.weight" for i in range(6)]
    base = {k: torch.randn(32, generator=g) for k in names}
    models = [{k: v + torch.randn(32, generator=g) for k, v in base.items()} for _ in range(2)]
    params = {"drop_rate": 0.5}
    a = merge_state_dicts("dare", models, base=base, params=params, seed=7)
    b = merge_state_dicts("dare", models, base=base, params=params, seed=7)
    assert all(torch.equal(a[k], b[k]) for k in names)
    rev = merge_state_dicts("dare", [dict(reversed(m.items())) for m in models],
                            base=dict(reversed(base.items())), params=params, seed=7)
    assert all(torch.equal(a[k], rev[k]) for k in names)
    other_seed = merge_state_dicts("dare", models, base=base, params=params, seed=8)
    assert all(not torch.equal(a[k], other_seed[k]) for k in names)


def test_different_names_draw_different_masks():
    same = {"q.weight": T1, "k.weight": T1}
    out = merge_state_dicts("dare", [same, same], base={"q.weight": BASE, "k.weight": BASE},
                            params={"drop_rate": 0.5}, seed=0)
    masks = [torch.rand(8, generator=tensor_generator(0, n)) for n in ("q.weight", "k.weight")]
    assert not torch.equal(masks[0], masks[1])
    assert not torch.equal(out["q.weight"], out["k.weight"])


def test_sign_elect_is_ties_on_the_rescaled_vectors():
    p = 0.5
    got = dare_tensor(BASE, [T1, T2], p, tensor_generator(3, "w"), sign_elect=True)
    g = tensor_generator(3, "w")
    rescaled = torch.stack([(torch.rand(4, generator=g) < 1 - p) * (t - BASE) / (1 - p)
                            for t in (T1, T2)])
    assert torch.allclose(got, BASE + elect_and_mean(rescaled), rtol=0, atol=1e-12)
    # p = 0: DARE-TIES is TIES without trimming
    assert torch.allclose(dare_tensor(BASE, [T1, T2], 0.0, tensor_generator(0, "w"),
                                      sign_elect=True),
                          ties_tensor(BASE, [T1, T2], density=1.0),  # float32 math
                          rtol=0, atol=1e-6)


def test_zero_task_vectors_return_the_base_in_its_dtype():
    base = torch.randn(16).to(torch.bfloat16)
    out = dare_tensor(base, [base, base], 0.9, tensor_generator(0, "b"), lambda_=0.7)
    assert out.dtype == torch.bfloat16 and torch.equal(out, base)


# ---- typed params: every method declares its own ------------------------------------------

def test_every_method_declares_params_with_defaults():
    for m in list_merge_methods():
        assert m.params.model_config.get("extra") == "forbid", m.name
        m.params()  # `method: <name>` alone is a valid config
        assert MergeConfig(method=m.name).method == m.name


def test_merge_config_is_the_method_plus_its_own_params():
    cfg = MergeConfig(method="dare", drop_rate=0.5, seed=3)
    assert cfg.model_dump() == {"method": "dare", "seed": 3, "drop_rate": 0.5, "lambda_": 1.0,
                                "weights": None, "sign_elect": False}
    assert isinstance(cfg.params, DareParams) and cfg.params.drop_rate == 0.5
    assert MergeConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # what a stage task sees
    assert MergeConfig(method="ensemble", router="soft").params.temperature == 0.1
    params = cfg.params
    assert method_params("dare", params) is params


@pytest.mark.parametrize("data,loc,message", [
    ({"method": "dare", "drop_rate": 1.0}, ("drop_rate",), "merge method 'dare': Input should be "
                                                           "less than 1"),
    ({"method": "ties", "router": "soft"}, ("router",), "merge method 'ties' has no parameter "
                                                        "'router' (its parameters: lambda_, "
                                                        "density, weights)"),
    ({"method": "soup"}, ("method",), "unknown merge method 'soup'; known: cross, dare,"),
])
def test_merge_config_errors_name_the_method_and_the_field(data, loc, message):
    with pytest.raises(ValidationError) as e:
        MergeConfig.model_validate(data)
    (err,) = e.value.errors()
    assert err["loc"] == loc and message in err["msg"]


def test_pipeline_errors_point_at_the_stage_field():
    from orchestrator.loader import load_pipeline
    from orchestrator.spec import PipelineError

    with pytest.raises(PipelineError) as e:
        load_pipeline("pipelines/merge_ablation.yaml", ["stages.merge_soft.params.density=0.5"])
    text = str(e.value)
    assert "stage 'merge_soft'" in text and "'stages.merge_soft.params.density'" in text
    assert "merge method 'ensemble' has no parameter 'density'" in text
    pipe = load_pipeline("pipelines/merge_ablation.yaml",
                         ["stages.merge_soft.params={method: dare, drop_rate: 0.5}"])
    assert pipe.stages["merge_soft"].params["drop_rate"] == 0.5


def test_dare_is_registered_with_its_needs():
    m = MERGE_METHODS["dare"]
    assert m.kind == "tensor" and m.needs_base and m.params is DareParams


def test_merge_workload_dare_on_pico_checkpoints_is_seeded(tmp_path):
    """run_merge (the `merge` stage's body, no Ray): the stage seed reaches every tensor."""
    import copy

    from safetensors.torch import load_file

    from workloads.merge import run_merge
    from workloads.models import build_model, save_model
    from mmkd_test_plugins.train_fixtures import build_tiny_tokenizer

    tok = build_tiny_tokenizer(str(tmp_path / "tok"))
    torch.manual_seed(0)
    base, proc = build_model({"preset": "tiny-student"}, tok)
    dirs = {"base": save_model(base, proc, str(tmp_path / "base"))}
    for i in (1, 2):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
        dirs[i] = save_model(m, proc, str(tmp_path / f"expert{i}"))

    def merged(name, **params):
        run_merge(MergeConfig(method=params.pop("method", "dare"), **params),
                  [dirs[1], dirs[2]], str(tmp_path / name), dirs["base"])
        return load_file(str(tmp_path / name / "model.safetensors"))

    a, b = merged("a", drop_rate=0.5, seed=1), merged("b", drop_rate=0.5, seed=1)
    c = merged("c", drop_rate=0.5, seed=2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    ta, p0 = merged("ta", method="task_arithmetic"), merged("p0", drop_rate=0.0)
    assert all(torch.equal(ta[k], p0[k]) for k in ta)
