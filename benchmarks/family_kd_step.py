"""Per model family: the LLaVA-KD step against its floor, and preprocessing samples/s.

    python benchmarks/family_kd_step.py [--families qwen2_vl,gemma3] [--repeats 5] [--steps 10]
                                        [--warmup 2] [--batch-size 8] [--pre-rows 64]
                                        [--threads 1] [--out results/family_kd_step.json]

For every family in ``workloads.families.FAMILIES`` (or those of ``--families``), in one process
(no Ray, no DeepSpeed), the random-init ``tiny-teacher`` and ``tiny-student`` of the family
(``workloads.models.build_model``, one BPE tokenizer trained here on the generated texts) and one
fixed batch of ``--batch-size`` shapes samples (an image of 32-64 px, a question-answer
conversation of 1-3 turns) encoded by the real data path (``Preprocessor`` on reader rows, then
``collate`` with the family), time:

* ``student_step``: student forward + backward + AdamW step, cross-entropy only
  (``CausalLMLoss``);
* ``teacher_forward``: the teacher forward under ``no_grad`` (the teacher ``DistillLoss.setup``
  loaded, on the inputs ``DistillLoss`` gives it);
* ``kd_step``: ``DistillLoss`` (online teacher; alpha=beta=1, gamma=0.5, forward KL, the default
  pipeline's DFT settings) forward + backward + AdamW step: the student's CE, the teacher
  forward, L_res, L_vis and L_rel;
* ``kd_terms``: those three KD losses alone, computed as ``DistillLoss`` computes them on fixed
  student and teacher logits of the batch, forward + backward to the logits: most of what a KD
  step adds over its floor;
* ``preprocess``: ``Preprocessor.__call__`` on ``--pre-rows`` reader rows (PNG decode, the
  family's chat template and image-token expansion, its image processor, packing), samples/s.

``kd_step / (student_step + teacher_forward)`` is the KD step over its floor: a KD step cannot be
cheaper than a student step plus a teacher forward, so the excess is the KD terms (the teacher's
logits aligned to the vocabulary, the three losses and their backward). Both students start
from the same weights and train every part (the default pipeline's DFT trains
vision + projector + llm).

Each repetition runs the four measurements once each in a rotated order (``--steps`` steps
each, after ``--warmup`` untimed steps per family), so load drift on this shared machine hits
them alike; per repetition the mean per step (wall ``perf_counter`` and this process's CPU
``process_time``) is kept, and the median and min-max over repetitions are reported, with the
ratio both of the medians and per repetition (paired: measured back to back). CPU time counts
only this process's work, so it moves less with other people's load. Torch threads default to
1 (the default pipeline's ``cpus_per_worker: 1``). Writes benchmarks/results/family_kd_step.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _env import environment  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "family_kd_step.json"
STEPS = ("student_step", "teacher_forward", "kd_step")
SIDES = (32, 40, 48, 56, 64)  # image side in pixels, per sample


def shapes_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` reader rows (see workloads/data/readers.py) of shapes scenes: a square image of a
    side from ``SIDES`` and an instruct-style conversation of 1-3 question-answer turns, the
    first with ``<image>``."""
    from workloads.data.shapes import (QUESTION_TYPES, ShapesConfig, ask, caption, make_scene,
                                       render_scene)

    rows = []
    for i in range(n):
        rng = random.Random(f"family-kd-step-{seed}-{i}")
        side = SIDES[i % len(SIDES)]
        cfg = ShapesConfig(num_captions=0, num_instruct=0, num_eval=0, image_size=side)
        objects = make_scene(rng, cfg)
        turns = []
        for t in range(rng.randint(1, 3)):
            qtype = QUESTION_TYPES[(i + t) % len(QUESTION_TYPES)]
            qa = ask(rng, objects, qtype) or ask(rng, objects, "count")
            turns.append(qa if rng.random() > 0.15 else ("Describe the image.", caption(objects)))
        turns[0] = ("<image>\n" + turns[0][0], turns[0][1])
        conv = [m for q, a in turns for m in ({"from": "human", "value": q},
                                                {"from": "gpt", "value": a})]
        rows.append({"key": f"s{i:05d}", "source": "bench.tar",
                     "image": render_scene(objects, side), "conversations": json.dumps(conv),
                     "bad": "", "extra": "{}"})
    return rows


def train_bench_tokenizer(rows: list[dict], out_dir: str) -> str:
    from workloads.data.tokenizer import train_tokenizer

    texts = [m["value"] for r in rows for m in json.loads(r["conversations"])]
    return str(train_tokenizer(texts, out_dir, vocab_size=512))


def _stats(values: list[float], digits: int = 3) -> dict:
    return {"median": round(statistics.median(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits),
            "runs": [round(v, digits) for v in values]}


def bench_family(name: str, tok_dir: str, rows: list[dict], args: argparse.Namespace,
                 tmp: str) -> dict:
    import torch

    from orchestrator.plugin import StageContext
    from workloads.data.collate import collate
    from workloads.data.preprocess import Preprocessor, rows_to_columns
    from workloads.distill_loss import DistillLoss
    from workloads.losses import align_vocab, relation_kd_loss, response_kd_loss, visual_kd_loss
    from workloads.models import build_model, save_model
    from workloads.train_loop_parts import CausalLMLoss, StepContext, model_inputs

    root = Path(tmp) / name
    torch.manual_seed(0)
    teacher, t_proc = build_model({"preset": "tiny-teacher", "family": name}, tok_dir)
    teacher_dir = save_model(teacher, t_proc, str(root / "teacher"))
    teacher_params = sum(p.numel() for p in teacher.parameters())
    teacher_hidden = int(teacher.config.get_text_config().hidden_size)
    del teacher
    torch.manual_seed(1)
    student, s_proc = build_model({"preset": "tiny-student", "family": name}, tok_dir)
    student_dir = save_model(student, s_proc, str(root / "student"))
    student.train().requires_grad_(True)

    # the data path of the student's processor (what the DFT stage's rows go through)
    t0 = time.perf_counter()
    pre = Preprocessor(student_dir, max_length=args.max_length, quality=None)
    pre_load_s = time.perf_counter() - t0
    pre_columns = rows_to_columns(rows[:args.pre_rows])
    batch_rows = pre(rows_to_columns(rows[:args.batch_size]))
    if len(batch_rows["input_ids"]) != args.batch_size:
        raise RuntimeError(f"{name}: the preprocessor dropped rows of the batch")
    pad_id = pre.spec.tokenizer.pad_token_id
    batch = collate(batch_rows, pad_id, family=name)
    image_id = pre.spec.image_token_id

    stage = StageContext(pipeline="bench", stage="family_kd_step", key="k", output_dir=str(root))

    def sctx() -> StepContext:
        return StepContext(step=0, total_steps=10**9, rank=0, world_size=1,
                           device=torch.device("cpu"), dtype=torch.float32, stage=stage)

    def runner(loss_fn):
        model = copy.deepcopy(student)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        ctx = sctx()
        loss_fn.setup(model, ctx)

        def step() -> None:
            loss, _ = loss_fn(model, batch, ctx)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, ctx

    kd = DistillLoss(vocab_size=len(pre.spec.tokenizer), image_token_id=image_id,
                     teacher_dir=teacher_dir, alpha=1.0, beta=1.0, gamma=0.5)
    student_step, _ = runner(CausalLMLoss())
    kd_step, kd_ctx = runner(kd)
    teacher = kd_ctx.state["teacher"].model
    inputs = model_inputs(batch)

    def teacher_forward() -> None:
        with torch.no_grad():
            teacher(**inputs).logits  # noqa: B018  (what DistillLoss computes)

    with torch.no_grad():  # the KD terms once, to record that they are on (not zero)
        _, kd_metrics = kd(copy.deepcopy(student), batch, kd_ctx)
        s_logits = student(**inputs).logits.detach()
        t_logits = teacher(**inputs).logits
    mask = batch["input_ids"] == kd_ctx.state["image_token_id"]

    def kd_terms() -> None:
        """The three KD losses as DistillLoss computes them, on fixed logits (forward +
        backward to the logits): the part of the KD step that is not CE, model or teacher."""
        leaf = s_logits.clone().requires_grad_(True)
        s, t = align_vocab(leaf, t_logits, kd.vocab_size)
        kw = dict(kind=kd.divergence, temperature=kd.temperature, chunk_size=kd.chunk_size)
        total = (kd.alpha * response_kd_loss(s, t, batch["labels"], **kw)
                 + kd.beta * visual_kd_loss(s, t, mask, **kw)
                 + kd.gamma * relation_kd_loss(s, t, mask))
        total.backward()

    fns = {"student_step": student_step, "teacher_forward": teacher_forward, "kd_step": kd_step,
           "kd_terms": kd_terms}
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    pre(pre_columns)  # warm the image processor / template paths

    wall: dict[str, list[float]] = {k: [] for k in (*fns, "preprocess")}
    cpu: dict[str, list[float]] = {k: [] for k in (*fns, "preprocess")}
    loads = []
    names = list(wall)
    for rep in range(args.repeats):
        loads.append(os.getloadavg()[0])
        for m in names[rep % len(names):] + names[:rep % len(names)]:
            w0, c0 = time.perf_counter(), time.process_time()
            if m == "preprocess":
                out = pre(pre_columns)
                assert len(out["input_ids"]) == args.pre_rows, f"{name}: rows dropped"
                n = args.pre_rows
            else:
                for _ in range(args.steps):
                    fns[m]()
                n = args.steps
            wall[m].append((time.perf_counter() - w0) / n)
            cpu[m].append((time.process_time() - c0) / n)

    def ratios(t: dict[str, list[float]]) -> dict:
        paired = [k / (s + f) for k, s, f in zip(t["kd_step"], t["student_step"],
                                                 t["teacher_forward"])]
        med = {m: statistics.median(t[m]) for m in STEPS}
        return {"of_medians": round(med["kd_step"] / (med["student_step"]
                                                      + med["teacher_forward"]), 3),
                "per_repeat": _stats(paired)}

    return {
        "params": {"teacher": teacher_params,
                   "student": sum(p.numel() for p in student.parameters())},
        "text_hidden_size": {"teacher": teacher_hidden,
                             "student": int(student.config.get_text_config().hidden_size)},
        "batch": {"rows": int(batch["input_ids"].shape[0]),
                  "seq_len": int(batch["input_ids"].shape[1]),
                  "tokens": int(batch["attention_mask"].sum()),
                  "image_tokens": int(mask.sum()),
                  "reply_tokens": int((batch["labels"] != -100).sum()),
                  "pixel_values": list(batch["pixel_values"].shape),
                  "vocab_size": len(pre.spec.tokenizer),
                  "logits_vocab": int(teacher.config.get_text_config().vocab_size)},
        "kd_terms_at_init": {k: round(kd_metrics[k], 4) for k in ("ce", "l_res", "l_vis", "l_rel")},
        "load_1m_per_repeat": [round(x, 2) for x in loads],
        "ms": {m: _stats([1e3 * x for x in wall[m]], 2) for m in fns},
        "cpu_ms": {m: _stats([1e3 * x for x in cpu[m]], 2) for m in fns},
        "kd_over_floor": ratios(wall), "kd_over_floor_cpu": ratios(cpu),
        "kd_minus_floor_ms": round(1e3 * (statistics.median(wall["kd_step"])
                                          - statistics.median(wall["student_step"])
                                          - statistics.median(wall["teacher_forward"])), 2),
        "preprocess_samples_per_s": _stats([1 / x for x in wall["preprocess"]], 1),
        "preprocess_samples_per_cpu_s": _stats([1 / x for x in cpu["preprocess"]], 1),
        "preprocessor_load_s": round(pre_load_s, 3),
    }


def main() -> None:
    from workloads.families import FAMILIES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(sorted(FAMILIES)),
                    help="comma-separated family names (default: all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per measurement and repeat")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per measurement")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pre-rows", type=int, default=64, help="rows per preprocessing repeat")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", type=Path, default=RESULTS,
                    help="results file (a --families subset writes only those families)")
    args = ap.parse_args()
    names = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        ap.error(f"unknown families {unknown}; known: {sorted(FAMILIES)}")

    import torch

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    env = environment()
    start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="mmkd-family-kd-") as tmp:
        rows = shapes_rows(max(args.pre_rows, args.batch_size))
        tok_dir = train_bench_tokenizer(shapes_rows(256, seed=1), str(Path(tmp) / "tokenizer"))
        for name in names:
            t0 = time.perf_counter()
            results[name] = bench_family(name, tok_dir, rows, args, tmp)
            r = results[name]
            print(f"{name:16s} student {r['ms']['student_step']['median']:7.1f} ms  teacher "
                  f"{r['ms']['teacher_forward']['median']:7.1f} ms  kd "
                  f"{r['ms']['kd_step']['median']:7.1f} ms  kd/floor "
                  f"{r['kd_over_floor']['of_medians']:.2f} (cpu "
                  f"{r['kd_over_floor_cpu']['of_medians']:.2f})  preprocess "
                  f"{r['preprocess_samples_per_s']['median']:.0f}/s  "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    report = {
        "what": "per family, tiny-teacher -> tiny-student, one process, one fixed batch: ms per "
                "student step (CE), teacher forward, KD step (DistillLoss online); KD / (student "
                "+ teacher) is the KD step over its floor; Preprocessor samples/s on reader rows",
        "args": {**vars(args), "out": None}, "torch_threads": torch.get_num_threads(),
        "images_px": list(SIDES), "wall_s": round(time.perf_counter() - start, 1),
        "environment": env, "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "families": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
