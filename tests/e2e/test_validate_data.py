"""`mmkd validate` / `mmkd run` check a sample of the data before any compute: a LLaVA folder of
real images whose `image_root` was forgotten is refused with exit 2, naming `image_root` and
the folder where the images are. Neither command needs Ray for this (it happens first)."""

from __future__ import annotations

import json
import os

from cli_helpers import mmkd

CONV = [{"from": "human", "value": "<image>\nWhat colour is this?"},
        {"from": "gpt", "value": "Blue."}]


def _llava_folder(root, n: int = 60):
    """LLaVA's layout: train.json + images/<subset>/*.jpg|png, `image` relative to images/."""
    from PIL import Image

    (root / "images" / "coco" / "train2017").mkdir(parents=True)
    (root / "images" / "gqa").mkdir()
    entries = []
    for i in range(n):
        rel = f"coco/train2017/{i:012d}.jpg" if i % 2 else f"gqa/{i}.png"
        Image.new("RGB", (32 + i, 24), (i * 4 % 256, 90, 200)).save(root / "images" / rel)
        entries.append({"id": f"s{i}", "image": rel, "conversations": CONV})
    (root / "train.json").write_text(json.dumps(entries))


def _pipeline(path, data, image_root: str | None) -> None:
    source = {"format": "llava_json", "paths": str(data / "train.json")}
    if image_root is not None:
        source["image_root"] = image_root
    path.write_text(json.dumps({"name": "forgot", "stages": {"sft": {
        "workload": "sft", "params": {"model": {"preset": "tiny-student"}, "data": source}}}}))


def test_a_forgotten_image_root_is_refused_before_compute(tmp_path):
    env = {**os.environ, "MMKD_HOME": str(tmp_path / "home"), "COLUMNS": "400"}
    env.pop("RAY_ADDRESS", None)
    data = tmp_path / "llava"
    _llava_folder(data)
    for image_root in (None, str(data)):  # left out, or set to the JSON's own folder
        pipe = tmp_path / "pipe.yaml"
        _pipeline(pipe, data, image_root)
        for command in ("validate", "run"):
            out = mmkd([command, str(pipe)], env, tmp_path, timeout=300)
            text = " ".join((out.stdout + out.stderr).split())
            assert out.returncode == 2, text[-3000:]
            assert "Traceback" not in text
            assert "stage 'sft'" in text and "sampled images found under image_root=" in text
            assert f"did you mean image_root={data / 'images'}?" in text
            assert "empty data shard" not in text

    _pipeline(tmp_path / "fixed.yaml", data, str(data / "images"))
    out = mmkd(["validate", str(tmp_path / "fixed.yaml")], env, tmp_path, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
