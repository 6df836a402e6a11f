"""The READMEs' numbers are generated from benchmarks/results/*.json (benchmarks/report.py):
the committed blocks must equal what the results give, and a changed result must change them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402
from render import base as fmt  # noqa: E402


def test_committed_readmes_match_the_results():
    """The CI check: `python benchmarks/report.py --check` exits 0."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, (
        f"README blocks are stale; run `python benchmarks/report.py`:\n{proc.stdout[-4000:]}"
        f"{proc.stderr[-2000:]}")


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the docs, results and pipelines the report reads."""
    for doc in report.DOCS:
        (tmp_path / doc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / doc, tmp_path / doc)
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "benchmarks" / "results")
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    return tmp_path


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def test_a_changed_result_changes_the_readme_and_fails_the_check(checkout: Path, capsys):
    assert report.main(["--check", "--root", str(checkout)]) == 0
    edit_json(checkout / "benchmarks/results/kd_gain.json",
              lambda d: d["summary"]["kd_dpt_sft_dft"].update(mean=0.9876))

    assert report.main(["--check", "--root", str(checkout)]) == 1
    diff = capsys.readouterr().out
    assert "+" in diff and "0.988 ± " in diff and "README.md" in diff

    assert report.main(["--root", str(checkout)]) == 0  # rewrite in place
    assert "DPT-SFT-DFT 0.988 ± " in (checkout / "README.md").read_text()
    assert report.main(["--check", "--root", str(checkout)]) == 0


def test_a_changed_default_run_changes_the_table(checkout: Path):
    edit_json(checkout / "benchmarks/results/default_pipeline.json",
              lambda d: d["results"]["teacher"].update({"accuracy/size": 0.1234, "params": 5e6}))
    report.main(["--root", str(checkout)])
    readme = (checkout / "README.md").read_text()
    assert "| teacher | " in readme and " 0.123 |" in readme
    assert "`tiny-teacher`, 5.00M parameters" in readme


def test_only_text_between_markers_changes(checkout: Path):
    readme = checkout / "README.md"
    readme.write_text("hand-written 1.23\n" + readme.read_text() + "\nafter 4.56\n")
    report.main(["--root", str(checkout)])
    text = readme.read_text()
    assert text.startswith("hand-written 1.23\n") and text.endswith("\nafter 4.56\n")


def test_unknown_block_and_unmatched_markers_are_errors(checkout: Path, capsys):
    readme = checkout / "README.md"
    original = readme.read_text()
    readme.write_text(original + "\n<!-- report:nope -->\n<!-- /report:nope -->\n")
    assert report.main(["--check", "--root", str(checkout)]) == 2
    assert "unknown block <!-- report:nope -->" in capsys.readouterr().err
    readme.write_text(original + "\n<!-- report:merge -->\n")
    assert report.main(["--check", "--root", str(checkout)]) == 2
    assert "unmatched report markers" in capsys.readouterr().err


def test_a_missing_results_file_is_named(checkout: Path, capsys):
    (checkout / "benchmarks/results/kd_offline.json").unlink()
    assert report.main(["--check", "--root", str(checkout)]) == 2
    assert "kd_offline.json is missing: run benchmarks/kd_offline.py" in capsys.readouterr().err


def test_every_block_in_the_docs_has_a_renderer_and_every_renderer_is_used():
    used = {name for doc in report.DOCS
            for name in re.findall(r"<!-- report:([\w-]+) -->", (ROOT / doc).read_text())}
    assert used == set(report.BLOCKS)


def test_formatting_helpers():
    assert fmt.pts(0.0722) == "+7.2" and fmt.pts(-0.0033) == "−0.3"
    assert fmt.pm({"mean": 0.37555, "std": 0.0334}) == "0.376 ± 0.033"
    assert fmt.span([0.2, 0.3], fmt.pct_n, "%") == "20-30%"
    assert fmt.span([0.2, 0.2], fmt.pct_n, "%") == "20%"
    assert fmt.minutes(445.7) == "7 min 26 s"
    assert abs(fmt.std_error(0.4, 300) - 0.02828) < 1e-4
    # a wrapped line never starts like a Markdown list item
    text = fmt.para("x " * 48 + "2. item " + "y " * 60)
    assert not any(line.startswith("2. ") for line in text.splitlines())
