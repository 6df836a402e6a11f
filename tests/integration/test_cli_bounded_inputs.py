"""Inputs that would exhaust the machine or escape the store get a named error at the CLI
(#23 item 5): exit 2 and one paragraph naming the file, field and limit, no traceback. The CLI
runs in-process (``orchestrator.cli.main``): what a user sees is its exit code and stderr."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from orchestrator.cli import main


def _cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_paragraph(text: str) -> bool:
    return "Traceback" not in text and "\n\n" not in text.strip()


def test_a_yaml_nested_thousands_deep_is_refused(capsys, tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("name: x\nstages: " + "[" * 3000 + "]" * 3000 + "\n")  # 6 KB
    code, _, err = _cli(capsys, "validate", str(path))
    assert code == 2 and str(path) in err and "nested too deeply" in err
    assert _one_paragraph(err)


def test_a_pipeline_file_too_large_is_refused(capsys, tmp_path, monkeypatch):
    import orchestrator.yaml_lines as yl

    monkeypatch.setattr(yl, "MAX_FILE_BYTES", 1000)
    path = tmp_path / "big.yaml"
    path.write_text("name: x\nstages: {}\n# " + "x" * 2000 + "\n")
    code, _, err = _cli(capsys, "validate", str(path))
    assert code == 2 and "more than the 1,000" in err and "MMKD_MAX_PIPELINE_BYTES" in err


def test_a_matrix_over_the_cap_names_its_size(capsys, tmp_path):
    values = list(range(20))
    matrix = {f"params.p{i}": values for i in range(6)}  # 20^6 = 64M stages
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps({"name": "m", "stages": {
        "a": {"workload": "noop", "matrix": matrix}}}))
    code, _, err = _cli(capsys, "validate", str(path))
    assert code == 2 and "64,000,000 stages" in err and "MMKD_MAX_MATRIX" in err
    assert "stage 'a'" in err


def test_an_input_sub_path_cannot_climb_out_of_its_stage(capsys, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent("""
        name: p
        stages:
          a: {workload: noop}
          b: {workload: noop, inputs: {x: a.result/../../../../etc}}
    """))
    code, _, err = _cli(capsys, "validate", str(path))
    assert code == 2 and "stays inside the stage's output folder" in err
    assert "a.result/../../../../etc" in err


@pytest.mark.parametrize("run_id", ["../../x", "run-1234/../../etc", "/etc/passwd"])
def test_show_refuses_what_is_not_a_run_id(capsys, tmp_path, monkeypatch, run_id):
    monkeypatch.setenv("MMKD_HOME", str(tmp_path / "home"))
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "run.json").write_text("{}")
    code, _, err = _cli(capsys, "show", run_id)
    assert code == 2 and "is not a run id" in err and "mmkd runs" in err


def test_error_text_with_brackets_prints_as_written(capsys, tmp_path, monkeypatch):
    """Rich would read `[/data/x]` as a closing markup tag and crash the console."""
    from orchestrator.run_records import RunRecord, StageRecord

    monkeypatch.setenv("MMKD_HOME", str(tmp_path / "home"))
    rec = RunRecord(run_id="run-0badc0de", pipeline="p", path="p.yaml", overrides=[],
                    started=0.0, driver="d", status="failed",
                    error="stage 'a' failed: cannot read [/data/x] [bold]")
    rec.stages = {"a": StageRecord(name="a", workload="noop", key="k" * 64, status="failed",
                                   error="cannot read [/data/x]")}
    rec.save()
    code, out, err = _cli(capsys, "show", "run-0badc0de")
    assert code == 0, err
    assert "cannot read [/data/x] [bold]" in out and "cannot read [/data/x]" in out


@pytest.mark.parametrize("command", [["jobs"], ["status", "job-1"]])
def test_the_token_never_goes_over_plain_http_to_another_host(capsys, monkeypatch, command):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a-token")
    code, _, err = _cli(capsys, *command, "--address", "http://10.0.0.5:8265")
    assert code == 2 and "clear text over http://" in err and "--insecure" in err
    assert "a-token" not in err


def test_the_token_may_go_to_a_tunnel_on_this_machine(capsys, monkeypatch):
    """http://127.0.0.1 (an SSH tunnel) passes the transport check and reaches the client,
    which finds nothing listening there."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a-token")
    code, _, err = _cli(capsys, "jobs", "--address", "http://127.0.0.1:9")
    assert code == 2 and "clear text" not in err and "cannot reach" in err


def test_parent_runs_are_named_by_pipeline_and_what_differs():
    from orchestrator.loader import load_pipeline
    from orchestrator.runner import parent_run_name

    root = Path(__file__).resolve().parents[2]
    pipe = load_pipeline(root / "pipelines" / "llava_kd.yaml")
    assert parent_run_name(pipe, [], "run-0") == "llava_kd · seed 0"
    assert parent_run_name(pipe, ["stages.student_dft.params.beta=0"], "run-0") == \
        "llava_kd · seed 0, student_dft.beta=0"
    assert parent_run_name(pipe, ["defaults.params.seed=3"], "run-0") == \
        "llava_kd · defaults.seed=3"


def test_ui_opens_on_the_pipelines_runs_page(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from orchestrator.ui import runs_page as _runs_page
    from orchestrator.run_records import RunRecord

    monkeypatch.setenv("MMKD_HOME", str(tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = MlflowClient(uri).create_experiment("llava_kd")
    assert _runs_page(uri, "http://127.0.0.1:5000", None) == "http://127.0.0.1:5000"
    RunRecord(run_id="run-00000001", pipeline="llava_kd", path="p.yaml", overrides=[],
              started=1.0, driver="d").save()
    assert _runs_page(uri, "http://127.0.0.1:5000", None) == \
        f"http://127.0.0.1:5000/#/experiments/{exp}/runs"


@pytest.fixture
def bad_config_dir(tmp_path):
    """A checkpoint folder whose config.json fails transformers' own validation: 1 layer, 2
    layer_types (seen: it made huggingface_hub raise an exception Ray could not carry)."""
    from transformers import Qwen2VLConfig

    cfg = Qwen2VLConfig(text_config={"num_hidden_layers": 1, "hidden_size": 32,
                                     "num_attention_heads": 2, "num_key_value_heads": 1,
                                     "intermediate_size": 64}).to_dict()
    cfg["text_config"]["layer_types"] = ["full_attention", "full_attention"]
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("stage", [
    "{workload: hub_model, params: {repo: DIR}}",
    "{workload: sft, inputs: {data: d.result}, params: {model: {path: DIR}, max_steps: 1}}",
])
def test_validate_loads_every_local_model_config(capsys, tmp_path, bad_config_dir, stage):
    path = tmp_path / "p.yaml"
    path.write_text("name: p\nstages:\n  d: {workload: noop}\n  m: "
                    + stage.replace("DIR", str(bad_config_dir)) + "\n")
    code, _, err = _cli(capsys, "validate", str(path))
    assert code == 2 and "stage 'm'" in err and f"{bad_config_dir}/config.json" in err
    assert "num_hidden_layers" in err and "layer_types" in err and "Traceback" not in err


def test_a_full_disk_is_reported_as_such_not_as_a_bug(capsys, tmp_path, monkeypatch):
    """ENOSPC while writing the tracking journal (or anywhere): exit 2, 'disk full at PATH'."""
    import errno

    import orchestrator.tracking as tracking

    def full(self, op, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "journal.jsonl"))

    monkeypatch.setenv("MMKD_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tracking.Tracker, "_do", full)
    path = tmp_path / "p.yaml"
    path.write_text("name: p\nstages:\n  a: {workload: noop}\n")
    code, _, err = _cli(capsys, "run", str(path), "--plain")
    assert code == 2 and f"disk full at {tmp_path / 'journal.jsonl'}" in err
    assert "bug" not in err.lower() and "Traceback" not in err


@pytest.mark.parametrize("name", ["../../x", "a/b", ".hidden"])
def test_a_tune_name_is_a_folder_name(capsys, tmp_path, name):
    root = Path(__file__).resolve().parents[2]
    spec = tmp_path / "t.yaml"
    spec.write_text(f"pipeline: {root / 'pipelines' / 'llava_kd.yaml'}\nstage: student_dft\n"
                    f"space: {{alpha: {{uniform: [0, 1]}}}}\nname: {json.dumps(name)}\n")
    code, _, err = _cli(capsys, "tune", str(spec))
    err = " ".join(err.split())
    assert code == 2 and "field 'name'" in err and "results folder" in err
    assert "Traceback" not in err


def test_tar_members_over_the_cap_are_not_read(capsys, tmp_path, monkeypatch):
    """A shard whose samples carry an oversized non-image member (a 20 GB `.json` would kill
    the read task) is refused by `validate`: the members are never read, the report names the
    member and the variable that raises the cap."""
    import io
    import tarfile

    import workloads.data.readers as readers
    from PIL import Image

    monkeypatch.setattr(readers, "MAX_MEMBER_BYTES", 1000)
    shards = tmp_path / "shards"
    shards.mkdir()
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    big = json.dumps({"conversations": [{"from": "human", "value": "<image>\n" + "x" * 5000},
                                        {"from": "gpt", "value": "red"}]}).encode()
    with tarfile.open(shards / "part-0.tar", "w") as tar:
        for i in range(8):
            for ext, data in (("png", png.getvalue()), ("json", big)):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "p.yaml"
    path.write_text(json.dumps({"name": "p", "stages": {"e": {
        "workload": "evaluate", "params": {"models": {"m": str(tmp_path)},
                                           "data": {"format": "webdataset",
                                                    "paths": [str(shards)]}}}}}))
    code, _, err = _cli(capsys, "validate", str(path))
    err = " ".join(err.split())
    assert code == 2 and "s000.json" in err and "MMKD_MAX_TAR_MEMBER_BYTES" in err, err


def test_cluster_token_without_aws_credentials_is_one_paragraph(capsys, tmp_path, monkeypatch):
    """Tried as a user would on a laptop with no AWS access: exit 2 and what to check, not an
    internal error."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    code, _, err = _cli(capsys, "cluster", "token", "--region", "us-west-2")
    err = " ".join(err.split())
    assert code == 2 and "NoCredentialsError" in err and "AWS credentials" in err
    assert "bug in mmkd" not in err and "Traceback" not in err


def test_an_answers_json_over_the_cap_is_refused_before_it_is_parsed(capsys, tmp_path,
                                                                      monkeypatch):
    """A JSON answers file is parsed in one piece, so its size is checked first: over the cap
    `validate` names the file and the variable that raises it (JSONL answers are streamed)."""
    import workloads.data.eval_formats as eval_formats
    from PIL import Image

    monkeypatch.setattr(eval_formats, "MAX_ANSWERS_JSON_BYTES", 1000)
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "image": "a.png",
                                             "text": "What colour?"}) + "\n" for i in range(40)))
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps([{"question_id": i, "answer": "red" * 20} for i in range(40)]))
    path = tmp_path / "p.yaml"
    path.write_text(json.dumps({"name": "p", "stages": {"e": {
        "workload": "evaluate", "params": {"models": {"m": str(tmp_path)}, "data": {
            "format": "llava_eval", "paths": str(questions), "answers": str(answers),
            "image_root": str(tmp_path / "img")}}}}}))
    code, _, err = _cli(capsys, "validate", str(path))
    err = " ".join(err.split())
    assert code == 2 and "answers.json" in err and "MMKD_MAX_ANSWERS_JSON_BYTES" in err, err
    assert _one_paragraph(err), err
