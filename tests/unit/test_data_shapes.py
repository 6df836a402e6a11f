"""Shapes benchmark: deterministic bytes, answers that are right for the scene drawn."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest

from workloads.data.shapes import COLORS, ShapesConfig, generate_shapes

CFG = ShapesConfig(num_captions=60, num_instruct=60, num_eval=120, shard_size=50, seed=7)


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.tar"))}


def _samples(split_dir):
    out = []
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(files):
            if name.endswith(".json"):
                out.append((json.loads(files[name]), files[name[:-5] + ".png"]))
    return out


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    metrics = generate_shapes(root, CFG)
    assert metrics["shapes/eval_samples"] == 120 and metrics["shapes/eval_shards"] == 3
    return root


def test_same_seed_gives_identical_bytes_other_seed_differs(shapes_dir, tmp_path):
    again = tmp_path / "again"
    generate_shapes(again, CFG)
    assert _digest(again) == _digest(shapes_dir)
    other = tmp_path / "other"
    generate_shapes(other, CFG.model_copy(update={"seed": 8}))
    assert _digest(other) != _digest(shapes_dir)


def test_images_show_the_scene(shapes_dir):
    from PIL import Image

    for meta, png in _samples(shapes_dir / "captions"):
        img = Image.open(io.BytesIO(png)).convert("RGB")
        assert img.size == (32, 32)
        for o in meta["scene"]:
            # The object's centre has exactly its colour (no antialiasing, no overlap).
            assert img.getpixel((int(o["cx"]), int(o["cy"]))) == COLORS[o["color"]]
        cells = {(o["row"], o["col"]) for o in meta["scene"]}
        assert len(cells) == len(meta["scene"]) and 1 <= len(cells) <= 4


def _matches(o, words):
    return all(w in (o["size"], o["color"], o["shape"]) for w in words)


def _referent(scene, description):
    hits = [o for o in scene if _matches(o, description.split())]
    assert len(hits) == 1, f"{description!r} does not pick one object in {scene}"
    return hits[0]


def _expected(question, scene):
    """Answer the question from the scene metadata, independently of the generator."""
    q = question.removeprefix("<image>\n").rstrip("?")
    if q.startswith("What color is the "):
        return _referent(scene, q.removeprefix("What color is the "))["color"]
    if q.startswith("What shape is the "):
        return _referent(scene, q.removeprefix("What shape is the ").removesuffix(" object"))["shape"]
    if q.endswith(" large or small"):
        return _referent(scene, q.removeprefix("Is the ").removesuffix(" large or small"))["size"]
    if q == "How many objects are there":
        return str(len(scene))
    if q.startswith("How many "):
        word = q.removeprefix("How many ").split()[0]
        return str(sum(word.rstrip("s") == o["shape"] or word == o["color"] for o in scene))
    if q.startswith("Is there a "):
        color, shape = q.removeprefix("Is there a ").split()
        return "yes" if any(_matches(o, (color, shape)) for o in scene) else "no"
    if " to the left or right of the " in q:
        a, b = q.removeprefix("Is the ").split(" to the left or right of the ")
        a, b = _referent(scene, a), _referent(scene, b)
        assert a["col"] != b["col"] and abs(a["cx"] - b["cx"]) > 4
        return "left" if a["cx"] < b["cx"] else "right"
    if " above or below the " in q:
        a, b = q.removeprefix("Is the ").split(" above or below the ")
        a, b = _referent(scene, a), _referent(scene, b)
        assert a["row"] != b["row"] and abs(a["cy"] - b["cy"]) > 4
        return "above" if a["cy"] < b["cy"] else "below"
    if q == "Describe the image.":
        parts = [f"a {o['size']} {o['color']} {o['shape']}" for o in scene]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    raise AssertionError(f"unknown question {question!r}")


def test_eval_answers_are_correct_and_all_types_present(shapes_dir):
    samples = _samples(shapes_dir / "eval")
    assert len(samples) == 120
    types = set()
    for meta, _ in samples:
        conv = meta["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"]
        assert conv[0]["value"].startswith("<image>\n")
        assert meta["answer"] == conv[1]["value"] == _expected(conv[0]["value"], meta["scene"])
        assert len(meta["answer"].split()) == 1
        types.add(meta["question_type"])
    assert types == {"color", "shape", "size", "count", "exists", "relation"}


def test_instruct_and_captions_answers_are_correct(shapes_dir):
    turns, multi_turn = 0, 0
    for split in ("instruct", "captions"):
        for meta, _ in _samples(shapes_dir / split):
            conv = meta["conversations"]
            assert conv[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in conv) == 1
            for human, gpt in zip(conv[::2], conv[1::2]):
                assert gpt["value"] == _expected(human["value"], meta["scene"])
                turns += 1
            multi_turn += len(conv) > 2
    assert turns > 150 and multi_turn > 20


def test_validation_split_is_disjoint_from_the_held_out_questions(tmp_path):
    """val/ asks no question eval/ asks (same scene and conversation); a val draw that repeats
    an eval question is skipped; eval/ is what it was before val/ existed."""
    import json
    import tarfile

    from workloads.data.shapes import (ShapesConfig, _question_key, _sample, generate_shapes,
                                       write_split)

    cfg = ShapesConfig(num_captions=0, num_instruct=0, num_eval=60, num_val=60, shard_size=50)
    generate_shapes(tmp_path, cfg)

    def keys(split):
        out = []
        for shard in sorted((tmp_path / split).glob("*.tar")):
            with tarfile.open(shard) as tar:
                out += [m.name[:-5] for m in tar.getmembers() if m.name.endswith(".json")]
                metas = [json.load(tar.extractfile(m)) for m in tar.getmembers()
                         if m.name.endswith(".json")]
                out_q.setdefault(split, []).extend(_question_key(m) for m in metas)
        return out

    out_q: dict = {}
    assert keys("eval") == [f"eval-{i:07d}" for i in range(60)]  # unchanged draws
    assert len(keys("val")) == 60 and not set(out_q["eval"]) & set(out_q["val"])
    # the exclusion itself: val's first two draws made "held out" are skipped
    held = {_question_key(_sample("val", i, cfg)[2]) for i in (0, 1)}
    write_split(tmp_path / "v2", "val", 3, cfg, exclude=held)
    with tarfile.open(tmp_path / "v2" / "val-00000.tar") as tar:
        names = [m.name for m in tar.getmembers() if m.name.endswith(".json")]
    assert names == ["val-0000002.json", "val-0000003.json", "val-0000004.json"]
