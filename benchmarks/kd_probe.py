"""Where does a model's colour (and shape) information go? Linear probes on the models of one
run of pipelines/kd_term_ablation.yaml (the teacher, the baseline and the KD student with four sets
of KD terms), layer by layer, and what each model's LLM outputs at image positions.

For held-out scenes drawn like the `shapes` data (1-4 objects in a 2x2 grid of a 32 px image,
8 px patches), each object's feature at a layer is the mean of the 4 patch tokens of its grid
cell; a logistic regression (scikit-learn, standardised features) is fitted on 70% of the
objects and scored on the other 30%, once for the object's colour (6 classes, chance 1/6) and
once for its shape (3 classes). Layers: the vision tower's output, the projector's output (what
the LLM reads), every LLM hidden state at the image positions, and the logits there (what
L_vis and L_rel distil). A high probe score says the information is *there*, linearly; whether
the model *uses* it to answer is the evaluate stage's per-type accuracy, copied beside it.

The second part is what each model's LLM predicts at image positions (mean entropy of the
next-token distribution there, and its most likely tokens): CE never trains those positions,
so this is what L_vis asks a student to copy from its teacher.

    python benchmarks/kd_probe.py [--home DIR] [--run RUN_ID] [--scenes 600]
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# per pipeline: stage -> its row in the run's evaluate table (None: not evaluated there)
MODELS = {
    "kd_term_ablation": {"teacher_sft": None, "baseline_sft": "baseline", "dft_paper": "kd_paper",
                         "dft_no_vis": "kd_no_vis", "dft_no_rel": "kd_no_rel",
                         "dft_res_only": "kd_res_only"},
    "llava_kd": {"teacher_sft": "teacher", "baseline_sft": "baseline_pt_sft",
                 "student_sft": "kd_dpt_sft", "student_dft": "kd_dpt_sft_dft"},
}
GRID, PATCHES = 2, 4  # objects' grid cells; patches per image side


def find_run(home: Path, run_id: str | None, pipeline: str) -> dict:
    records = [json.loads(p.read_text()) for p in (home / "runs").glob("*/run.json")]
    records = [r for r in records if r["pipeline"] == pipeline and r["status"] == "success"
               and (run_id is None or r["run_id"] == run_id)]
    if not records:
        raise SystemExit(f"no successful {pipeline!r} run in {home}/runs"
                         + (f" with id {run_id}" if run_id else "")
                         + f"; run `mmkd run pipelines/{pipeline}.yaml` first")
    return max(records, key=lambda r: r["started"])


def scenes(n: int, seed: int) -> tuple[list, list]:
    from PIL import Image

    from workloads.data.shapes import ShapesConfig, make_scene, render_scene

    cfg, rng = ShapesConfig(), random.Random(seed)
    drawn = [make_scene(rng, cfg) for _ in range(n)]
    images = [Image.open(io.BytesIO(render_scene(s, cfg.image_size))).convert("RGB")
              for s in drawn]
    return drawn, images


def cell_patches(cell: int) -> list[int]:
    """Row-major patch indices of a grid cell (each cell is 2x2 patches)."""
    row, col = divmod(cell, GRID)
    step = PATCHES // GRID
    return [(step * row + dr) * PATCHES + step * col + dc
            for dr in range(step) for dc in range(step)]


@torch.no_grad()
def layer_features(model, processor, images, batch: int = 50) -> dict[str, torch.Tensor]:
    """{layer: (n_images, patches, dim)} at the image positions."""
    tok = processor.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": processor.image_token + "\nDescribe the image."}],
        tokenize=False, add_generation_prompt=True)
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        enc = processor(images=chunk, text=[text] * len(chunk), return_tensors="pt",
                        padding=True)
        vision = model.model.vision_tower(enc["pixel_values"]).last_hidden_state
        layers = {"vision": vision, "projector": model.model.multi_modal_projector(vision)}
        o = model(**enc, output_hidden_states=True)
        mask = enc["input_ids"] == model.config.image_token_id
        n = len(chunk)
        for li, h in enumerate(o.hidden_states):
            layers[f"llm_{li}"] = h[mask].view(n, PATCHES * PATCHES, -1)
        layers["logits"] = o.logits[mask].view(n, PATCHES * PATCHES, -1)
        for k, v in layers.items():
            out.setdefault(k, []).append(v.float())
    return {k: torch.cat(v) for k, v in out.items()}


def probe(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xa, xb, ya, yb = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    return float(clf.fit(xa, ya).score(xb, yb))


def image_position_outputs(logits: torch.Tensor, tokenizer, top: int = 5) -> dict:
    p = logits.reshape(-1, logits.shape[-1]).softmax(-1)
    logp = p.clamp_min(1e-12).log()
    entropy = -(p * logp).sum(-1).mean()
    mean = p.mean(0)
    # how far each position's distribution is from the one shared by all images and positions:
    # the part of the target that depends on what the image shows (or where the token is)
    kl_to_mean = (p * (logp - mean.clamp_min(1e-12).log())).sum(-1).mean()
    best = mean.topk(top)
    return {"entropy": round(float(entropy), 3),
            "uniform_entropy": round(float(np.log(p.shape[-1])), 3),
            "kl_to_mean": round(float(kl_to_mean), 3),
            "top_tokens": [[tokenizer.convert_ids_to_tokens(int(i)), round(float(v), 3)]
                           for v, i in zip(best.values, best.indices)]}


def main() -> None:
    from orchestrator.provenance import environment
    from workloads.data.shapes import COLORS, SHAPES
    from workloads.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", default=str(ROOT / ".mmkd"), help="MMKD_HOME of the run")
    ap.add_argument("--run", default=None, help="run id (default: the latest successful one)")
    ap.add_argument("--pipeline", default="kd_term_ablation", choices=sorted(MODELS))
    ap.add_argument("--scenes", type=int, default=600)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/kd_probe.json"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    run = find_run(Path(args.home), args.run, args.pipeline)
    evaluate = Path(run["stages"]["evaluate"]["uri"].removeprefix("file://"))
    table = json.loads((evaluate / "results" / "results.json").read_text())["results"]
    drawn, images = scenes(args.scenes, args.seed)
    cells = [(i, o["row"] * GRID + o["col"], o) for i, s in enumerate(drawn) for o in s]
    colour = np.array([list(COLORS).index(o["color"]) for _, _, o in cells])
    shape = np.array([SHAPES.index(o["shape"]) for _, _, o in cells])
    models = {}
    for stage, row_name in MODELS[args.pipeline].items():
        if stage not in run["stages"]:
            continue
        path = Path(run["stages"][stage]["uri"].removeprefix("file://")) / "model"
        model, processor = load_model(str(path))
        model.eval()
        feats = layer_features(model, processor, images)
        layers = {}
        for name, f in feats.items():
            x = np.stack([f[i, cell_patches(c)].mean(0).numpy() for i, c, _ in cells])
            layers[name] = {"color": round(probe(x, colour, args.seed), 3),
                            "shape": round(probe(x, shape, args.seed), 3)}
        row = table.get(row_name, {}) if row_name else {}
        models[stage] = {
            "probes": layers,
            "image_positions": image_position_outputs(feats["logits"], processor.tokenizer),
            "answers": {k: row.get(f"accuracy/{k}") for k in ("color", "shape")} if row else None,
        }
        print(stage, json.dumps(models[stage]["probes"]), flush=True)
    report = {
        "what": "linear probes (colour, shape) per layer at each object's image patches, and the "
                "LLM's next-token distribution at image positions, for the models of one "
                f"{args.pipeline} run",
        "run": run["run_id"], "overrides": run.get("overrides"), "scenes": args.scenes,
        "objects": len(cells), "chance": {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES)},
        "models": models, "environment": environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
