"""A user evaluates models on a benchmark's own files through the CLI: real images (scikit-learn's
handwritten digits) written as a LLaVA evaluation question file + answer file (VQA-style, ten
annotators), as conversation JSON and as Parquet the way HF datasets export a multiple-choice
benchmark. Every format evaluates end to end; the table has intervals and a paired comparison.

One of the two models is a "yes-sayer" built by hand, so its scores are known counts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from cli_helpers import mmkd

pytestmark = pytest.mark.slow


def _digits(folder: Path, n: int) -> list[tuple[str, int, bytes]]:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = Image.fromarray((d.images[i] * 255 / 16).astype("uint8")).convert("RGB")
        img = img.resize((32, 32))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        name = f"digit_{i:03d}.png"
        (folder / name).write_bytes(buf.getvalue())
        out.append((name, int(d.target[i]), buf.getvalue()))
    return out


def test_three_benchmark_formats_end_to_end(cli_env, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from mmkd_test_plugins.data_tiny import build_tiny_data
    from workloads.models import build_model, save_model
    from mmkd_test_plugins.train_fixtures import yes_sayer

    n = 30
    digits = _digits(tmp_path / "bench" / "images", n)
    # LLaVA eval question file + answers file; "yes" is one annotator's answer on even digits
    with open(tmp_path / "bench" / "questions.jsonl", "w") as f:
        for i, (name, _, _) in enumerate(digits):
            f.write(json.dumps({"question_id": i, "image": name, "category": "digits",
                                "text": "Is the digit even? Answer yes or no."}) + "\n")
    with open(tmp_path / "bench" / "answers.jsonl", "w") as f:
        for i, (_, label, _) in enumerate(digits):
            truth = "yes" if label % 2 == 0 else "no"
            f.write(json.dumps({"question_id": i, "answers": [truth] * 9 + ["maybe"]}) + "\n")
    # conversation JSON (LLaVA's training format): exact match on the gpt reply
    conv = [{"id": f"c{i}", "image": name, "conversations": [
        {"from": "human", "value": "<image>\nIs the digit odd?"},
        {"from": "gpt", "value": "yes" if label % 2 else "no"}]}
        for i, (name, label, _) in enumerate(digits)]
    (tmp_path / "bench" / "conversations.json").write_text(json.dumps(conv))
    # Parquet as HF datasets export a multiple-choice benchmark (image bytes, A/B columns)
    pq.write_table(pa.table({
        "index": list(range(n)), "question": ["Is the digit small (below 5)?"] * n,
        "A": ["yes"] * n, "B": ["no"] * n,
        "answer": ["A" if label < 5 else "B" for _, label, _ in digits],
        "image": [{"bytes": png, "path": name} for name, _, png in digits]}),
        tmp_path / "bench" / "mc.parquet")

    data = build_tiny_data(tmp_path / "tiny", num_samples=40, vocab_size=320)
    torch.manual_seed(0)
    random_dir = save_model(*build_model({"preset": "tiny-student"}, data["tokenizer"]),
                            str(tmp_path / "models" / "random" / "model"))
    torch.manual_seed(1)
    model, proc = build_model({"preset": "tiny-student"}, data["tokenizer"])
    yes_dir = save_model(yes_sayer(model, proc), proc, str(tmp_path / "models" / "yes" / "model"))
    bench = tmp_path / "bench"
    models = f"{{random: {random_dir}, yes_sayer: {yes_dir}}}"
    (tmp_path / "bench.yaml").write_text(f"""
name: digits_bench
stages:
  vqa:
    workload: evaluate
    params:
      models: {models}
      metric: vqa
      data: {{format: llava_eval, paths: {bench / 'questions.jsonl'}, image_root: {bench / 'images'},
              answers: {bench / 'answers.jsonl'}}}
  conversations:
    workload: evaluate
    params:
      models: {models}
      data: {{format: llava_json, paths: {bench / 'conversations.json'}, image_root: {bench / 'images'}}}
  multiple_choice:
    workload: evaluate
    params:
      models: {models}
      metric: multiple_choice
      data: {{format: parquet, paths: {bench / 'mc.parquet'}}}
""")
    # a typical mistake first: a model path that holds no model fails `validate`, in one line
    (tmp_path / "typo.yaml").write_text((tmp_path / "bench.yaml").read_text().replace(
        str(yes_dir), str(tmp_path / "models" / "yes")))
    bad = mmkd(["validate", str(tmp_path / "typo.yaml")], cli_env, tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "models.yes_sayer" in bad.stderr and "holds no model" in bad.stderr
    out = mmkd(["run", str(tmp_path / "bench.yaml"), "--plain"], cli_env, tmp_path, timeout=600,
               check=True)
    assert "yes_sayer − random:" in out.stdout and "pts [" in out.stdout
    run = json.loads(next((Path(cli_env["MMKD_HOME"]) / "runs").glob("*/run.json")).read_text())
    tables = {s: json.loads((Path(run["stages"][s]["uri"]) / "results" / "results.json")
                            .read_text()) for s in ("vqa", "conversations", "multiple_choice")}
    even = sum(label % 2 == 0 for _, label, _ in digits)
    odd, small = n - even, sum(label < 5 for _, label, _ in digits)
    # VQA soft accuracy: "yes" matches 9 of 10 annotators on even digits -> 1.0, else 0
    assert tables["vqa"]["results"]["yes_sayer"]["accuracy"] == pytest.approx(even / n)
    # exact match on the conversation reply "yes" for odd digits
    assert tables["conversations"]["results"]["yes_sayer"]["accuracy"] == pytest.approx(odd / n)
    # multiple choice: "yes" is option A's text, extracted to A, right on small digits
    assert tables["multiple_choice"]["results"]["yes_sayer"]["accuracy"] == pytest.approx(small / n)
    for t in tables.values():
        r = t["results"]["yes_sayer"]
        assert r["accuracy_low"] < r["accuracy"] < r["accuracy_high"] and r["n"] == n
        [c] = t["comparisons"]
        assert (c["a"], c["b"]) == ("random", "yes_sayer") and 0 < c["p"] <= 1
