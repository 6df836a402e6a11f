"""Peak extra memory and time (forward + backward) of the chunked KD losses vs naive ones.

    python benchmarks/kd_loss_memory.py            # B=2, T=1024, V=32k, fp32, CPU; ~1-2 min

Method: every variant runs in a fresh subprocess (so allocator caches and earlier peaks of
other variants cannot leak in). The child allocates the inputs, runs a tiny warm-up of the
same variant, resets the kernel's RSS high-water mark (``echo 5 > /proc/self/clear_refs``;
on kernels without it, ``ru_maxrss`` is used and the number is an upper bound), then runs one
forward + backward and reads ``VmHWM``. ``peak_extra = VmHWM - RSS_before - grad_bytes``: the
memory used beyond the input logits (already resident before) and the student-logit gradient
(B*T*V*4 bytes, which any implementation must produce). Time: wall and process-CPU seconds,
median of 3 more runs (the first run's, for variants slower than 8 s), one intra-op thread —
on a shared machine CPU seconds are the comparable number. Children run with ``MALLOC_MMAP_THRESHOLD_=65536`` so
that glibc returns freed tensors to the kernel at once: RSS then follows live tensors instead of
allocator caching, which otherwise made the same variant vary by ~80 MB between runs.
Results go to ``benchmarks/results/kd_loss_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from workloads import losses  # noqa: E402
from workloads.kernels import chunked  # noqa: E402

B, T, V = 2, 1024, 32_000
PROMPT = 128  # per sample: the first PROMPT positions are prompt (masked out) in L_res
N_P = 576  # visual tokens per image for L_rel (LLaVA-1.5 / CLIP-336)
CHUNK = losses.DEFAULT_CHUNK_SIZE
# A fixed mmap threshold turns off glibc's dynamic one, under which freed blocks up to 32 MB
# stay in the heap (and in RSS) depending on allocation order and thread arenas; with it, every
# tensor >= 64 KB is its own mapping, returned on free, and RSS tracks the live tensors.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


# ---------------------------------------------------------------------------- variants


def div_naive_kldiv(s, t, mask):
    """What LLaVA-KD's code does: select rows, KLDivLoss(batchmean) on log_softmax/softmax."""
    return F.kl_div(F.log_softmax(s[mask], -1), F.softmax(t[mask], -1), reduction="batchmean")


def div_reference(s, t, mask):
    return losses.kd_divergence(s, t, mask, chunk_size=None)


def div_chunked_autograd(s, t, mask):
    """Forward chunked, plain autograd: every chunk's softmaxes stay saved for backward."""
    s_flat, t_flat = s.reshape(-1, V), t.reshape(-1, V)
    idx = mask.reshape(-1).nonzero().squeeze(1)
    total = sum(
        chunked._divergence_rows(s_flat[idx[i : i + CHUNK]], t_flat[idx[i : i + CHUNK]], "fkl").sum()
        for i in range(0, idx.numel(), CHUNK)
    )
    return total / idx.numel()


def div_checkpoint(s, t, mask):
    """Forward chunked under torch.utils.checkpoint: recomputed per chunk in backward."""
    s_flat, t_flat = s.reshape(-1, V), t.reshape(-1, V)
    idx = mask.reshape(-1).nonzero().squeeze(1)

    def chunk_loss(s_flat, rows):
        return chunked._divergence_rows(s_flat[rows], t_flat[rows], "fkl").sum()

    total = sum(
        checkpoint(chunk_loss, s_flat, idx[i : i + CHUNK], use_reentrant=False)
        for i in range(0, idx.numel(), CHUNK)
    )
    return total / idx.numel()


def div_chunked_fused(s, t, mask):
    return losses.kd_divergence(s, t, mask, chunk_size=CHUNK)


def rel_naive(s, t, mask):
    """Gather each image's (N_p, V) logits, Gram with one matmul."""
    out = []
    for b in range(s.shape[0]):
        zs, zt = s[b][mask[b]], t[b][mask[b]]
        gs, gt = zs @ zs.T, zt @ zt.T
        out.append(1 - F.cosine_similarity(gs.flatten(), gt.flatten(), dim=0))
    return torch.stack(out).mean()


def rel_chunked(s, t, mask):
    return losses.relation_kd_loss(s, t, mask)


VARIANTS = {
    "div_naive_kldiv": (div_naive_kldiv, "response"),
    "div_reference": (div_reference, "response"),
    "div_chunked_autograd": (div_chunked_autograd, "response"),
    "div_checkpoint": (div_checkpoint, "response"),
    "div_chunked_fused": (div_chunked_fused, "response"),
    "rel_naive": (rel_naive, "image"),
    "rel_chunked": (rel_chunked, "image"),
}


# ---------------------------------------------------------------------- child process


def _rss_mb() -> tuple[float, float]:
    status = dict(re.findall(r"(Vm\w+):\s+(\d+) kB", Path("/proc/self/status").read_text()))
    return int(status["VmRSS"]) / 1024, int(status["VmHWM"]) / 1024


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _inputs(t_len: int, which: str):
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(B, t_len, V, generator=g)).requires_grad_()
    t = 3 * torch.randn(B, t_len, V, generator=g)
    mask = torch.zeros(B, t_len, dtype=torch.bool)
    if which == "response":
        mask[:, min(PROMPT, t_len // 8) :] = True
    else:  # one image of N_P tokens per sample, after a 32-token system prompt
        n = min(N_P, t_len - 64)
        mask[:, 32 : 32 + n] = True
    return s, t, mask


def _fwd_bwd(fn, s, t, mask) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward + backward."""
    s.grad = None
    wall, cpu = time.perf_counter(), time.process_time()
    fn(s, t, mask).backward()
    return time.perf_counter() - wall, time.process_time() - cpu


def child(name: str) -> dict:
    # One thread: on a shared machine CPU time of one thread is the reproducible number.
    torch.set_num_threads(1)
    assert os.environ.get("MALLOC_MMAP_THRESHOLD_"), "run through main(), which sets the env"
    fn, which = VARIANTS[name]
    _fwd_bwd(fn, *_inputs(64 if which == "response" else 80, which))  # warm-up, tiny
    s, t, mask = _inputs(T, which)
    rss_before, _ = _rss_mb()
    exact = _reset_peak()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    first = _fwd_bwd(fn, s, t, mask)
    _, hwm = _rss_mb()
    peak = hwm if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    grad_mb = s.numel() * s.element_size() / 2**20
    # Slow variants (> 8 s) are timed once, to keep the whole run near two minutes.
    runs = [_fwd_bwd(fn, s, t, mask) for _ in range(3)] if first[0] < 8 else [first]
    return {
        "variant": name,
        "positions": int(mask.sum()),
        "rss_before_mb": round(rss_before, 1),
        "peak_rss_mb": round(peak, 1),
        "grad_mb": round(grad_mb, 1),
        "peak_extra_mb": round(peak - rss_before - grad_mb, 1),
        "time_s": round(statistics.median(r[0] for r in runs), 3),
        "cpu_s": round(statistics.median(r[1] for r in runs), 3),
        "peak_method": (
            "VmHWM after clear_refs" if exact else f"ru_maxrss (before: {maxrss_before:.0f} MB)"
        ),
    }


# --------------------------------------------------------------------------------- parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=sorted(VARIANTS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/kd_loss_memory.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return

    rows = {}
    for name in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--child", name], env=CHILD_ENV,
                              capture_output=True, text=True, check=True)
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  ran {name}", file=sys.stderr)

    def ratio(a, b):
        return round(rows[a]["peak_extra_mb"] / rows[b]["peak_extra_mb"], 3)

    ratios = {
        "div_chunked_fused / div_naive_kldiv": ratio("div_chunked_fused", "div_naive_kldiv"),
        "div_chunked_fused / div_reference": ratio("div_chunked_fused", "div_reference"),
        "div_checkpoint / div_naive_kldiv": ratio("div_checkpoint", "div_naive_kldiv"),
        "div_chunked_autograd / div_naive_kldiv": ratio("div_chunked_autograd", "div_naive_kldiv"),
        "rel_chunked / rel_naive": ratio("rel_chunked", "rel_naive"),
    }
    result = {
        "setup": {"B": B, "T": T, "V": V, "dtype": "float32", "device": "cpu", "kind": "fkl",
                  "chunk_size": CHUNK, "vocab_chunk": losses.DEFAULT_VOCAB_CHUNK,
                  "response_positions_per_sample": T - PROMPT, "image_tokens_per_sample": N_P,
                  "input_logits_mb_each": round(B * T * V * 4 / 2**20, 1)},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_count": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(),
                    # Shared machine: times are only comparable within one run.
                    "loadavg_1m_at_end": round(os.getloadavg()[0], 2)},
        "method": __doc__.split("Method:")[1].split("Results go")[0].split(),
        "variants": rows,
        "peak_extra_ratios": ratios,
    }
    result["method"] = " ".join(result["method"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    print(f"B={B} T={T} V={V} fp32 CPU; peak extra = peak RSS - RSS before - student grad "
          f"({rows['div_naive_kldiv']['grad_mb']:.0f} MB); fresh process per variant")
    print(f"{'variant':<22}{'positions':>10}{'peak extra MB':>15}{'wall s':>8}{'cpu s':>8}")
    for r in rows.values():
        print(f"{r['variant']:<22}{r['positions']:>10}{r['peak_extra_mb']:>15.1f}"
              f"{r['time_s']:>8.2f}{r['cpu_s']:>8.2f}")
    for k, v in ratios.items():
        print(f"  {k}: {v:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
