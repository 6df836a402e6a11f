"""Cross-tokenizer distillation (``cross_family_kd.json``): the README's model-families block."""

from __future__ import annotations

from render.base import Results, f3, para, pts, minutes

TYPES = ("color", "shape", "size", "count", "exists", "relation")


def _table(t: dict) -> list[str]:
    lines = ["| model | accuracy [95% CI] | " + " | ".join(TYPES) + " |",
             "|---|---|" + "---|" * len(TYPES)]
    for name, r in t.items():
        cells = " | ".join(f3(r[f"accuracy/{k}"]) if f"accuracy/{k}" in r else "—"
                           for k in TYPES)
        lines.append(f"| {name} | {f3(r['accuracy'])} [{f3(r['accuracy_low'])}, "
                     f"{f3(r['accuracy_high'])}] | {cells} |")
    return lines


def _against_sft(comparisons: list, students: tuple[str, ...]) -> list[str]:
    comps = {(c["a"], c["b"]): c for c in comparisons}
    said = []
    for kd in students:
        c = comps.get(("sft", kd))
        if c:
            p = "p < 0.001" if c["p"] < 0.001 else f"p = {c['p']:.2f}"
            said.append(f"{kd} − sft **{pts(c['diff'])} pts** [{pts(c['low'])}, "
                        f"{pts(c['high'])}] ({c['test']}, {p})")
    return said


def cross_family_block(R: Results) -> str:
    d = R.load("cross_family_kd")
    t, a = d["table"], d["alignment"]
    lines = _table(t)
    comps = {(c["a"], c["b"]): c for c in d["comparisons"]}
    said = _against_sft(d["comparisons"], ("kd_uld", "kd_span"))
    terms = d["final_terms"]
    n = t["sft"]["n"]
    share = lambda k: a[k] / a["student_reply_tokens"]  # noqa: E731
    text = (
        f"Measured (`results/cross_family_kd.json`, seed {d['seed']}, {n} held-out questions, "
        f"the whole pipeline {minutes(d['wall_seconds'])} on this machine): "
        + "; ".join(said) + ". "
        f"Final KD terms: l_uld {terms['kd_uld']['l_uld']:.3f}, l_span "
        f"{terms['kd_span']['l_span']:.3f}. Of the students' {a['student_reply_tokens']} reply "
        f"tokens in {a['rows']} training rows (the teacher's: {a['teacher_reply_tokens']}), the "
        f"alignment put {share('in_one_to_one_spans'):.0%} in one-token spans and "
        f"{share('in_merged_spans'):.0%} in merged ones; {a['unaligned']} were left unaligned.")
    teacher = t["teacher"]
    if teacher.get("image_drop") is not None and teacher["image_drop"] <= 0.01:
        text += (f" What it shows is the path across tokenizers end to end, not a KD gain: the "
                 f"tiny Qwen2-VL teacher scores {f3(teacher['accuracy'])}, and "
                 f"{f3(teacher['blind_accuracy'])} with its images blanked — it answers each "
                 f"question type's prior, as it does in pipelines/qwen2_vl_kd.yaml — so there is "
                 f"no visual knowledge to transfer, and the students' differences are "
                 f"{'within' if all(c['low'] <= 0 <= c['high'] or c['p'] > 0.05 for k, c in comps.items() if k[0] == 'sft') else 'beyond'} "
                 f"the noise of {n} questions.")
    out = "\n".join(lines) + "\n\n" + para(text)
    llava = d.get("llava_teacher")
    if llava:
        lt, teacher = llava["table"], llava["table"]["teacher_llava"]
        terms = d["final_terms"]
        out += "\n\n" + para(
            "**From a teacher that sees** (`evaluate_llava`): a tiny LLaVA-1.5 teacher on the "
            "teacher's 512-token BPE, trained as the default pipeline trains its teacher, into "
            "the same students by the same terms (another tokenizer, one family):").rstrip("\n")
        out += "\n\n" + "\n".join(_table(lt)) + "\n\n"
        sft = lt["sft"]
        gains = {kd: [k for k in TYPES if f"accuracy/{k}" in lt[kd]
                      and lt[kd][f"accuracy/{k}"] - sft[f"accuracy/{k}"] >= 0.05]
                 for kd in ("kd_uld_llava", "kd_span_llava")}
        out += para(
            f"The teacher scores {f3(teacher['accuracy'])} ({f3(teacher['blind_accuracy'])} with "
            f"its images blanked): " + "; ".join(
                _against_sft(llava["comparisons"], ("kd_uld_llava", "kd_span_llava")))
            + ". " + " ".join(f"{kd} is 5 points or more above sft on "
                              f"{', '.join(types) if types else 'no question type'}."
                              for kd, types in gains.items())
            + f" Final KD terms: l_uld {terms['kd_uld_llava']['l_uld']:.3f}, l_span "
            f"{terms['kd_span_llava']['l_span']:.3f}.")
    return out
