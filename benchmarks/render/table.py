"""benchmarks/README.md: the machine line, the table of every benchmark (one ``Row`` each:
script, what is measured, the result cell, the aim) and the notes under it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

from render.base import (Results, f3, minutes, mm_range, para, pct, pm, pts, pts_pm, span,
                         within_noise)
from render.families import row_family_kd_step
from render.readme import offline_rows
from render.teacher_service import row_teacher_service, row_teacher_service_tune
from render.training import row_train_throughput


def machine(R: Results) -> str:
    """What the results files say about where they ran (older files record less)."""
    seen: dict[str, dict[str, set]] = {k: {} for k in ("cpus", "torch", "ray", "deepspeed",
                                                       "python", "commit")}
    for path in sorted(R.dir.glob("*.json")):
        d, name = json.loads(path.read_text()), path.stem
        for run in d.get("runs", {}).values() if isinstance(d.get("runs"), dict) else [d]:
            env = run.get("environment") or {}
            mach = {**(run.get("machine") or {}), **(run.get("versions") or {})}
            values = {"cpus": env.get("machine", {}).get("cpu_count") or mach.get("cpu_count")
                      or mach.get("cpus"),
                      "python": env.get("python") or mach.get("python"),
                      "commit": (env.get("git") or {}).get("commit") or mach.get("git_commit")}
            for lib in ("torch", "ray", "deepspeed"):
                values[lib] = (env.get("libraries") or {}).get(lib) or mach.get(lib)
            for key, value in values.items():
                if value is not None:
                    seen[key].setdefault(str(value)[:7] if key == "commit" else str(value),
                                         set()).add(name)
    total = len(list(R.dir.glob("*.json")))
    parts = []
    for key, values in seen.items():
        files = set().union(*values.values()) if values else set()
        shown = ", ".join(sorted(values)) or "—"
        parts.append(f"{key} {shown} ({len(files)} of {total} files)")
    return para("Where the results ran, as recorded in `results/*.json` (files written before "
                "`_env.py` record less): " + "; ".join(parts) + ". The machine is shared with "
                "other sessions, so wall times are noisy; scripts that can also record CPU time "
                "do.")


@dataclass
class Row:
    script: str
    measured: str
    result: Callable[[Results], str]
    aim: str = "—"


def row_orchestration(R: Results) -> str:
    o = R.load("orchestration")
    cli, dflt = o["cached_rerun_cli_seconds"], o["default_pipeline_cached_rerun_cli_seconds"]
    return (f"{o['chain']['overhead_per_stage_seconds']:.3f} s per stage; fan-out "
            f"{o['fan']['wall_seconds']:.2f} s vs {o['fan']['ideal_seconds']:.0f} s ideal; cached "
            f"{o['chain']['stages']}-stage rerun {o['cached_rerun_in_process_seconds']:.3f} s in "
            f"process / median {cli['median']:.3f} s (min {cli['min']}, max {cli['max']}) as a "
            f"fresh `mmkd run`; **cached rerun of the default pipeline: median "
            f"{dflt['median']:.3f} s (min {dflt['min']}, max {dflt['max']})**"
            f"{', Ray not started' if not o['cached_rerun_started_ray'] else ''} (ray.init alone: "
            f"{o['ray_init_seconds']:.3f} s)")


def row_train_stage_overhead(R: Results) -> str:
    o = R.load("train_stage_overhead")
    s, ratio, saved = o["stage_seconds"], o["stage_ratio_of_medians"], o["stage_saving_seconds"]
    return (f"stage wall: {mm_range(s['ray_default'])} s with Ray Train's defaults (2 s poll, a "
            f"preemption watcher, a placement group cleaner and a dataset manager per run); "
            f"{mm_range(s['poll_0.5'])} s at mmkd's 0.5 s poll (×{ratio['poll_0.5']:.2f}); "
            f"{mm_range(s['poll_0.5_no_watcher'])} s also without the watcher "
            f"(×{ratio['poll_0.5_no_watcher']:.2f}); **{mm_range(s['mmkd_local'])} s also "
            f"without the cleaner and the dataset manager, mmkd's local setting "
            f"(×{ratio['mmkd_local']:.2f}, {saved['mmkd_local']:.1f} s less per stage)**; "
            f"{o['reps']} runs each, alternating")


def row_data_throughput(R: Results) -> str:
    d = R.load("data_throughput")
    r, c, ratio = d["results"], d["training_consumption_samples_per_s"], \
        d["data_over_consumption_ratio"]
    k = lambda x: f"{x / 1e3:.2f}k/s"  # noqa: E731
    return (f"steady state: plain loop {k(r['plain_python_1cpu']['steady_samples_per_s'])}, Ray "
            f"Data 1 CPU {k(r['ray_data_1cpu']['steady_samples_per_s'])}, 2 CPUs "
            f"{k(r['ray_data_2cpu']['steady_samples_per_s'])} (the second core also runs the "
            f"driver); a training step consumes {k(c['tiny-student'])} (tiny-student) and "
            f"{k(c['tiny-teacher'])} (tiny-teacher): **data/consumption "
            f"{ratio['tiny-student']:.1f}x** (student), {ratio['tiny-teacher']:.0f}x (teacher). "
            f"Totals for {d['samples']} samples: {r['ray_data_1cpu']['total_s']:.1f} s with Ray "
            f"Data vs {r['plain_python_1cpu']['total_s']:.1f} s plain (Ray's start-up)")


def row_data_memory(R: Results) -> str:
    d = R.load("data_memory")
    r = d["results"]
    mem = lambda v: f"{v['peak_extra_mib']:.1f} MiB ({v['seconds']:.1f} s)"  # noqa: E731
    return (f"{d['file']['bytes'] / 1e6:.0f} MB, {d['file']['records']} records. Streaming, "
            f"whole file: **{mem(r['stream_whole_file'])}**; one of "
            f"{r['stream_one_range']['ranges']} ranges: {mem(r['stream_one_range'])}; planning "
            f"the ranges: {mem(r['plan_ranges'])}; validate's sample: "
            f"{r['validate_sample']['peak_extra_mib']:.1f} MiB "
            f"({r['validate_sample']['seconds']:.2f} s); `json.loads` whole: "
            f"**{r['json_load_whole']['peak_extra_mib']:.0f} MiB** "
            f"({r['json_load_whole']['seconds']:.1f} s)")


def row_eval_generation(R: Results) -> str:
    d = R.load("eval_generation")
    parts = []
    for name, m in d["models"].items():
        q, sp = m["questions_per_s"], m["speedup_vs_one_by_one"]["batched_16"]["per_repeat"]
        parts.append(f"{name}: one by one {q['one_by_one']['median']:.0f}/s, batch 16 "
                     f"{q['batched_16']['median']:.0f}/s, **{sp['median']:.1f}x** "
                     f"({sp['min']:.1f}-{sp['max']:.1f}x over {d['repeats']} repeats)")
    same = all(m["identical_answers"] for m in d["models"].values())
    return "; ".join(parts) + ("; answers identical" if same else "; ANSWERS DIFFER")


def row_kd_step(R: Results) -> str:
    r = R.load("kd_step")["ratios"]
    return (f"online {r['dft_online_over_floor_wall']:.2f} (wall) / "
            f"{r['dft_online_over_floor_cpu']:.2f} (CPU time); offline "
            f"{r['dft_offline_over_sft_wall']:.2f} / {r['dft_offline_over_sft_cpu']:.2f}")


def row_kd_loss_memory(R: Results) -> str:
    v = R.load("kd_loss_memory")["variants"]
    fused, naive = v["div_chunked_fused"], v["div_naive_kldiv"]
    rel, rel_naive = v["rel_chunked"], v["rel_naive"]
    return (f"chunked divergence: {fused['peak_extra_mb']:.1f} MB vs {naive['peak_extra_mb']:.1f}"
            f" MB naive (**{fused['peak_extra_mb'] / naive['peak_extra_mb']:.2f}**), "
            f"{fused['time_s'] / naive['time_s']:.1f}x the naive time; relation loss "
            f"{rel['peak_extra_mb']:.1f} vs {rel_naive['peak_extra_mb']:.1f} MB "
            f"({rel['peak_extra_mb'] / rel_naive['peak_extra_mb']:.2f})")


def kd_loss_setup(R: Results) -> str:
    s = R.load("kd_loss_memory")["setup"]
    return f"V={s['V'] / 1e3:.0f}k, T={s['T']}, B={s['B']}, {s['dtype'].replace('float', 'fp')}"


def row_kd_gain(R: Results) -> str:
    g = R.load("kd_gain")
    s, gain, dpt = g["summary"], g["gain_dpt_sft_dft_over_pt_sft"], g["gain_dpt_sft_over_pt_sft"]
    wins = sum(r["accuracy"]["kd_dpt_sft_dft"] > r["accuracy"]["baseline_pt_sft"]
               for r in g["runs"])
    return (f"teacher {f3(s['teacher']['mean'])}; PT-SFT {pm(s['baseline_pt_sft'])}; DPT-SFT "
            f"{pm(s['kd_dpt_sft'])}; DPT-SFT-DFT {pm(s['kd_dpt_sft_dft'])}. Gain of DPT-SFT-DFT "
            f"over PT-SFT **{pts_pm(gain)} points** (min {pts(gain['min'])}, {wins} of "
            f"{len(g['runs'])} seeds positive); DPT-SFT alone {pts_pm(dpt)}"
            f"{' (within noise)' if within_noise(dpt) else ''}. DFT adds steps the baseline does "
            "not get: see `kd_ablation.py` for the equal-compute control")


def row_kd_ablation(R: Results) -> str:
    a = R.load("kd_ablation")
    s, c, n = a["summary"], a["contrasts"], len(a["seeds"])
    con = lambda k: f"{pts_pm(c[k])} ({c[k]['positive_seeds']}/{n})"  # noqa: E731
    return (f"PT-SFT {pm(s['pt_sft'])}, DPT-SFT {pm(s['dpt_sft'])}, PT-SFT-DFT "
            f"{pm(s['pt_sft_dft'])}, DPT-SFT-DFT **{pm(s['dpt_sft_dft'])}**. Equal compute: "
            f"DPT-SFT-DFT vs DPT-SFT-FT **"
            f"{con('DPT-SFT-DFT vs DPT-SFT-FT (KD terms at equal compute)')}**; PT-SFT-DFT vs "
            f"PT-SFT-FT {con('PT-SFT-DFT vs PT-SFT-FT (KD terms at equal compute)')}; whole "
            f"recipe vs PT-SFT-FT {con('DPT-SFT-DFT vs PT-SFT-FT (whole recipe at equal compute)')}"
            f". DFT's loss terms (after DPT-SFT): response only "
            f"{f3(s['dpt_sft_dft_res']['mean'])}, response + visual "
            f"{f3(s['dpt_sft_dft_res_vis']['mean'])}, response + relation (the default) "
            f"{f3(s['dpt_sft_dft']['mean'])}")


def row_kd_offline(R: Results) -> str:
    online, ks, samples = offline_rows(R)
    secs = lambda key: span([r[key] for r in ks.values()], lambda x: f"{x:.0f}")  # noqa: E731
    return (f"accuracy: online {f3(online['accuracy'])}; "
            + ", ".join(f"offline k={k} {f3(r['accuracy'])}" for k, r in ks.items())
            + f" (one seed). Cost: the teacher pass over the {samples} DFT samples "
            f"{secs('teacher_pass_wall_s')} s once; offline DFT {secs('dft_wall_s')} s vs online "
            f"{online['dft_wall_s']:.0f} s (wall, shared machine); stored logits "
            + ", ".join(f"{r['logits_bytes'] / 1e6:.1f} MB (k={k}, "
                        f"{r['logits_bytes'] / samples / 1e3:.1f} KB per sample)"
                        for k, r in ks.items()))


def row_merge_ablation(R: Results) -> str:
    d = R.load("merge_ablation")
    m = d["rows"]
    a = lambda k: f3(m[k]["accuracy"])  # noqa: E731
    d_pts = lambda k: pts(m[k]["accuracy_minus_centralized"])  # noqa: E731
    x = lambda k: f"{m[k]['params_over_centralized']:.1f}x"  # noqa: E731
    return (f"centralized {a('centralized')}; experts {a('expert_0')} / {a('expert_1')}; "
            f"**soft-routed ensemble {a('ensemble_soft')} ({d_pts('ensemble_soft')} pts, "
            f"{x('ensemble_soft')} the parameters)**, top-1 ensemble {a('ensemble_top1')} "
            f"({d_pts('ensemble_top1')}), random-partition top-1 ensemble "
            f"{a('random_partition_ensemble')}; JAM-Width {a('jam_width')} → "
            f"{a('jam_width_ft')} after its fine-tune ({x('jam_width')} params); JAM-Cross "
            f"{a('jam_cross_untrained')} untrained → {a('jam_cross_ft')} after training only its "
            f"new layers; uniform average {a('uniform')} → {a('uniform_ft')} after the same "
            f"fine-tune; task arithmetic {a('task_arithmetic')}; TIES {a('ties')}. Whole "
            f"pipeline: {len(d['stage_status'])} stages, "
            f"{sum(d['stage_wall_s'].values()) / 60:.1f} min of stage wall time")


def row_tune_kd(R: Results) -> str:
    t = R.load("tune_kd")
    stops = sorted(tr["steps"] for tr in t["trials"] if not tr["completed"])
    full = max(tr["steps"] for tr in t["trials"])
    best, p = t["best"], t["best"]["params"]
    metric = "kd_dpt_sft_dft/accuracy"
    return (f"{len(t['trials'])} trials ({t['tune_wall_s'] / 60:.1f} min): {t['stopped_early']} "
            f"stopped early by ASHA (at {', '.join(map(str, stops))} of {full} steps), "
            f"**{t['trial_steps_run']} of {t['trial_steps_budget']} trial-steps "
            f"({pct(t['compute_fraction'])})**; mmkd freed the placement groups of "
            f"{t['placement_groups_freed']} of the {t['stopped_early']} stopped trials' Ray Train "
            f"runs. Best accuracy {f3(best[metric])} (α {p['alpha']:.2f}, β {p['beta']:.2f}, "
            f"γ {p['gamma']:.2f}, τ {p['temperature']:g}) vs the paper defaults' "
            f"{f3(t['paper_defaults'][metric])} (seed 0)")


def row_merge_methods(R: Results) -> str:
    res = R.load("merge_methods")["results"]
    merge = [s for p in res.values() for s in p["merge_s"].values()]
    rel = lambda k: span([p["forward_relative_to_single"][k] for p in res.values()],  # noqa: E731
                         lambda x: f"{x:.1f}")
    return (f"merges {span(merge, lambda s: f'{1e3 * s:.0f}')} ms; ensemble forward "
            f"{rel('ensemble_soft')}x one expert (soft, K=2), top-1 {rel('ensemble_top1')}x, "
            f"width {rel('width')}x, cross {rel('cross')}x")


ROWS = [
    Row("orchestration.py", "runner overhead per stage (a chain of no-op stages), fan-out of "
        "sleeping stages on 2 CPU slots vs the ideal, fully cached reruns as fresh `mmkd run` "
        "processes (MLflow written by a background relog)", row_orchestration,
        "cached rerun ≤ 3 s"),
    Row("train_stage_overhead.py", "wall seconds of a 2-step tiny `pretrain` stage (Ray Train, "
        "1 worker, ZeRO-2) under Ray Train's defaults and mmkd's: the controller poll interval "
        "(`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`, forwarded to every stage task), the preemption "
        "watcher (off on a local instance mmkd starts), Ray Train's placement group cleaner and, "
        "for one worker, its dataset manager (`MMKD_RAY_TRAIN_CALLBACKS=ray` keeps both)",
        row_train_stage_overhead, "the stage ends when training does"),
    Row("data_throughput.py", "samples/s of read → decode → image processor → chat template → "
        "tokenize → collate: plain Python loop vs Ray Data (1 and 2 CPUs); samples/s a training "
        "step of each tiny preset consumes", row_data_throughput, "data path never the bottleneck"),
    Row("data_memory.py", "peak extra RSS of reading a generated LLaVA JSON array, each variant "
        "in a fresh process: the streaming reader over the whole file and over one of its byte "
        "ranges (what one Ray read task gets), the pass that plans the ranges, `validate`'s "
        "sample, and `json.loads` of the whole file (the old reader's first step)",
        row_data_memory, "streaming < 128 MiB, whatever the file size"),
    Row("train_throughput.py", "tokens/s of the mmkd loop (1 Ray Train worker)"
        " vs a plain PyTorch loop, tiny-teacher, same batches and thread count (2 unless listed), repetitions "
        "interleaved", row_train_throughput, "overhead ≤ 10%"),
    Row("kd_step.py", "DFT step time / (SFT step + teacher forward); offline-teacher DFT step / "
        "SFT step", row_kd_step, "online ≤ 1.15"),
    Row("kd_loss_memory.py", "peak extra memory and time of the chunked KD losses vs a naive "
        "`kl_div` implementation, {setup}", row_kd_loss_memory, "≤ 0.25 of naive"),
    Row("kd_gain.py", "the default pipeline at 3 student seeds (teacher, data, tokenizer fixed at "
        "seed 0): held-out accuracy of teacher, PT-SFT, DPT-SFT, DPT-SFT-DFT", row_kd_gain,
        "KD beats the baseline"),
    Row("kd_ablation.py", "`pipelines/kd_stage_ablation.yaml` at 3 student seeds: the paper's "
        "stage ablation, the DFT loss-term ablation, and a compute-matched control (`*_ft`: "
        "DFT's exact schedule with cross-entropy only)", row_kd_ablation,
        "DPT-SFT-DFT beats the equal-compute control"),
    Row("kd_offline.py", "`pipelines/kd_offline_teacher.yaml`: DFT with the teacher online vs "
        "offline (stored top-k logits; the largest k covers the whole tiny vocabulary), same "
        "student (DPT-SFT, seed 0)", row_kd_offline, "offline at k=64 loses nothing here"),
    Row("merge_ablation.py", "`pipelines/merge_ablation.yaml` end to end (K=2 experts on k-means "
        "clusters of image embeddings; a centralized model on all data): held-out accuracy "
        "against the centralized model, parameters, training samples and summed stage seconds "
        "behind each model", row_merge_ablation),
    Row("tune_kd.py", "`mmkd tune pipelines/tune_kd_weights.yaml` (Optuna samples of DFT's α, β, "
        "γ, τ; ASHA on the student CE; best by held-out accuracy after DFT): trial-steps run vs "
        "the full budget, best accuracy vs the paper's defaults", row_tune_kd),
    Row("merge_methods.py", "time of each merge method on the tiny presets; forward cost of "
        "merged models relative to one expert", row_merge_methods),
    Row("family_kd_step.py", "per model family, its tiny teacher and student, one batch of 8 "
        "shapes samples through the real data path: the KD step (`DistillLoss`, all three KD "
        "terms) over its floor (student CE step + teacher forward); `Preprocessor` samples/s",
        row_family_kd_step),
    Row("teacher_service.py", "DFT step with `teacher: service` (student 1 CPU + one replica 1 "
        "CPU, requests a step ahead) vs `online` (one process, 2 threads), over the floor "
        "(student step + teacher forward); a tiny pair, a wide (32M) teacher, and that teacher "
        "with a student whose step costs about half its forward", row_teacher_service,
        "service ≤ 0.75 × floor"),
    Row("teacher_service_tune.py", "a 4-trial `mmkd tune` of DFT sharing one teacher service vs "
        "a teacher in every trial: memory of the processes holding a model, wall time",
        row_teacher_service_tune, "memory < online"),
    Row("eval_generation.py", "questions/s of `evaluate`'s greedy generation: the one-by-one loop "
        "vs batched with left padding and the KV cache (1 torch thread, 64 shapes questions, 8 "
        "new tokens)", row_eval_generation, "≥ 4x at batch 16"),
]


def benchmarks_table(R: Results) -> str:
    lines = ["| script | what is measured | result | aim |", "|---|---|---|---|"]
    for row in ROWS:
        measured = row.measured.replace("{setup}", kd_loss_setup(R)) \
            if "{setup}" in row.measured else row.measured
        lines.append(f"| `{row.script}` | {measured} | {row.result(R)} | {row.aim} |")
    return "\n".join(lines) + "\n"


def notes(R: Results) -> str:
    r = R.load("kd_loss_memory")["peak_extra_ratios"]
    d = R.load("default_pipeline")
    return (
        "- `kd_loss_memory.py` runs each variant in a fresh subprocess and reads the kernel's RSS "
        "high-water\n  mark after resetting it; checkpointing per chunk "
        f"({r['div_checkpoint / div_naive_kldiv']:.2f} of naive) lost to a custom autograd\n  "
        f"function ({r['div_chunked_fused / div_naive_kldiv']:.2f}) because each chunk's backward "
        "still allocated a full-size gradient.\n"
        "- `kd_step.py`'s offline-teacher overhead on the tiny model comes from hashing each row "
        "to find its\n  stored logits; at real model sizes the teacher forward it replaces "
        "dominates.\n"
        f"- The default pipeline (`mmkd run pipelines/llava_kd.yaml`, {len(d['stages'])} stages, "
        f"{d['training_stages']} of them Ray Train +\n  DeepSpeed) took "
        f"{minutes(d['run_wall_s'])} wall on a {d['environment']['machine']['cpu_count']}-core "
        f"machine (`default_pipeline.py`, {d['run_id']}"
        + (f", {d['driver_peak_rss_mib']} MiB peak RSS in the driver" if "driver_peak_rss_mib" in d
           else "") + ").\n")
