"""Can this teacher be distilled into this student? The checks behind `distill`'s stage start
and `mmkd validate`, for every family: one family on both sides (``family_problem``), identical
tokenizers and image token, and — for KD terms that read image positions — identical
encodings of a few synthetic probe images of different sizes and aspect ratios
(``check_family_pair``). LLaVA-1.5 pairs are compared by vision geometry
(``check_teacher_student``). ``DistillCompatError`` is what every check raises.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["DistillCompatError", "CROSS_TOKENIZER_HINT", "same_vocabulary",
           "PROBE_IMAGE_SIZES", "PROBE_CONVERSATION",
           "check_teacher_student", "check_family_pair", "family_problem", "family_mismatch",
           "describe", "model_dir_family", "spec_family", "student_processor_parts",
           "student_vision"]


class DistillCompatError(ValueError):
    """Teacher and student (or stored teacher logits) cannot be distilled together."""

    deterministic = True  # Ray Train raises it at once (workloads/errors.py)



# (width, height) of the synthetic probe images: square, portrait and a large landscape one, so
# tiling, any-res grids and per-image token counts (Qwen, InternVL, Idefics3) all come into play.
PROBE_IMAGE_SIZES = ((32, 32), (40, 64), (200, 120))
PROBE_CONVERSATION = [{"role": "user", "content": "<image>\nWhat is in the picture?"},
                      {"role": "assistant", "content": "A shape."}]


def _tokenizer_diff(a: Any, b: Any) -> list[str]:
    diffs = []
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        only_a = sorted(set(va) - set(vb))
        only_b = sorted(set(vb) - set(va))
        moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])
        diffs.append(f"vocabularies differ (teacher {len(va)} tokens, student {len(vb)}; only in "
                     f"teacher: {only_a[:5]}, only in student: {only_b[:5]}, different ids: "
                     f"{moved[:5]})")
    sa, sb = a.special_tokens_map, b.special_tokens_map
    if sa != sb:
        keys = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
        diffs.append("special tokens differ: " + ", ".join(
            f"{k}: teacher {sa.get(k)!r} vs student {sb.get(k)!r}" for k in keys))
    return diffs


def same_vocabulary(teacher_dir: str, student_tokenizer: Any) -> bool:
    """The teacher's tokenizer has the student's vocabulary and special tokens."""
    from transformers import AutoTokenizer

    return not _tokenizer_diff(AutoTokenizer.from_pretrained(teacher_dir), student_tokenizer)


def _vision_geometry(cfg: Any) -> tuple[int, int]:
    v = cfg.vision_config
    return int(v.image_size), (int(v.image_size) // int(v.patch_size)) ** 2


def student_vision(spec: dict[str, Any]) -> tuple[int, int]:
    from workloads.models import PRESETS, ModelSpec

    s = ModelSpec.model_validate(spec)
    if s.preset:
        v = PRESETS[s.preset]["vision"]
        return v["image_size"], (v["image_size"] // v["patch_size"]) ** 2
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(s.path or s.parts.vision)
    v = getattr(cfg, "vision_config", cfg)
    return int(v.image_size), (int(v.image_size) // int(v.patch_size)) ** 2


def check_teacher_student(teacher_dir: str, student_tok_dir: str,
                          student_vision: tuple[int, int]) -> None:
    """Raise DistillCompatError unless the teacher at ``teacher_dir`` and the student share the
    tokenizer and produce the same number of image tokens from the same image size."""
    from transformers import AutoConfig, AutoTokenizer

    problems = _tokenizer_diff(AutoTokenizer.from_pretrained(teacher_dir),
                               AutoTokenizer.from_pretrained(student_tok_dir))
    t_size, t_tokens = _vision_geometry(AutoConfig.from_pretrained(teacher_dir))
    s_size, s_tokens = student_vision
    if (t_size, t_tokens) != (s_size, s_tokens):
        problems.append(f"image tokens differ: the teacher turns a {t_size}px image into {t_tokens} "
                        f"tokens, the student a {s_size}px image into {s_tokens}; L_vis/L_rel "
                        f"compare the models token by token, so they need equal counts (use a "
                        f"student vision tower with the teacher's image size and patch size)")
    if problems:
        raise DistillCompatError(
            f"teacher {teacher_dir} and student (tokenizer {student_tok_dir}) cannot be distilled: "
            + "; ".join(problems) + ". Build the student with the teacher's tokenizer "
            "(input `tokenizer`) and a matching vision geometry, " + CROSS_TOKENIZER_HINT + ".")


# ----------------------------------------------------------------------------- any family


def model_dir_family(path: str) -> str | None:
    """The family of the model dir ``path`` (its config.json's ``model_type``, no weights read);
    None where there is no config.json (a merged wrapper, a dir not built yet). Raises
    ValueError for a model type no family covers."""
    from workloads.families import family_of

    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        return None
    with open(cfg_file) as f:
        return family_of(json.load(f).get("model_type")).name


def spec_family(spec: dict[str, Any]) -> str | None:
    """The family of the model a ModelSpec dict names: a preset's ``family`` (none: LLaVA), a
    path's config.json, ``parts`` (always LLaVA); None where a path holds no model yet."""
    if spec.get("path"):
        return model_dir_family(spec["path"]) or spec.get("family")
    if spec.get("parts"):
        return "llava"
    return spec.get("family") or "llava"


def describe(side: str | dict[str, Any], tokenizer_dir: str | None = None) -> str:
    if isinstance(side, str):
        return side
    if side.get("path"):
        return side["path"]
    if side.get("preset"):
        tok = f", tokenizer {tokenizer_dir}" if tokenizer_dir else ""
        return f"preset {side['preset']} ({side.get('family') or 'llava'}{tok})"
    return "parts model"


CROSS_TOKENIZER_HINT = ("or distil across tokenizers with the terms that align replies by text "
                        "only: `alpha: 0, beta: 0, gamma: 0, terms: {uld: 1.0}` (or `span`)")


def family_mismatch(teacher_family: str, student_family: str, teacher: str, student: str) -> str:
    return (f"teacher is {teacher_family}, student is {student_family}: L_res, L_vis and L_rel "
            f"compare the two models token by token on the same input_ids, which needs one "
            f"family (the same tokenizer, chat template and image-token expansion) — teacher "
            f"{teacher}, student {student}. Give the student the teacher's family (e.g. `model: "
            f"{{preset: tiny-student, family: {teacher_family}}}`, or input `init` from a "
            f"{teacher_family} model), use a {student_family} teacher, {CROSS_TOKENIZER_HINT}")


def family_problem(teacher: str | dict[str, Any], student: str | dict[str, Any]) -> str | None:
    """A family mismatch between two sides, each a local model dir or a ModelSpec dict; None
    when they match or a side's family cannot be known without building it."""
    try:
        tf = model_dir_family(teacher) if isinstance(teacher, str) else spec_family(teacher)
        sf = model_dir_family(student) if isinstance(student, str) else spec_family(student)
    except ValueError as e:
        return f"distill: {e}"
    if tf is None or sf is None or tf == sf:
        return None
    return "distill: " + family_mismatch(tf, sf, describe(teacher), describe(student))


def student_processor_parts(spec: dict[str, Any], tokenizer_dir: str | None) -> Any:
    """The student's ``ProcessorParts``: its dir's (``path``), or a family preset's, built
    offline from the tokenizer dir (teacher and student presets share the image geometry)."""
    from workloads.families import load_processor_parts, tiny_processor_parts

    if spec.get("path"):
        return load_processor_parts(spec["path"])
    if not tokenizer_dir:
        raise DistillCompatError(f"distill: the {spec_family(spec)} preset student needs input "
                                 f"`tokenizer: <stage>.tokenizer` (the teacher's tokenizer)")
    return tiny_processor_parts(spec_family(spec), tokenizer_dir)


def _probe_images() -> list[tuple[str, Any]]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [(f"{w}x{h}", Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
            for w, h in PROBE_IMAGE_SIZES]


def _token(parts: Any, ids: Any, i: int) -> str:
    return parts.tokenizer.convert_ids_to_tokens(int(ids[i])) if i < len(ids) else "<end>"


def _probe_difference(teacher: Any, student: Any) -> tuple[str, str] | None:
    """How the two processors' encodings of the probe images first differ: ("ids", what) or
    ("pixels", what); None when input_ids and every image input are equal."""
    import numpy as np

    from workloads.families import encode

    family = student.family
    encoded = [(size, encode(family, teacher, PROBE_CONVERSATION, image),
                encode(family, student, PROBE_CONVERSATION, image))
               for size, image in _probe_images()]
    for size, t, s in encoded:  # token counts first: the likeliest and clearest difference
        nt = int((t["input_ids"] == teacher.image_token_id).sum())
        ns = int((s["input_ids"] == student.image_token_id).sum())
        if nt != ns:
            return "ids", (f"a {size} image becomes {nt} image tokens for the teacher and {ns} "
                           f"for the student")
    for size, t, s in encoded:
        ti, si = t["input_ids"], s["input_ids"]
        if not np.array_equal(ti, si):
            i = next((k for k, (a, b) in enumerate(zip(ti, si)) if a != b), min(len(ti), len(si)))
            return "ids", (f"a {size} image gives different input_ids (first at position {i}: "
                           f"teacher {_token(teacher, ti, i)!r}, "
                           f"student {_token(student, si, i)!r})")
        for key in sorted((set(t) | set(s)) - {"input_ids", "labels"}):
            a, b = t.get(key), s.get(key)
            if a is None or b is None or a.shape != b.shape:
                shape = lambda x: "none" if x is None else tuple(x.shape)  # noqa: E731
                return "pixels", (f"a {size} image gives `{key}` of shape {shape(a)} for the "
                                  f"teacher and {shape(b)} for the student")
            if not np.allclose(a, b, atol=1e-6):
                return "pixels", (f"a {size} image gives different `{key}` values (teacher and "
                                  f"student normalise or resize it differently)")
    return None


def check_family_pair(teacher_dir: str, student: Any, *, image_kd: bool,
                      student_desc: str = "", stage: str | None = None) -> str:
    """Raise DistillCompatError unless the teacher at ``teacher_dir`` and the student (its
    ``ProcessorParts``) can be distilled: one family, identical tokenizers and image token, and
    — with ``image_kd`` (beta or gamma > 0) — identical encodings of the probe images.

    Returns how the online teacher gets its inputs: ``"student"`` (the student's batch: the
    encodings are identical) or ``"own"`` (response KD on the teacher's own encoding)."""
    from transformers import AutoConfig

    from workloads.families import image_token_id, load_processor_parts

    where = f"stage {stage!r}: " if stage else ""
    desc = student_desc or student.family.name
    try:
        tf = model_dir_family(teacher_dir)
    except ValueError as e:
        raise DistillCompatError(f"{where}teacher {teacher_dir}: {e}") from None
    sf = student.family.name
    if tf != sf:
        raise DistillCompatError(where + family_mismatch(tf or "not a model dir", sf, teacher_dir,
                                                          desc))
    teacher = load_processor_parts(teacher_dir)
    problems = _tokenizer_diff(teacher.tokenizer, student.tokenizer)
    t_id = image_token_id(AutoConfig.from_pretrained(teacher_dir))
    if t_id != student.image_token_id:
        problems.append(f"image token ids differ: teacher {t_id}, student {student.image_token_id}")
    if problems:
        raise DistillCompatError(
            f"{where}{sf} teacher {teacher_dir} and student ({desc}) cannot be distilled: "
            + "; ".join(problems) + ". Build the student with the teacher's tokenizer (input "
            "`tokenizer`), start it from a checkpoint that shares the teacher's vocabulary, "
            + CROSS_TOKENIZER_HINT + ".")
    diff = _probe_difference(teacher, student)
    if diff is None:
        return "student"
    if not image_kd:
        return "own"
    kind, what = diff
    verb = "tokenize" if kind == "ids" else "preprocess"
    raise DistillCompatError(
        f"{where}{sf} teacher {teacher_dir} and student ({desc}) {verb} images differently: "
        f"{what}. L_vis (beta) and L_rel (gamma) compare the two models token by token on one "
        f"batch, so they need identical input_ids and pixel inputs for every image; give the "
        f"student the teacher's image processor settings (image size, tiling, patch merge), or "
        f"set `beta: 0` and `gamma: 0` for response KD only.")
