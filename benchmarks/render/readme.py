"""The README.md blocks of the main job: what it shows, the KD headline, the seed gain, the
default table, the stage ablation, the offline teacher and the merge ablation."""

from __future__ import annotations

import re

from render.base import (MODEL_NAMES, Results, TYPES, dated, f3, held_out, minutes, para, pct_n, pm,
                         pts_pm, seeds_positive, signed, span, std_error, within_noise)


def main_job(R: Results) -> str:
    d, orch = R.load("default_pipeline"), R.load("orchestration")
    res = d["results"]
    cached = orch["default_pipeline_cached_rerun_cli_seconds"]
    return para(
        "`mmkd run pipelines/llava_kd.yaml` generates the shapes VQA data set (1–4 coloured shapes "
        "per 32×32 image; questions about colour, shape, size, count, existence and relative "
        f"position), trains a BPE tokenizer ({d['tokenizer_vocab_size']} tokens), a teacher "
        f"(`tiny-teacher`, {res['teacher']['params'] / 1e6:.2f}M parameters) and two students "
        f"(`tiny-student`, {res['baseline_pt_sft']['params'] / 1e6:.2f}M): a baseline (PT → SFT) "
        "and a LLaVA-KD student (DPT → SFT → DFT, with the frozen teacher in the loop), evaluates "
        f"all of them on {res['teacher']['n']} held-out questions, and prints a table (also "
        "`results.md/csv/png` in the evaluate stage's output and in MLflow). On the "
        f"{d['environment']['machine']['cpu_count']}-core CPU machine it took "
        f"{minutes(d['run_wall_s'])} (`benchmarks/default_pipeline.py`); a second run is fully "
        f"cached and takes {cached['median']:.1f} s (median of {len(cached['runs'])}, "
        "`benchmarks/orchestration.py`).")


def pooled_p(x: float | None) -> str:
    return "n/a" if x is None else ("< 0.001" if x < 0.001 else f"{x:.2g}")


def kd_headline(R: Results) -> str:
    """The section's first sentence: does KD beat the baseline, over seeds, pooled."""
    g = R.load("kd_gain")
    pooled = (g.get("pooled_over_seeds") or {}).get("kd_dpt_sft_dft")
    s, seeds = g["summary"], len(g["seeds"])
    gain = g["gain_dpt_sft_dft_over_pt_sft"]
    if pooled is None:
        return para(f"Over {seeds} student seeds (`results/kd_gain.json`) the LLaVA-KD student "
                    f"scores {pm(s['kd_dpt_sft_dft'])} against the baseline's "
                    f"{pm(s['baseline_pt_sft'])} ({pts_pm(gain)} points).")
    t_p = pooled["p_ttest_over_seeds"]
    significant = pooled["p_mcnemar"] < 0.05 and t_p is not None and t_p < 0.05
    verdict = "a significant gain" if significant and gain["mean"] > 0 else (
        "a significant loss" if significant else "not a significant difference across seeds")
    wins = sum(r["accuracy"]["kd_dpt_sft_dft"] > r["accuracy"]["baseline_pt_sft"]
               for r in g["runs"])
    return para(
        f"**The result:** over {seeds} student seeds the LLaVA-KD student (DPT → SFT → DFT, "
        f"L_res + L_rel) scores {pm(s['kd_dpt_sft_dft'])} on the held-out questions against the "
        f"baseline's {pm(s['baseline_pt_sft'])}, {pts_pm(gain)} points, ahead on {wins} of "
        f"{seeds} seeds: {verdict} (t-test of the {seeds} per-seed differences: "
        f"p = {pooled_p(t_p)}; McNemar on the {pooled['n']:,} answers of all seeds pooled: "
        f"p = {pooled_p(pooled['p_mcnemar'])}, which counts the same questions at every seed as "
        f"new ones; `benchmarks/kd_gain.py`, `results/kd_gain.json`)." + _ablation_clause(R))


def _ablation_clause(R: Results) -> str:
    """Where a gain does and does not appear (``results/kd_ablation.json``), once that file
    was measured with the current code (it records its commit)."""
    a = R.load("kd_ablation")
    if dated(R, "kd_ablation"):
        return ""
    c, seeds = a["contrasts"], len(a["seeds"])
    dpt = c["DPT-SFT vs PT-SFT (distilled pre-training)"]
    dft = c["DPT-SFT-DFT vs DPT-SFT-FT (KD terms at equal compute)"]
    return (f" Split by stage ({seeds} seeds, `results/kd_ablation.json`): distilled "
            f"pre-training against plain pre-training, both followed by SFT, {pts_pm(dpt)} "
            f"points (ahead {seeds_positive(dpt, seeds)}); DFT's KD terms against "
            f"cross-entropy on DFT's exact schedule, {pts_pm(dft)} (ahead "
            f"{seeds_positive(dft, seeds)}).")


def kd_gain_text(R: Results) -> str:
    g = R.load("kd_gain")
    s, seeds = g["summary"], len(g["seeds"])
    gain, dpt = g["gain_dpt_sft_dft_over_pt_sft"], g["gain_dpt_sft_over_pt_sft"]
    wins = sum(r["accuracy"]["kd_dpt_sft_dft"] > r["accuracy"]["baseline_pt_sft"]
               for r in g["runs"])
    per_seed = []
    for r in g["runs"]:
        c = next((c for c in r.get("comparisons", [])
                  if (c["a"], c["b"]) == ("baseline_pt_sft", "kd_dpt_sft_dft")), None)
        if c is not None:
            per_seed.append(f"seed {r['seed']}: {signed(100 * c['diff'])} pts "
                            f"[{signed(100 * c['low'])}, {signed(100 * c['high'])}], "
                            f"p = {c['p']:.2g}")
    tests = (" Per seed, DPT-SFT-DFT − PT-SFT on the same questions (McNemar): "
             + "; ".join(per_seed) + ".") if per_seed else ""
    return para(
        f"Over {seeds} student seeds (`benchmarks/kd_gain.py`): PT-SFT {pm(s['baseline_pt_sft'])}, "
        f"DPT-SFT {pm(s['kd_dpt_sft'])}, DPT-SFT-DFT {pm(s['kd_dpt_sft_dft'])} — DPT-SFT-DFT beats "
        f"the baseline on {wins} of {seeds} seeds ({pts_pm(gain)} points), DPT alone "
        f"{pts_pm(dpt)} ({'within noise' if within_noise(dpt) else 'beyond its spread'})." + tests)


def default_table(R: Results) -> str:
    d = R.load("default_pipeline")
    res, prior = d["results"], d["answer_prior"]
    ci = all("accuracy_low" in r for r in res.values())
    n = int(next(iter(res.values()))["n"])
    lines = [f"One run (seed 0, {d['run_id']}, {n} held-out questions, "
             "`benchmarks/results/default_pipeline.json`):", "",
             "| model | accuracy |" + (" 95% interval |" if ci else "")
             + " colour | count | exists | relation | shape | size | caption ppl |",
             "|---|---|" + ("---|" if ci else "") + "---|---|---|---|---|---|---|"]
    for name, r in res.items():
        cells = [f3(r["accuracy"])] + (
            [f"{f3(r['accuracy_low'])}–{f3(r['accuracy_high'])}"] if ci else []) + [
            f3(r[f"accuracy/{t}"]) for t in TYPES]
        lines.append(f"| {MODEL_NAMES.get(name, name)} | {' | '.join(cells)} | "
                     f"{r['caption_ppl']:.2f} |")
    cells = [f3(prior["accuracy"])] + ([""] if ci else []) + [
        f3(prior["per_type"][t]) for t in TYPES]
    lines.append(f"| most frequent answer per type | {' | '.join(cells)} | |")
    pairs = [c for c in d.get("comparisons", []) if c["a"] != "teacher" and c["b"] != "teacher"]
    if pairs:
        lines += ["", "Paired comparisons of the students on the same questions (`evaluate` "
                      "prints them for every pair; McNemar p-values):", ""]
        lines += [f"- {c['text']}" for c in pairs]
    students = [r["accuracy"] for n, r in res.items() if n != "teacher"]
    above = [a - prior["accuracy"] for a in students]
    teacher = 100 * (res["teacher"]["accuracy"] - prior["accuracy"])
    if min(above) >= 0.05:
        verdict = (f"the students, at {span(students, f3)}, are {100 * min(above):.1f}-"
                   f"{100 * max(above):.1f} points above it, so they use the image; the teacher "
                   f"is {teacher:.1f} points above it.")
    else:
        verdict = (f"the students, at {span(students, f3)}, are within "
                   f"{100 * max(abs(a) for a in above):.1f} points of it and use the image only a "
                   f"little; the teacher, {teacher:.1f} points above it, clearly does.")
    return "\n".join(lines) + "\n\n" + para(
        "The last row answers each question type's most frequent answer (chosen on these same "
        f"questions, so a slightly optimistic floor): {verdict}")


def kd_ablation_text(R: Results) -> str:
    a = R.load("kd_ablation")
    s, c, seeds = a["summary"], a["contrasts"], len(a["seeds"])
    dpt = c["DPT-SFT-DFT vs DPT-SFT-FT (KD terms at equal compute)"]
    pt = c["PT-SFT-DFT vs PT-SFT-FT (KD terms at equal compute)"]
    vis, rel = c["+visual vs response-only (DFT)"], c["+relation vs response-only (DFT)"]
    order = ["pt_sft", "dpt_sft", "pt_sft_dft", "dpt_sft_dft"]  # the paper's, worst to best
    label = {"pt_sft": "PT-SFT", "dpt_sft": "DPT-SFT", "pt_sft_dft": "PT-SFT-DFT",
             "dpt_sft_dft": "DPT-SFT-DFT"}
    ours = sorted(order, key=lambda k: s[k]["mean"])
    chain = " < ".join(f"{label[k]} {f3(s[k]['mean'])}" for k in ours)
    return para(
        f"Is it the KD or the extra steps? `pipelines/kd_stage_ablation.yaml` ({seeds} seeds, "
        f"`benchmarks/kd_ablation.py`{dated(R, 'kd_ablation')}) adds a control that runs DFT's "
        f"exact schedule with cross-entropy only. After DPT-SFT, DFT minus that control: "
        f"{pts_pm(dpt)} points (DFT ahead {seeds_positive(dpt, seeds)})"
        + (", within the seed spread: the KD terms add nothing over DFT's extra steps here"
           if within_noise(dpt) else "") +
        f"; after plain PT-SFT: {pts_pm(pt)} (ahead {seeds_positive(pt, seeds)}). The stage "
        f"ordering "
        f"{'matches' if ours == order else 'differs from'} the paper's ({chain}). DFT's loss "
        f"terms, after DPT-SFT: response only {f3(s['dpt_sft_dft_res']['mean'])}, response + "
        f"visual {f3(s['dpt_sft_dft_res_vis']['mean'])} ({pts_pm(vis)} points, ahead "
        f"{seeds_positive(vis, seeds)}), response + relation, the default, "
        f"{f3(s['dpt_sft_dft']['mean'])} ({pts_pm(rel)}, ahead {seeds_positive(rel, seeds)}).")


def offline_rows(R: Results) -> tuple[dict, dict[int, dict], int]:
    """The online row, the offline rows by k, and how many samples the logits were stored for."""
    rows = R.load("kd_offline")["runs"][0]["rows"]
    ks = {int(k.removeprefix("dft_offline_top")): v for k, v in rows.items()
          if k.startswith("dft_offline_top")}
    shapes = R.pipeline("pipelines/kd_offline_teacher.yaml")["stages"]["shapes"]["params"]
    return rows["dft_online"], dict(sorted(ks.items())), int(shapes["num_instruct"])


def kd_offline_text(R: Results) -> str:
    online, ks, samples = offline_rows(R)
    n = held_out(R, "pipelines/kd_offline_teacher.yaml", "kd_offline")
    faster = [1 - r["dft_wall_s"] / online["dft_wall_s"] for r in ks.values()]
    accs = ", ".join(f"k={k} {f3(r['accuracy'])}" for k, r in ks.items())
    per_sample = ", ".join(f"{r['logits_bytes'] / samples / 1e3:.1f} KB at k={k}"
                           for k, r in ks.items())
    return para(
        "Offline teacher (`pipelines/kd_offline_teacher.yaml`, `benchmarks/kd_offline.py`"
        f"{dated(R, 'kd_offline')}): a "
        "`teacher_logits` stage runs the teacher once and stores its top-k logits; DFT then reads "
        f"them instead of running the teacher. Student accuracy: online {f3(online['accuracy'])}, "
        f"offline {accs} (one seed, ±{100 * std_error(online['accuracy'], n):.1f} points "
        f"standard error). The stored logits cost {per_sample} per sample, and the DFT stage ran "
        f"{span(faster, pct_n, '%')} faster — worth it when the teacher is large or the same "
        "logits serve several runs (a tune, seeds), not for one run of a tiny teacher.")


def merge_text(R: Results) -> str:
    m = R.load("merge_ablation")["rows"]
    n = held_out(R, "pipelines/merge_ablation.yaml")
    c = m["centralized"]["accuracy"]
    soft, uft = m["ensemble_soft"], m["uniform_ft"]
    broken = ", ".join(f3(m[k]["accuracy"]) for k in ("uniform", "task_arithmetic", "ties"))
    return para(
        f"On the tiny setting (`benchmarks/merge_ablation.py`{dated(R, 'merge_ablation')}, one seed, "
        f"±{100 * std_error(c, n):.1f} points standard error) the soft-routed ensemble of two "
        f"cluster experts comes within {100 * (c - soft['accuracy']):.1f} points of the "
        f"centralized model ({f3(soft['accuracy'])} vs {f3(c)}) at "
        f"{soft['params_over_centralized']:.1f}x the parameters, and averaging followed by a "
        f"short fine-tune within {100 * (c - uft['accuracy']):.1f} ({f3(uft['accuracy'])}); plain "
        f"averaging, task arithmetic and TIES fall apart ({broken}): the experts were trained "
        "with their vision towers from a caption-only base and drifted too far apart.")
