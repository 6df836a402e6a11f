"""The KD step of every model family (``family_kd_step.json``): the table row and the section."""

from __future__ import annotations

import re
import statistics

from render.base import Results, para, span


def fkd_results(R: Results) -> tuple[dict, dict]:
    d = R.load("family_kd_step")
    return d, d["families"]


def row_family_kd_step(R: Results) -> str:
    d, fams = fkd_results(R)
    cpu = {n: f["kd_over_floor_cpu"]["per_repeat"]["median"] for n, f in fams.items()}
    wall = [f["kd_over_floor"]["per_repeat"]["median"] for f in fams.values()]
    pre = [f["preprocess_samples_per_cpu_s"]["median"] for f in fams.values()]
    hi, lo = max(cpu, key=cpu.get), min(cpu, key=cpu.get)
    return (f"{len(fams)} families, {d['args']['repeats']} interleaved repetitions of "
            f"{d['args']['steps']} steps, 1 thread: **KD / floor {cpu[lo]:.2f} ({lo}) to "
            f"{cpu[hi]:.2f} ({hi})** in CPU time (median over families "
            f"{statistics.median(cpu.values()):.2f}), {span(wall, lambda x: f'{x:.2f}')} in wall "
            f"time (load {fkd_load(d)}); preprocessing {span(pre, lambda x: f'{x:.0f}')} "
            "samples per CPU second; per family: [below](#the-kd-step-per-family)")


def fkd_load(d: dict) -> str:
    loads = [x for f in d["families"].values() for x in f["load_1m_per_repeat"]]
    return span(loads, lambda x: f"{x:.1f}")


def family_kd_step(R: Results) -> str:
    """Per family: the KD step against its floor and preprocessing (family_kd_step.json)."""
    d, fams = fkd_results(R)
    a = d["args"]
    ms = lambda s: f"{s['median']:.1f}"  # noqa: E731

    def ratio(r: dict) -> str:
        p = r["per_repeat"]
        return f"{p['median']:.2f} ({p['min']:.2f}-{p['max']:.2f})"

    lines = ["| family | parameters, teacher / student | batch tokens (image) | student step | "
             "teacher forward | KD step | KD / floor, CPU | KD / floor, wall | KD terms alone | "
             "preprocessing samples per CPU s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, f in fams.items():
        c, b, p = f["cpu_ms"], f["batch"], f["params"]
        pre = f["preprocess_samples_per_cpu_s"]
        lines.append(
            f"| {name} | {p['teacher'] / 1e6:.2f}M / {p['student'] / 1e6:.2f}M | {b['tokens']} "
            f"({b['image_tokens']}) | {ms(c['student_step'])} | {ms(c['teacher_forward'])} | "
            f"{ms(c['kd_step'])} | {ratio(f['kd_over_floor_cpu'])} | "
            f"{ratio(f['kd_over_floor'])} | {ms(c['kd_terms'])} | {pre['median']:.0f} "
            f"({pre['min']:.0f}-{pre['max']:.0f}); wall "
            f"{f['preprocess_samples_per_s']['median']:.0f} |")
    cpu = {n: f["kd_over_floor_cpu"]["per_repeat"]["median"] for n, f in fams.items()}
    hi = max(cpu, key=cpu.get)
    f = fams[hi]
    excess = (f["cpu_ms"]["kd_step"]["median"] - f["cpu_ms"]["student_step"]["median"]
              - f["cpu_ms"]["teacher_forward"]["median"])
    wall_over_cpu = [g["ms"]["kd_step"]["median"] / g["cpu_ms"]["kd_step"]["median"]
                     for g in fams.values()]
    fewest = min(g["batch"]["image_tokens"] for g in fams.values())
    many = [n for n, g in fams.items() if g["batch"]["image_tokens"] > 2 * fewest]
    few = [n for n in fams if n not in many]
    terms = lambda ns: span([fams[n]["cpu_ms"]["kd_terms"]["median"] for n in ns],  # noqa: E731
                            lambda x: f"{x:.1f}", " ms")
    ratios = lambda ns: span([cpu[n] for n in ns], lambda x: f"{x:.2f}")  # noqa: E731
    tokens = lambda ns: span([fams[n]["batch"]["image_tokens"] for n in ns], str)  # noqa: E731
    vocab = span([g["batch"]["vocab_size"] for g in fams.values()], str)
    hidden = sorted({h for g in fams.values() for h in g["text_hidden_size"].values()})
    text = (
        f"Student step, teacher forward, KD step and KD terms in ms of process CPU per step, "
        f"median of {a['repeats']} interleaved repetitions of {a['steps']} steps (after "
        f"{a['warmup']} untimed) at 1 torch thread; KD / floor: the median (min-max) of the "
        "repetitions' ratios (a repetition measures the three back to back); preprocessing: "
        f"{a['pre_rows']} rows per repetition, median (min-max), and the median in wall time. "
        f"Load average {fkd_load(d)} on {d['environment']['machine']['cpu_count']} cores, so "
        f"the KD step's wall time ran {span(wall_over_cpu, lambda x: f'{x:.1f}')}x its CPU "
        "time: the CPU columns are the measure. The KD step costs most over its floor on "
        f"{hi} ({cpu[hi]:.2f}): {excess:.1f} ms over it, of which the KD losses alone take "
        f"{f['cpu_ms']['kd_terms']['median']:.1f} ms. The losses grow with the image tokens "
        "(L_vis: a softmax over the vocabulary per image token; L_rel: a Gram matrix over the "
        "vocabulary per image, quadratic in its tokens): on the families whose processors give "
        f"the most image tokens ({', '.join(many)}: {tokens(many)} in the batch) they take "
        f"{terms(many)} and the KD step is {ratios(many)} of its floor; on the others "
        f"({', '.join(few)}: {tokens(few)}) {terms(few)} and {ratios(few)}. They weigh more here "
        f"than at real sizes: the tiny models' hidden sizes ({', '.join(map(str, hidden))}) are "
        f"small next to the vocabulary ({vocab} tokens), and the models' matrix products grow "
        "with the hidden size while the losses do not.")
    return "\n".join(lines) + "\n\n" + para(text)
