"""The KD loss and the KD step on a GPU (or the CPU, small), in one process: no Ray, DeepSpeed,
MLflow — only torch, transformers, pydantic (for the divergence registry) and, when installed,
Triton and Liger-Kernel (an optional peer).

    python benchmarks/kd_step_gpu.py --device cuda           # the defaults below: one H200-class GPU
    python benchmarks/kd_step_gpu.py --device cpu --small    # a few-minute CPU run

Two tables, side by side in one run, each variant timed ``--reps`` times after ``--warmup``
runs, interleaved (variant order rotates every repetition, so drift hits all alike); median,
min and max reported. On CUDA time comes from ``torch.cuda.Event`` pairs and memory from
``torch.cuda.max_memory_allocated`` (reset before each measured call); on CPU wall time and
no memory.

1. **Divergence alone**: ``N`` rows x ``V`` (bf16 on CUDA, fp32 on CPU) student and teacher
   logits, forward + backward of the mean divergence over all rows: mmkd's fused kernel
   (Triton on CUDA), the chunked kernel (chunk 128, the old default), the unchunked
   autograd reference, that reference under ``torch.compile``, and Liger-Kernel's ``LigerJSD``
   (for ``jsd``; it takes log-probabilities, so its two log-softmaxes are counted).
   ``extra_gib``: peak allocated during the call minus what was allocated before it (the
   inputs), i.e. temporaries plus the student's gradient.
2. **KD step**: Qwen2-shaped student and teacher built from configs (random init, bf16,
   fused AdamW), batch ``B x T`` with ``image_tokens`` image positions and a reply of ``reply``
   tokens per row. ``student_step``: CE forward + backward + step; ``teacher_fwd``: the
   teacher's forward under no_grad; ``floor`` = their sum. KD steps (teacher forward + student
   forward + CE + KD terms + backward + step) for the term sets L_res, L_res+L_vis, all three,
   with the fused and the chunked kernel. Reported: ms, ratio to the floor, peak GiB.

Writes ``benchmarks/results/kd_step_gpu.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workloads import losses  # noqa: E402

GiB = 1024**3


# ------------------------------------------------------------------------------- timing


class Timer:
    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def run(self, fn) -> tuple[float, float | None]:
        """(ms, peak extra GiB) of one call of ``fn``."""
        if self.cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b), (torch.cuda.max_memory_allocated() - base) / GiB
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3, None


def measure(variants: dict, timer: Timer, reps: int, warmup: int) -> dict:
    """Interleaved repetitions of every variant; median/min/max ms and the max peak."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            timer.run(variants[name])
    ms = {n: [] for n in names}
    mem = {n: [] for n in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t, m = timer.run(variants[name])
            ms[name].append(t)
            if m is not None:
                mem[name].append(m)
    return {n: {"ms": statistics.median(ms[n]), "ms_min": min(ms[n]), "ms_max": max(ms[n]),
                "reps": reps, "peak_extra_gib": max(mem[n]) if mem[n] else None} for n in names}


# ------------------------------------------------------------------------- 1. divergence


def divergence_table(args, timer: Timer) -> dict:
    dev, dtype = args.device, (torch.bfloat16 if args.device == "cuda" else torch.float32)
    g = torch.Generator(device="cpu").manual_seed(0)
    s0 = (torch.randn(args.rows, args.vocab, generator=g) * 2).to(dev, dtype)
    t0 = (torch.randn(args.rows, args.vocab, generator=g) * 2).to(dev, dtype)
    out: dict = {}
    for kind in args.kinds:
        def call(f):
            def run():
                s = s0.detach().requires_grad_()
                f(s, t0).backward()
            return run

        ref = lambda s, t, k=kind: losses.kd_divergence_reference(s, t, None, k)  # noqa: E731
        variants = {
            "fused": call(lambda s, t, k=kind: losses.kd_divergence(s, t, None, k,
                                                                    kernel="fused")),
            "chunked_128": call(lambda s, t, k=kind: losses.kd_divergence(
                s, t, None, k, chunk_size=128, kernel="chunked")),
            "reference": call(ref),
        }
        if args.compile:
            variants["reference_compiled"] = call(torch.compile(ref, dynamic=False))
        if kind == "jsd" and dev == "cuda":
            try:
                from liger_kernel.transformers import LigerJSD

                jsd = LigerJSD(beta=0.5)
                variants["liger_jsd"] = call(lambda s, t: jsd(
                    torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1)))
            except ImportError as e:
                out["liger_missing"] = str(e)
        # values agree before anything is timed
        with torch.no_grad():
            vals = {"fused": float(losses.kd_divergence(s0, t0, None, kind, kernel="fused")),
                    "reference": float(ref(s0, t0))}
        res = measure(variants, timer, args.reps, args.warmup)
        out[kind] = {"values": vals, "variants": res}
        print(f"[divergence {kind}] " + ", ".join(
            f"{n} {r['ms']:.1f} ms" + (f" {r['peak_extra_gib']:.2f} GiB"
                                        if r["peak_extra_gib"] is not None else "")
            for n, r in res.items()), flush=True)
    del s0, t0
    return out


# ------------------------------------------------------------------------------ 2. KD step


def qwen2(size: str, vocab: int, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shapes = {  # hidden, layers, heads, kv heads, intermediate
        "0.5b": (896, 24, 14, 2, 4864), "1.5b": (1536, 28, 12, 2, 8960),
        "tiny_s": (64, 2, 4, 2, 128), "tiny_t": (128, 2, 4, 2, 256),
    }[size]
    h, n, a, kv, inter = shapes
    cfg = Qwen2Config(hidden_size=h, num_hidden_layers=n, num_attention_heads=a,
                      num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                      max_position_embeddings=4096, tie_word_embeddings=size == "0.5b")
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    return model


def step_table(args, timer: Timer) -> dict:
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    student = qwen2(args.student, args.vocab, dev, dtype).train()
    teacher = qwen2(args.teacher, args.vocab, dev, dtype).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=dev == "cuda")
    B, T = args.batch, args.seq
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (B, T), generator=g).to(dev)
    labels = ids.clone()
    labels[:, : T - args.reply] = -100
    image_mask = torch.zeros(B, T, dtype=torch.bool, device=dev)
    image_mask[:, 16 : 16 + args.image_tokens] = True

    def student_step():
        loss = student(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def teacher_fwd():
        with torch.no_grad():
            teacher(input_ids=ids)

    def kd_step(terms: tuple[str, ...], kernel: str):
        def run():
            with torch.no_grad():
                t = teacher(input_ids=ids).logits
            out = student(input_ids=ids, labels=labels)
            total = out.loss
            s = out.logits
            if "res" in terms:
                total = total + losses.response_kd_loss(s, t, labels, kind=args.step_kind,
                                                        kernel=kernel)
            if "vis" in terms:
                total = total + losses.visual_kd_loss(s, t, image_mask, kind=args.step_kind,
                                                      kernel=kernel)
            if "rel" in terms:
                total = total + 0.5 * losses.relation_kd_loss(s, t, image_mask)
            total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    variants = {"student_step": student_step, "teacher_fwd": teacher_fwd}
    for kernel in ("fused", "chunked"):
        for terms in (("res",), ("res", "vis"), ("res", "vis", "rel")):
            variants[f"kd_{'+'.join(terms)}_{kernel}"] = kd_step(terms, kernel)
    res = measure(variants, timer, args.reps, args.warmup)
    floor = res["student_step"]["ms"] + res["teacher_fwd"]["ms"]
    for name, r in res.items():
        r["x_floor"] = r["ms"] / floor if name.startswith("kd_") else None
    print("[kd step] floor %.1f ms; " % floor + ", ".join(
        f"{n} {r['ms']:.1f} ms" + (f" ({r['x_floor']:.2f}x)" if r["x_floor"] else "")
        + (f" {r['peak_extra_gib']:.1f} GiB" if r["peak_extra_gib"] is not None else "")
        for n, r in res.items()), flush=True)
    return {"floor_ms": floor, "variants": res,
            "student_params": sum(p.numel() for p in student.parameters()),
            "teacher_params": sum(p.numel() for p in teacher.parameters())}


def environment(device: str) -> dict:
    """mmkd's provenance record (machine, load, library versions, commit) plus what this
    benchmark depends on beyond it (Triton, Liger-Kernel, the GPU's name)."""
    try:
        from orchestrator.provenance import environment as provenance

        env = provenance()
    except Exception:  # noqa: BLE001 - a GPU box without mmkd's dependencies: the basics
        env = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
               "python": platform.python_version(), "load_average": list(os.getloadavg()),
               "libraries": {"torch": torch.__version__}}
    env["load_1m"] = os.getloadavg()[0]
    for mod in ("transformers", "triton", "liger_kernel"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - not installed
            env[mod] = None
    env["torch"] = torch.__version__
    env["cpus"] = os.cpu_count()
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--small", action="store_true", help="CPU sizes (a few minutes)")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--kinds", nargs="+", default=["jsd", "fkl"])
    ap.add_argument("--student", default="0.5b")
    ap.add_argument("--teacher", default="1.5b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--image-tokens", type=int, default=256)
    ap.add_argument("--reply", type=int, default=512)
    ap.add_argument("--step-kind", default="fkl")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kd_step_gpu.json"))
    args = ap.parse_args()
    if args.small:
        args.rows, args.vocab, args.student, args.teacher = 512, 32_000, "tiny_s", "tiny_t"
        args.batch, args.seq, args.image_tokens, args.reply = 2, 256, 64, 128
        args.reps = min(args.reps, 5)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("kd_step_gpu: --device cuda but torch sees no GPU; use --device cpu --small")
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    timer = Timer(args.device)
    result = {"args": vars(args), "environment": environment(args.device)}
    result["divergence"] = divergence_table(args, timer)
    if not args.skip_step:
        result["kd_step"] = step_table(args, timer)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
