"""The shapes benchmark: procedurally drawn scenes with captions, instructions and exact-answer
eval questions, written as WebDataset shards.

Scenes put 1-4 objects into distinct cells of a grid (2x2 by default), so objects never
overlap and "left of"/"above" between objects in different columns/rows is unambiguous;
relation questions are only asked between such objects, and an object is only named by a
description that picks it out uniquely ("the circle" / "the red circle" / "the large red
circle"). Every sample stores its scene in ``extra.scene`` so answers can be re-checked.

Each sample's randomness comes from ``Random(f"shapes-{seed}-{split}-{index}")``, and tar
members carry fixed metadata, so the same seed writes byte-identical shards.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import tarfile
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

from orchestrator.plugin import WorkloadConfig

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (230, 200, 30), "purple": (150, 60, 190), "orange": (240, 130, 30)}
SIZES = ("small", "large")
BACKGROUND = (255, 255, 255)
SPLITS = ("captions", "instruct", "eval", "val")
CAPTION_QUESTION = "Describe the image."
QUESTION_TYPES = ("color", "shape", "size", "count", "exists", "relation")

__all__ = ["ShapesConfig", "make_scene", "render_scene", "caption", "ask", "generate_shapes",
           "add_shapes_arguments", "run_shapes_command", "QUESTION_TYPES"]


class ShapesConfig(WorkloadConfig):
    """Sizes and look of the generated shapes benchmark."""

    num_captions: int = Field(default=2000, ge=0, description="Samples in captions/ (pre-training).")
    num_instruct: int = Field(default=2000, ge=0, description="Samples in instruct/ (SFT QA).")
    num_eval: int = Field(default=500, ge=0, description="Held-out questions in eval/.")
    num_val: int = Field(default=500, ge=0, description="Validation questions in val/, disjoint "
                         "from eval/ (no question about the same scene): recipes and `mmkd tune` "
                         "choose on val, eval only reports.")
    image_size: int = Field(default=32, ge=16, description="Square image side in pixels.")
    min_objects: int = Field(default=1, ge=1, description="Fewest objects in a scene.")
    max_objects: int = Field(default=4, ge=1, le=9, description="Most objects in a scene.")
    shard_size: int = Field(default=1000, ge=1, description="Samples per tar shard.")
    seed: int = Field(default=0, description="Same seed, byte-identical shards.")


# ---- scenes ------------------------------------------------------------------------------

def make_scene(rng: random.Random, cfg: ShapesConfig) -> list[dict[str, Any]]:
    """1-4 objects in distinct grid cells, in reading order (row, then column)."""
    if cfg.min_objects > cfg.max_objects:
        raise ValueError(f"shapes: min_objects={cfg.min_objects} > max_objects={cfg.max_objects}")
    grid = math.ceil(math.sqrt(cfg.max_objects))
    cell = cfg.image_size / grid
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    cells = sorted(rng.sample(range(grid * grid), n))
    objects = []
    for c in cells:
        row, col = divmod(c, grid)
        size = rng.choice(SIZES)
        radius = cell * (0.42 if size == "large" else 0.24)
        # Jitter inside the cell only, so the object never leaves it.
        slack = max(0.0, cell / 2 - radius - 1)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        objects.append({"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)),
                        "size": size, "row": row, "col": col,
                        "cx": round(cx, 2), "cy": round(cy, 2), "r": round(radius, 2)})
    return objects


def render_scene(objects: list[dict[str, Any]], image_size: int) -> bytes:
    """PNG bytes of the scene (no antialiasing: colours stay exact)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        cx, cy, r, fill = o["cx"], o["cy"], o["r"], COLORS[o["color"]]
        if o["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o["shape"] == "square":
            h = r * 0.85
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)],
                         fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def caption(objects: list[dict[str, Any]]) -> str:
    """'a large red circle, a small blue square and a small green triangle'."""
    parts = [f"a {o['size']} {o['color']} {o['shape']}" for o in objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# ---- questions ---------------------------------------------------------------------------

def _describe(objects: list[dict], o: dict, without: str = "") -> str | None:
    """Shortest unique description of ``o`` not using the attribute ``without``."""
    for attrs in (("shape",), ("color", "shape"), ("size", "shape"),
                  ("size", "color", "shape")):
        if without in attrs:
            continue
        if sum(all(p[a] == o[a] for a in attrs) for p in objects) == 1:
            return " ".join(o[a] for a in attrs)
    return None


def _q_color(rng, objects):
    o = rng.choice(objects)
    d = _describe(objects, o, without="color")
    return d and (f"What color is the {d}?", o["color"])


def _q_shape(rng, objects):
    o = rng.choice(objects)
    for attrs in (("color",), ("size", "color")):
        if sum(all(p[a] == o[a] for a in attrs) for p in objects) == 1:
            return f"What shape is the {' '.join(o[a] for a in attrs)} object?", o["shape"]
    return None


def _q_size(rng, objects):
    o = rng.choice(objects)
    d = _describe(objects, o, without="size")
    return d and (f"Is the {d} large or small?", o["size"])


def _q_count(rng, objects):
    kind = rng.choice(("all", "shape", "color"))
    if kind == "all":
        return "How many objects are there?", str(len(objects))
    if kind == "shape":
        s = rng.choice(SHAPES)
        return f"How many {s}s are there?", str(sum(o["shape"] == s for o in objects))
    c = rng.choice(list(COLORS))
    return f"How many {c} objects are there?", str(sum(o["color"] == c for o in objects))


def _q_exists(rng, objects):
    if rng.random() < 0.5:
        o = rng.choice(objects)
        return f"Is there a {o['color']} {o['shape']}?", "yes"
    present = {(o["color"], o["shape"]) for o in objects}
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    c, s = rng.choice(absent)
    return f"Is there a {c} {s}?", "no"


def _q_relation(rng, objects):
    pairs = [(a, b) for a in objects for b in objects if a is not b
             and _describe(objects, a) and _describe(objects, b)]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    da, db = _describe(objects, a), _describe(objects, b)
    options = []
    if a["col"] != b["col"]:
        options.append((f"Is the {da} to the left or right of the {db}?",
                        "left" if a["col"] < b["col"] else "right"))
    if a["row"] != b["row"]:
        options.append((f"Is the {da} above or below the {db}?",
                        "above" if a["row"] < b["row"] else "below"))
    return rng.choice(options)


_ASK: dict[str, Callable] = {"color": _q_color, "shape": _q_shape, "size": _q_size,
                             "count": _q_count, "exists": _q_exists, "relation": _q_relation}


def ask(rng: random.Random, objects: list[dict], qtype: str) -> tuple[str, str] | None:
    """A (question, short answer) of type ``qtype`` about the scene, or None if none is clear."""
    for _ in range(4):  # a few tries: another object may have a unique description
        qa = _ASK[qtype](rng, objects)
        if qa:
            return qa
    return None


def _any_question(rng: random.Random, objects: list[dict], first: str) -> tuple[str, str, str]:
    order = [first] + [t for t in QUESTION_TYPES if t != first]
    for qtype in order:
        qa = ask(rng, objects, qtype)
        if qa:
            return qa[0], qa[1], qtype
    raise AssertionError("count questions always exist")


# ---- samples and shards ------------------------------------------------------------------

def _sample(split: str, index: int, cfg: ShapesConfig) -> tuple[str, bytes, dict]:
    rng = random.Random(f"shapes-{cfg.seed}-{split}-{index}")
    objects = make_scene(rng, cfg)
    meta: dict[str, Any] = {"scene": objects}
    if split == "captions":
        conv = [("<image>\n" + CAPTION_QUESTION, caption(objects))]
    elif split == "instruct":
        conv = []
        for turn in range(rng.randint(1, 3)):
            if rng.random() < 0.15:
                conv.append((CAPTION_QUESTION, caption(objects)))
            else:
                q, a, _ = _any_question(rng, objects, rng.choice(QUESTION_TYPES))
                conv.append((q, a))
        conv[0] = ("<image>\n" + conv[0][0], conv[0][1])
    else:  # eval and val: one question per scene
        # Cycle the question types so the eval split is balanced across them.
        q, a, qtype = _any_question(rng, objects, QUESTION_TYPES[index % len(QUESTION_TYPES)])
        conv = [("<image>\n" + q, a)]
        meta.update(answer=a, question_type=qtype)
    meta["conversations"] = [t for q, a in conv
                             for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    return f"{split}-{index:07d}", render_scene(objects, cfg.image_size), meta


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: reproducible bytes
    tar.addfile(info, io.BytesIO(data))


def _question_key(meta: dict) -> str:
    """What makes two eval questions the same: the scene and the conversation."""
    return json.dumps([meta["scene"], meta["conversations"]], sort_keys=True)


def write_split(out_dir: str | Path, split: str, num: int, cfg: ShapesConfig,
                exclude: set[str] | None = None) -> tuple[list[Path], set[str]]:
    """Write ``num`` samples of ``split`` as ``{split}-NNNNN.tar`` shards into ``out_dir``;
    a sample whose question is in ``exclude`` is skipped (the next index is drawn). Returns the
    shards and the question keys written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards, written, index = [], set(), 0
    for start in range(0, num, cfg.shard_size):
        path = out / f"{split}-{start // cfg.shard_size:05d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for _ in range(start, min(num, start + cfg.shard_size)):
                while True:
                    key, png, meta = _sample(split, index, cfg)
                    index += 1
                    if not exclude or _question_key(meta) not in exclude:
                        break
                if split in ("eval", "val"):
                    written.add(_question_key(meta))
                _add(tar, f"{key}.png", png)
                _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        shards.append(path)
    return shards, written


def generate_shapes(out_dir: str | Path, cfg: ShapesConfig) -> dict[str, float]:
    """Write ``captions/``, ``instruct/``, ``eval/`` and ``val/`` under ``out_dir``; returns
    counts."""
    counts = {"captions": cfg.num_captions, "instruct": cfg.num_instruct, "eval": cfg.num_eval,
              "val": cfg.num_val}
    metrics: dict[str, float] = {}
    held_out: set[str] = set()
    for split, num in counts.items():  # eval before val: val skips every eval question
        shards, written = write_split(Path(out_dir) / split, split, num, cfg,
                                      exclude=held_out if split == "val" else None)
        if split == "eval":
            held_out = written
        metrics[f"shapes/{split}_samples"] = float(num)
        metrics[f"shapes/{split}_shards"] = float(len(shards))
    return metrics


# ---- CLI (wired by the lead as `mmkd data shapes`) ---------------------------------------

def add_shapes_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    d = ShapesConfig()
    parser.add_argument("--out", required=True, help="output folder (gets captions/ instruct/ eval/)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--num-captions", type=int, default=d.num_captions)
    parser.add_argument("--num-instruct", type=int, default=d.num_instruct)
    parser.add_argument("--num-eval", type=int, default=d.num_eval)
    parser.add_argument("--image-size", type=int, default=d.image_size)
    parser.add_argument("--shard-size", type=int, default=d.shard_size)
    return parser


def run_shapes_command(args: argparse.Namespace) -> dict[str, float]:
    cfg = ShapesConfig(seed=args.seed, num_captions=args.num_captions,
                       num_instruct=args.num_instruct, num_eval=args.num_eval,
                       image_size=args.image_size, shard_size=args.shard_size)
    metrics = generate_shapes(args.out, cfg)
    print(json.dumps(metrics, indent=2))
    return metrics


def shapes_cli(argv: list[str] | None = None) -> dict[str, float]:
    """``python -m workloads.data.shapes --out DIR ...``"""
    return run_shapes_command(add_shapes_arguments(argparse.ArgumentParser()).parse_args(argv))


def add_commands(sub: Any) -> None:
    """Entry point ``mmkd.commands``: ``mmkd data shapes --out DIR ...``."""
    data = sub.add_parser("data", help="data set tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("shapes", help="generate the shapes VQA benchmark as WebDataset shards")
    add_shapes_arguments(p)
    p.set_defaults(fn=lambda a: [run_shapes_command(a), 0][-1])  # it returns the data's metrics


if __name__ == "__main__":
    shapes_cli()

