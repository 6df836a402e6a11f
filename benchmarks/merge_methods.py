"""Merge-method cost on the tiny presets: wall time of each merge (weights already in memory,
median of ``--repeats``) and inference cost of the merged models — one forward pass on a fixed
batch, relative to one parent — written to ``benchmarks/results/merge_methods.json``.

    python benchmarks/merge_methods.py [--presets tiny-student tiny-teacher] [--repeats 5]

One torch thread: on a shared 2-core machine single-thread CPU time is the comparable number,
and times are only comparable within one run (loadavg is recorded).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from workloads.merging import MERGE_METHODS, merge_state_dicts  # noqa: E402
from workloads.merging.router import embed_images  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "merge_methods.json")


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _batch(model, n: int = 4, t: int = 48):
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.text_config.vocab_size, (n, t), generator=g)
    ids[ids == cfg.image_token_id] = 3
    ids[:, 1:1 + cfg.image_seq_length] = cfg.image_token_id
    size = cfg.vision_config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(n, 3, size, size, generator=g)}


def bench_preset(preset: str, tok_dir: str, repeats: int) -> dict:
    from workloads.models import build_model

    torch.manual_seed(0)
    base, _ = build_model({"preset": preset}, tok_dir)
    experts = []
    for _ in range(2):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
        experts.append(m.eval())
    batch = _batch(base)
    sds = [m.state_dict() for m in experts]
    params = None  # every method's own defaults (MergeMethod.params)
    centroids = embed_images(base.model.vision_tower, batch["pixel_values"][:2]).numpy()
    merge_s, built = {}, {}
    for name, m in sorted(MERGE_METHODS.items()):
        if m.kind == "tensor":
            fn = lambda m=m, name=name: merge_state_dicts(  # noqa: E731
                name, sds, base.state_dict() if m.needs_base else None, params)
        elif name == "ensemble":
            fn = lambda m=m: m.fn(experts, base, params, centroids=centroids)  # noqa: E731
        else:
            fn = lambda m=m: m.fn(experts, base, params)  # noqa: E731
        with torch.no_grad():
            merge_s[name] = _median_time(fn, repeats)
            built[name] = fn()
    soft = MERGE_METHODS["ensemble"].fn(experts, base, {"router": "soft"},
                                        centroids=centroids)
    forward = {}
    models = {"single": experts[0], "width": built["width"].eval(), "cross": built["cross"].eval(),
              "ensemble_top1": built["ensemble"], "ensemble_soft": soft}
    with torch.no_grad():
        for name, model in models.items():
            model(**batch)  # warm-up
            forward[name] = _median_time(lambda model=model: model(**batch), repeats)
    n_params = {name: sum(p.numel() for p in mod.parameters()) for name, mod in models.items()}
    return {"params_single": n_params["single"],
            "params": n_params,
            "merge_s": merge_s,
            "forward_s": forward,
            "forward_relative_to_single": {k: v / forward["single"] for k, v in forward.items()},
            "forward_batch": {"batch": 4, "seq_len": 48}}


def main(argv: list[str] | None = None) -> dict:
    import transformers

    from mmkd_test_plugins.train_fixtures import build_tiny_tokenizer

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--presets", nargs="+", default=["tiny-student", "tiny-teacher"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    tok = build_tiny_tokenizer(tempfile.mkdtemp(prefix="mmkd-bench-tok-"))
    results = {p: bench_preset(p, tok, args.repeats) for p in args.presets}
    out = {"benchmark": "merge_methods", "config": vars(args), "results": results,
           "notes": "merge_s: in-memory merge of 2 experts (+ base) excluding checkpoint I/O; "
                    "ensemble top1 runs one expert per sample (+ router tower), soft runs all K; "
                    "cross runs both decoders + bridges.",
           "machine": {"platform": platform.platform(), "python": platform.python_version(),
                       "cpu_count": os.cpu_count(), "processor": platform.processor(),
                       "torch": torch.__version__, "transformers": transformers.__version__,
                       "threads": 1, "gpu": None, "loadavg_before": load_before,
                       "loadavg_after": os.getloadavg()},
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(results, indent=2))
    return out


if __name__ == "__main__":
    main()
