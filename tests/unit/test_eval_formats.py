"""Eval examples from the standard benchmarks' own files: LLaVA's evaluation question JSONL with
the answer files as the benchmarks ship them (TextVQA, VQAv2, GQA, POPE), inline answers (MME),
and parquet as HF datasets export benchmarks (MMBench, ScienceQA, MMMU, TextVQA). Images are
drawn by the test. No model, no Ray."""

from __future__ import annotations

import io
import json

import pytest

from workloads.data.eval_examples import iter_eval_examples
from workloads.data.eval_formats import MC_INSTRUCTION, load_answers
from workloads.data.preflight import validate_source
from workloads.data.quality import SampleQuality
from workloads.data.readers import iter_rows
from workloads.data.source import DataSource, fingerprint_source


def _png(color=(200, 30, 30), size=(12, 10)) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(img).rectangle([2, 2, size[0] - 3, size[1] - 3], fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture()
def bench(tmp_path):
    """LLaVA's layout: question files under eval/, images in a separate folder."""
    images = tmp_path / "images"
    images.mkdir()
    for name, color in (("a.jpg", (200, 30, 30)), ("b.jpg", (30, 200, 30)),
                        ("c.jpg", (30, 30, 200))):
        (images / name).write_bytes(_png(color))
    (images / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "eval").mkdir()
    return tmp_path


def _source(bench, questions, **kw) -> DataSource:
    return DataSource(format="llava_eval", paths=str(questions), image_root=str(bench / "images"),
                      **kw)


def test_textvqa_questions_with_the_official_annotation_file(bench):
    # llava_textvqa_val_v051_ocr.jsonl + TextVQA_0.5.1_val.json ({"data": [...]}, 10 answers)
    text = ("what is the brand?\nReference OCR token: nikon\n"
            "Answer the question using a single word or phrase.")
    q = _jsonl(bench / "eval" / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": 34602, "image": "a.jpg", "text": text},
        {"question_id": 34603, "image": "b.jpg", "text": "what color?"}])
    ten = ["nikon"] * 6 + ["nikon d40"] * 3 + ["canon"]
    (bench / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "003a8ae2ef43b901", "answers": ten},
        {"question_id": 34603, "image_id": "0a1b", "answers": ["green"] * 5 + ["lime"] * 5}]}))
    src = _source(bench, q, answers=str(bench / "TextVQA_0.5.1_val.json"))
    first, second = iter_eval_examples(src)
    assert (first.key, first.question_id, first.source) == (
        "34602", "34602", "llava_textvqa_val_v051_ocr.jsonl")
    assert first.answers == ten and first.answer == "nikon"
    assert first.prompt_conversation == [{"from": "human", "value": text}]
    assert first.image.size == (12, 10) and first.options is None
    assert first.meta["image"] == "a.jpg" and first.meta["image_id"] == "003a8ae2ef43b901"
    assert first.question_type == "unknown"
    assert second.answer == "green"  # a tie: the first given


def test_vqav2_annotations_with_answer_dicts(bench):
    q = _jsonl(bench / "eval" / "llava_vqav2_mscoco_val.jsonl", [
        {"question_id": 262148000, "image": "a.jpg", "text": "Where is he looking?"}])
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
               for i, a in enumerate(["down"] * 7 + ["at table"] * 3)]
    (bench / "v2_mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": 262148000, "image_id": 262148, "question_type": "where is the",
         "answer_type": "other", "multiple_choice_answer": "down", "answers": answers}]}))
    (ex,) = iter_eval_examples(_source(bench, q, answers=str(
        bench / "v2_mscoco_val2014_annotations.json")))
    assert ex.answers == ["down"] * 7 + ["at table"] * 3 and ex.answer == "down"
    assert ex.question_type == "where is the"
    assert ex.meta["answer_type"] == "other" and ex.meta["image_id"] == 262148


def test_gqa_answers_keyed_by_question_id(bench):
    q = _jsonl(bench / "eval" / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": "201307251", "image": "b.jpg", "text": "Is the shirt red?"},
        {"question_id": "20143", "image": "c.jpg", "text": "What is it?"},
        {"question_id": "20144", "text": "Which side?"}])
    (bench / "testdev_balanced_questions.json").write_text(json.dumps({
        "201307251": {"answer": "no", "fullAnswer": "No, the shirt is green.", "imageId": "b"},
        "20143": "lamp", "20144": ["left", "right", "left"]}))  # bare answers work too
    a, b, c = iter_eval_examples(_source(bench, q, answers=str(
        bench / "testdev_balanced_questions.json")))
    assert (a.answer, a.answers, a.meta["fullAnswer"]) == ("no", ["no"], "No, the shirt is green.")
    assert (b.question_id, b.answer) == ("20143", "lamp")
    assert (c.answer, c.answers) == ("left", ["left", "right", "left"])


def test_pope_labels_and_categories(bench):
    q = _jsonl(bench / "eval" / "llava_pope_test.jsonl", [
        {"question_id": 1, "image": "a.jpg", "text": "Is there a dog in the image?",
         "category": "adversarial"},
        {"question_id": 2, "image": "b.jpg", "text": "Is there a cup in the image?",
         "category": "random"}])
    labels = _jsonl(bench / "pope_labels.jsonl", [{"question_id": 1, "label": "no"},
                                                  {"question_id": 2, "label": "yes"}])
    exs = list(iter_eval_examples(_source(bench, q, answers=labels)))
    assert [(e.answer, e.question_type, e.meta["category"], e.meta["label"]) for e in exs] == [
        ("no", "adversarial", "adversarial", "no"), ("yes", "random", "random", "yes")]


def test_inline_answers_and_repeated_question_ids(bench):
    # MME as LLaVA writes it: the image path is the question_id, two questions per image.
    q = _jsonl(bench / "eval" / "llava_mme.jsonl", [
        {"question_id": "color/a.jpg", "image": "a.jpg", "category": "color",
         "text": "Is the square red? Please answer yes or no.", "answer": "Yes"},
        {"question_id": "color/a.jpg", "image": "a.jpg", "category": "color",
         "text": "Is the square blue? Please answer yes or no.", "answer": "No"},
        {"question_id": 7, "text": "Say hi.", "answers": ["hi", "hello", "hi"]}])
    exs = list(iter_eval_examples(_source(bench, q)))
    assert [e.key for e in exs] == ["color/a.jpg", "color/a.jpg#2", "7"]
    assert [e.question_id for e in exs] == ["color/a.jpg", "color/a.jpg", "7"]
    assert [e.answer for e in exs] == ["Yes", "No", "hi"]
    assert exs[2].image is None and exs[2].answers == ["hi", "hello", "hi"]


def test_missing_answers_and_bad_images_are_skipped_and_counted(bench):
    q = _jsonl(bench / "eval" / "q.jsonl", [
        {"question_id": 1, "image": "a.jpg", "text": "ok?"},
        {"question_id": 2, "image": "a.jpg", "text": "no answer anywhere?"},
        {"question_id": 3, "image": "broken.jpg", "text": "broken?"},
        {"question_id": 4, "image": "gone.jpg", "text": "missing?"},
        {"question_id": 5, "image": "a.jpg"}])
    ans = _jsonl(bench / "answers.jsonl", [{"question_id": i, "answer": "x"} for i in (1, 3, 4, 5)])
    src = _source(bench, q, answers=ans)
    rows = {r["key"]: r for r in iter_rows(src)}
    assert rows["2"]["bad"] == "malformed_json"
    detail = json.loads(rows["2"]["extra"])["bad_detail"]
    assert "question_id 2" in detail and "answers.jsonl" in detail
    assert rows["4"]["bad"] == "missing_image" and rows["5"]["bad"] == "malformed_json"
    quality = SampleQuality.create(max_bad_fraction=1.0, min_samples=0, use_ray=False)
    assert [e.key for e in iter_eval_examples(src, quality)] == ["1"]
    m = quality.metrics()
    assert m["data/seen"] == 5 and m["data/skipped_malformed_json"] == 2
    assert m["data/skipped_corrupt_image"] == 1 and m["data/skipped_missing_image"] == 1
    # a budget makes too many bad questions an error naming the kind and an example
    strict = SampleQuality.create(max_bad_fraction=0.1, min_samples=0, use_ray=False)
    with pytest.raises(Exception, match="malformed_json"):
        list(iter_eval_examples(src, strict))


def test_every_question_unanswered_is_one_clear_error(bench):
    q = _jsonl(bench / "eval" / "q.jsonl", [{"question_id": i, "text": "?"} for i in (1, 2)])
    wrong = _jsonl(bench / "other_answers.jsonl", [{"question_id": 99, "answer": "x"}])
    with pytest.raises(ValueError, match=r"all 2 samples were skipped.*question_id 1 has no "
                                         r"`answer`.*other_answers.jsonl"):
        list(iter_eval_examples(_source(bench, q, answers=wrong)))
    with pytest.raises(ValueError, match=r"no answers file \(DataSource.answers\)"):
        list(iter_eval_examples(_source(bench, q)))


def test_broken_answers_files_name_the_file_and_field(bench):
    q = _jsonl(bench / "eval" / "q.jsonl", [{"question_id": 1, "text": "?"}])
    (bench / "a.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"answers file .*a\.json: not valid JSON"):
        list(iter_eval_examples(_source(bench, q, answers=str(bench / "a.json"))))
    (bench / "a.jsonl").write_text('{"question_id": 1, "answer": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"a\.jsonl, line 2: not valid JSONL"):
        load_answers(str(bench / "a.jsonl"))
    (bench / "b.json").write_text(json.dumps([{"qid": 1, "answer": "x"}]))
    with pytest.raises(ValueError, match=r"b\.json, record 1: no `question_id` field"):
        load_answers(str(bench / "b.json"))
    (bench / "c.jsonl").write_text('{"question_id": 1, "answer": "x"}\n'
                                   '{"question_id": 1, "answer": "y"}\n')
    with pytest.raises(ValueError, match="question_id 1 appears twice"):
        load_answers(str(bench / "c.jsonl"))
    with pytest.raises(FileNotFoundError, match="DataSource.answers"):
        list(iter_eval_examples(_source(bench, q, answers=str(bench / "nope.json"))))


def _parquet(path, columns: dict) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return str(path)


def test_parquet_mmbench_letter_columns_and_hint(tmp_path):
    img = {"bytes": _png(), "path": "x.png"}
    path = _parquet(tmp_path / "mmbench_dev.parquet", {
        "index": [241, 242], "question": ["Which shape is shown?", "Which color?"],
        "hint": ["The picture is small.", None], "A": ["square", "red"],
        "B": ["circle", "green"], "C": ["cross", None], "D": [None, None],
        "answer": ["A", "A"], "category": ["shape", "color"], "image": [img, img]})
    a, b = iter_eval_examples(DataSource(format="parquet", paths=path))
    assert a.options == {"A": "square", "B": "circle", "C": "cross"}
    assert a.prompt_conversation[0]["value"] == (
        "The picture is small.\nWhich shape is shown?\nA. square\nB. circle\nC. cross\n"
        + MC_INSTRUCTION)
    assert (a.key, a.question_id, a.answer, a.answers) == ("241", "241", "A", ["A"])
    assert a.image.size == (12, 10) and a.question_type == "shape"
    assert a.meta["category"] == "shape" and "A" not in a.meta and "D" not in a.meta
    assert b.options == {"A": "red", "B": "green"}
    assert b.prompt_conversation[0]["value"].startswith("Which color?\nA. red\nB. green\n")


def test_parquet_scienceqa_choices_index_and_mmmu_options_string(tmp_path):
    sqa = _parquet(tmp_path / "scienceqa.parquet", {
        "image": [_png(), None], "question": ["Which is a mammal?", "Pick two."],
        "choices": [["frog", "whale", "trout"], ["1", "2"]], "answer": [1, 0],
        "hint": ["", ""], "subject": ["natural science", "language"]})
    a, b = iter_eval_examples(DataSource(format="parquet", paths=sqa))
    assert (a.answer, a.options, a.meta["subject"]) == (
        "B", {"A": "frog", "B": "whale", "C": "trout"}, "natural science")
    assert a.image is not None and b.image is None and b.answer == "A"
    mmmu = _parquet(tmp_path / "mmmu.parquet", {
        "id": ["validation_Art_1"], "question": ["<image 1> Which era?"],
        "options": ["['Baroque', 'Rococo']"], "answer": ["B"], "image": [{"bytes": _png(),
                                                                         "path": None}]})
    (ex,) = iter_eval_examples(DataSource(format="parquet", paths=mmmu))
    assert (ex.question_id, ex.options, ex.answer) == (
        "validation_Art_1", {"A": "Baroque", "B": "Rococo"}, "B")


def test_parquet_vqa_answers_list_and_answers_file(tmp_path):
    path = _parquet(tmp_path / "textvqa.parquet", {
        "question_id": [5, 6], "question": ["what brand?", "what year?"],
        "answers": [["sony"] * 8 + ["sonny"] * 2, None], "image": [_png(), _png()]})
    ans = _jsonl(tmp_path / "answers.jsonl", [{"question_id": 6, "answers": ["1999"] * 10}])
    a, b = iter_eval_examples(DataSource(format="parquet", paths=path, answers=ans))
    assert (a.answer, len(a.answers)) == ("sony", 10)
    assert (b.answer, b.answers) == ("1999", ["1999"] * 10)


def test_conversation_formats_keep_working_with_the_new_fields(tmp_path):
    conv = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "eval.json").write_text(json.dumps([
        {"id": "q1", "image": "a.png", "conversations": conv, "question_type": "color"}]))
    (ex,) = iter_eval_examples(DataSource(format="llava_json", paths=str(tmp_path / "eval.json")))
    assert (ex.key, ex.question_id, ex.answer, ex.answers, ex.options) == (
        "q1", "q1", "red", ["red"], None)
    assert ex.question_type == "color" and ex.meta == {"image": "a.png"}
    assert ex.prompt_conversation == conv[:1]


def test_source_design_answers_in_cache_keys_and_validate(bench):
    q = _jsonl(bench / "eval" / "q.jsonl", [{"question_id": 1, "image": "a.jpg", "text": "?"}])
    ans = _jsonl(bench / "answers.jsonl", [{"question_id": 1, "answer": "x"}])
    src = _source(bench, q, answers=ans)
    assert src.external_paths() == [q, ans, str(bench / "images")]
    before = fingerprint_source(src)
    _jsonl(bench / "answers.jsonl", [{"question_id": 1, "answer": "a changed answer"}])
    assert fingerprint_source(src) != before
    assert validate_source(src) == []
    unanswered = validate_source(_source(bench, q, answers=str(bench / "nope.jsonl")))
    assert len(unanswered) == 1 and "nope.jsonl" in unanswered[0]
    with pytest.raises(ValueError, match="DataSource.answers is only read for format"):
        DataSource(format="webdataset", paths=str(bench), answers=ans)


def test_answers_jsonl_is_streamed_and_json_is_capped(tmp_path, monkeypatch):
    """Bounded reads (#23 item 5): JSONL answers are read line by line (the 1 MB blocks split
    lines anywhere), a JSON answers file over the cap is refused naming the file and the
    variable that raises it."""
    import json as _json

    import workloads.data.eval_formats as ef

    path = tmp_path / "answers.jsonl"
    rows = [{"question_id": str(i), "answer": "x" * (i % 700)} for i in range(4000)]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(_json.dumps(r) for r in rows).encode())
    answers = ef.load_answers(str(path))
    assert len(answers.by_id) == 4000 and answers.by_id["3999"]["answer"] == "x" * (3999 % 700)

    big = tmp_path / "answers.json"
    big.write_text(_json.dumps(rows[:10]))
    monkeypatch.setattr(ef, "MAX_ANSWERS_JSON_BYTES", 100)
    with pytest.raises(ValueError, match="over the 100 parsed in one piece.*MMKD_MAX_ANSWERS"):
        ef.load_answers(str(big))
