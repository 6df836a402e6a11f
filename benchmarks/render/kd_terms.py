"""The ``kd-terms`` block of the README: which KD terms help the tiny default pipeline
(``results/kd_terms.json``, benchmarks/kd_terms.py) and why (``results/kd_probe.json``,
benchmarks/kd_probe.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROWS = [("baseline", "none (baseline, PT → SFT)"),
        ("kd_paper", "L_res + L_vis + L_rel (the paper's weights)"),
        ("kd_no_vis", "**L_res + L_rel, no L_vis: the default now**"),
        ("kd_no_rel", "L_res + L_vis"),
        ("kd_res_only", "L_res only")]


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5
    return mean, std


def _num(values: list[float], signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    if len(values) == 1:
        return fmt.format(values[0])
    mean, std = _mean_std(values)
    return f"{fmt.format(mean)} ± {std:.3f}"


def _terms_table(d: dict[str, Any]) -> list[str]:
    runs = d["runs"]
    seeds = ", ".join(str(s) for s in d["seeds"])
    lines = ["| KD terms in DPT and DFT | accuracy | colour | shape | types below floor | "
             "drop without images |", "|---|---|---|---|---|---|"]
    for key, label in ROWS:
        acc = _num([r["accuracy"][key] for r in runs])
        colour = _num([r["per_type"][key]["color"] for r in runs])
        shape = _num([r["per_type"][key]["shape"] for r in runs])
        below = " / ".join(str(int(r["below_floor_types"][key])) for r in runs)
        drop = _num([r["image_drop"][key] for r in runs], signed=True)
        lines.append(f"| {label} | {acc} | {colour} | {shape} | {below} | {drop} |")
    n = len(runs)
    what = (f"seed {seeds}" if n == 1 else f"student seeds {seeds}, mean ± std; types below "
                                               f"floor per seed")
    return [f"Validation accuracy (500 questions; {what}; `results/kd_terms.json`):", ""] + lines


WITH_VIS = ("dft_paper", "dft_no_rel")                       # beta 1
WITHOUT_VIS = ("baseline_sft", "dft_no_vis", "dft_res_only")  # no L_vis


def _probe_text(p: dict[str, Any]) -> str:
    models = p["models"]

    def colour(stages: tuple[str, ...], layer: str) -> str:
        vals = []
        for st in stages:
            probes = models[st]["probes"]
            key = max((k for k in probes if k.startswith("llm_")), key=lambda k: int(k[4:])) \
                if layer == "last" else layer
            vals.append(f"{probes[key]['color']:.2f}")
        return " / ".join(vals)

    text = (f"Where the colour goes, in the seed-0 models ({p['run']}): a linear probe "
            f"(`benchmarks/kd_probe.py`, "
            f"`results/kd_probe.json`, {p['objects']} objects in {p['scenes']} fresh scenes, "
            f"chance {p['chance']['color']:.2f}) reads an object's colour from its image patches "
            f"at {colour(WITHOUT_VIS, 'projector')} after the projector of the baseline and of the "
            f"students trained without L_vis, but at {colour(WITH_VIS, 'projector')} in the two "
            f"trained with it (last LLM layer: {colour(WITHOUT_VIS, 'last')} against "
            f"{colour(WITH_VIS, 'last')}); every vision tower keeps it "
            f"({colour(WITHOUT_VIS + WITH_VIS, 'vision')}). ")
    teacher = models.get("teacher_sft", {}).get("image_positions")
    if teacher:
        tokens = ", ".join(f"`{t}` {v:.2f}" for t, v in teacher["top_tokens"][:4])
        paper = models[WITH_VIS[0]]["image_positions"]
        copied = ", ".join(f"`{t}` {v:.2f}" for t, v in paper["top_tokens"][:4])
        text += (f"What L_vis copies is the teacher's next-token distribution at the image "
                 f"positions, where cross-entropy trains nothing: entropy "
                 f"{teacher['entropy']:.1f} nats (uniform: {teacher['uniform_entropy']:.1f}), most "
                 f"likely {tokens}, and each position's distribution only "
                 f"{teacher['kl_to_mean']:.2f} nats (KL) from the one shared by all images and "
                 f"positions: a text prior, not a description of the image. The students trained "
                 f"with L_vis reproduce it ({copied}). ")
    return text


def _over_seeds(d: dict[str, Any]) -> tuple[list[str], str]:
    """The paper's terms against the default's (no L_vis) over seeds: a table and a sentence."""
    runs, seeds = d["runs"], ", ".join(str(s) for s in d["seeds"])
    lines = [f"The paper's terms against the default's over student seeds {seeds} "
             f"(validation, `results/kd_terms_paper_vs_no_vis.json`; per seed, then mean ± std):",
             "", "| KD terms | accuracy | colour | shape |", "|---|---|---|---|"]
    for key, label in (("baseline", "none (baseline)"), ("kd_paper", "L_res + L_vis + L_rel"),
                       ("kd_no_vis", "L_res + L_rel (default)")):
        cells = []
        for col in ("accuracy", "color", "shape"):
            vals = [r["accuracy"][key] if col == "accuracy" else r["per_type"][key][col]
                    for r in runs]
            cells.append(" ".join(f"{v:.2f}" for v in vals) + f" ({_num(vals)})")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    diff = [r["accuracy"]["kd_no_vis"] - r["accuracy"]["kd_paper"] for r in runs]
    dcol = [r["per_type"]["kd_no_vis"]["color"] - r["per_type"]["kd_paper"]["color"] for r in runs]
    better = sum(x > 0 for x in diff)
    dshape = [r["per_type"]["kd_no_vis"]["shape"] - r["per_type"]["kd_paper"]["shape"]
              for r in runs]

    def pts(xs: list[float]) -> str:
        mean, std = _mean_std(xs)
        return f"{100 * mean:+.1f} ± {100 * std:.1f}".replace("-", "−")

    mean, std = _mean_std(diff)
    spread = "within the seed spread" if abs(mean) <= std else "beyond the seed spread"
    text = (f"Over these {len(runs)} seeds, dropping L_vis changes validation accuracy by "
            f"{pts(diff)} points (better on {better} of {len(runs)} seeds: {spread}), colour by {pts(dcol)} (higher without L_vis on "
            f"{sum(x > 0 for x in dcol)} of {len(runs)}) and shape by {pts(dshape)} (higher with "
            f"it on {sum(x < 0 for x in dshape)} of {len(runs)}). ")
    return lines, text


def _probe_other_seed(p: dict[str, Any]) -> str:
    """The same probe on a run of the default pipeline at another seed."""
    m = p["models"]
    seed = next((o.split("=")[1] for o in p.get("overrides") or [] if "seed=" in o), "?")
    kd = [st for st in ("student_sft", "student_dft") if st in m]
    return (f"At seed {seed} (`results/kd_probe_default_seed2.json`) the default's students "
            f"answer colour at " + " / ".join(f"{m[st]['answers']['color']:.2f}" for st in kd)
            + " although the probe reads it after their projector at "
            + " / ".join(f"{m[st]['probes']['projector']['color']:.2f}" for st in kd)
            + f", as in the baseline (probe {m['baseline_sft']['probes']['projector']['color']:.2f},"
            f" answers {m['baseline_sft']['answers']['color']:.2f}): the colour reaches the LLM "
            f"in every model, and whether the two-layer student learns to use it varies with the "
            f"seed. So L_vis is not the whole cause, and the cause is not settled. ")


def _recipe_text(two_way: dict[str, Any] | None = None) -> str:
    """What the default pipeline runs now, read from its file, and the validation means."""
    import yaml

    root = Path(__file__).resolve().parents[2]
    stages = yaml.safe_load((root / "pipelines" / "llava_kd.yaml").read_text())["stages"]
    beta = {s: stages[s]["params"].get("beta", 1.0) for s in ("student_dpt", "student_dft")}
    terms = "L_res + L_rel, β = 0" if not any(beta.values()) else \
        "the paper's L_res + L_vis + L_rel"
    why = ""
    if two_way is not None:
        m = two_way["summary"]
        why = (f" (validation over {len(two_way['seeds'])} seeds: {m['kd_no_vis']['mean']:.3f} "
               f"without L_vis against {m['kd_paper']['mean']:.3f} with it, the baseline "
               f"{m['baseline']['mean']:.3f})")
    return (f"The default pipeline (`pipelines/llava_kd.yaml`) distils with {terms}{why}; the "
            f"paper-scale pipelines keep the paper's weights, and `pipelines/tune_kd_weights.yaml` "
            f"searches them.")


def kd_terms_block(R: Any, para: Any) -> str:
    """``para`` wraps prose as report.py's own blocks are wrapped."""
    d = R.load("kd_terms")
    intro = ("**Why were the KD students colour-blind?** With the paper's weights (α = 1, β = 1, "
             "γ = 0.5 in DPT and DFT) both KD students answered colour questions below the floor "
             "of always giving the most frequent colour. `pipelines/kd_term_ablation.yaml` runs "
             "the KD branch with four sets of terms and scores it where recipes are chosen, on "
             "the validation split (the held-out set above only reports).")
    lines = [para(intro).rstrip("\n"), ""] + _terms_table(d)
    r0 = d["runs"][0]["per_type"]
    seeds_text, two_way = "", None
    if (Path(R.dir) / "kd_terms_paper_vs_no_vis.json").exists():
        two_way = R.load("kd_terms_paper_vs_no_vis")
        table, seeds_text = _over_seeds(two_way)
        lines += [""] + table
    seed0 = (f"At seed {d['seeds'][0]}, without L_vis the colour came back "
             f"({r0['kd_paper']['color']:.2f} → {r0['kd_no_vis']['color']:.2f}), and L_rel, which "
             f"matches the similarity structure of the image tokens, carried shape (L_res alone: "
             f"{r0['kd_res_only']['shape']:.2f}; L_res + L_rel: {r0['kd_no_vis']['shape']:.2f}). ")
    if (Path(R.dir) / "kd_probe.json").exists():
        seed0 += _probe_text(R.load("kd_probe"))
    paragraphs = [seed0]
    later = seeds_text
    gain = R.load("kd_gain")
    if "pooled_over_seeds" in gain and (Path(R.dir) / "default_pipeline.json").exists():
        floor = R.load("default_pipeline")["answer_prior"]["per_type"]["color"]
        blind = {k: [(r["seed"], r["per_type"][k]["color"]) for r in gain["runs"]
                     if r["per_type"][k]["color"] < floor]
                 for k in ("baseline_pt_sft", "kd_dpt_sft_dft")}
        later += ("Held out, over the seeds of `results/kd_gain.json`, colour is below its "
                  f"{floor:.3f} floor for " + "; ".join(
                      f"{'the baseline' if k == 'baseline_pt_sft' else 'the KD student'} at "
                      + (", ".join(f"seed {sd} ({v:.2f})" for sd, v in b) if b else "no seed")
                      for k, b in blind.items()) + ". ")
    if (Path(R.dir) / "kd_probe_default_seed2.json").exists():
        later += _probe_other_seed(R.load("kd_probe_default_seed2"))
    if later:
        paragraphs.append(later)
    paragraphs.append(_recipe_text(two_way))
    text = ""
    if (Path(R.dir) / "default_pipeline.json").exists():
        dp = R.load("default_pipeline")
        floor = dp["answer_prior"]["per_type"].get("exists")
        below = {m: r["accuracy/exists"] for m, r in dp["results"].items()
                 if floor is not None and r["accuracy/exists"] < floor}
        if below:
            text += (f"One question type stays at its floor whatever the terms, for the teacher "
                     f"too: `exists` (held-out, above: "
                     + ", ".join(f"{m} {v:.3f}" for m, v in below.items())
                     + f" against {floor:.3f} for always answering the most frequent answer). ")
            if (Path(R.dir) / "exists_budget.json").exists():
                text += _exists_text(R.load("exists_budget"), dp)
            else:
                text += ("No model of this size and training length has learned it; it is not a "
                         "KD effect, and it is still open.")
    if text:
        paragraphs.append(text.strip())
    return "\n".join(lines) + "\n\n" + "\n".join(para(t) for t in paragraphs)


def _exists_text(e: dict[str, Any], dp: dict[str, Any]) -> str:
    """Why `exists` sits at its floor: answers split by what the image holds, and a teacher
    trained 4x longer (``results/exists_budget.json``, benchmarks/exists_budget.py)."""
    d = e["default_pipeline"]["exists"]
    names = {"teacher": "teacher", "baseline_pt_sft": "baseline", "kd_dpt_sft_dft": "KD student"}
    kinds = d["teacher"]["kinds"]
    n_in, n_out = kinds["object present"]["n"], kinds["colour absent"]["n"]
    pairs = ", ".join(f"{names[m]} {d[m]['kinds']['object present']['says_yes']:.2f} vs "
                      f"{d[m]['kinds']['colour absent']['says_yes']:.2f}" for m in names)
    acc = e["teacher_budget"]["accuracy"]
    short, long_ = acc["teacher_sft_300"], acc["teacher_sft_1200"]
    t_long = e["teacher_budget"]["exists"]["teacher_sft_1200"]["kinds"]
    floors = dp["answer_prior"]["per_type"]
    return (f"Why (`benchmarks/exists_budget.py`, `results/exists_budget.json`): no model looks "
            f"at the image for these questions. Split by what the image holds, each says \"yes\" "
            f"about as often when the asked-for object is there ({n_in} questions) as when no "
            f"object has its colour ({n_out}): {pairs}. Its answer comes from the question "
            f"alone. More training does not change that: the same teacher with 4x the SFT steps "
            f"(`pipelines/teacher_budget.yaml`, 1200 instead of 300) scores {long_['overall']:.3f} "
            f"overall ({short['overall']:.3f} at 300) and {long_['exists']:.3f} on `exists`, "
            f"saying \"yes\" {t_long['object present']['says_yes']:.2f} vs "
            f"{t_long['colour absent']['says_yes']:.2f}. Yet it counts the objects of a colour "
            f"well above that type's {floors['count']:.3f} floor ({short['count']:.3f}, "
            f"{long_['count']:.3f} at 1200 steps): the colour reaches it, and what it has not "
            f"learned at this size is to answer the yes/no form with it. This is the task at "
            f"this model size and budget, not a KD effect; which change teaches it (more "
            f"`exists` examples, a larger LLM) is still open.")
