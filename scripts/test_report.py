"""Summaries of the suite's junit XML files (written by scripts/test.sh): every test's duration,
slowest first, into a text file, and one closing line over all tiers.

    python scripts/test_report.py OUT_DIR tier1.xml [tier2.xml ...]

Writes OUT_DIR/durations.txt (seconds, outcome, test id; setup and teardown included, as in
junit) and prints the 15 slowest tests and the combined "N passed, N failed" line.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def main(out_dir: str, *xmls: str) -> int:
    rows, counts = [], {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    for path in xmls:
        if not Path(path).exists():
            continue
        for case in ET.parse(path).getroot().iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed"}.get(child.tag, child.tag)
            counts[outcome] += 1
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            rows.append((float(case.get("time", 0.0)), outcome, name, Path(path).stem))
    rows.sort(reverse=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "durations.txt", "w") as f:
        f.write(f"# {len(rows)} tests, {sum(r[0] for r in rows):.0f} s in all; seconds (setup + "
                "call + teardown), outcome, tier, test\n")
        for t, outcome, name, tier in rows:
            f.write(f"{t:9.2f}  {outcome:7s}  {tier:6s}  {name}\n")
    print(f"slowest tests (all of them in {out / 'durations.txt'}):")
    for t, outcome, name, tier in rows[:15]:
        print(f"  {t:8.1f} s  {tier:6s} {name}")
    print(f"all tiers: {counts['passed']} passed, {counts['failed'] + counts['error']} failed, "
          f"{counts['skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
