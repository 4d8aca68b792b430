"""Turn the fault suite's figures (JSON lines) into a markdown table for docs/RELIABILITY.md.

    INGEST_FAULTS_REPORT=/tmp/faults.jsonl .venv/bin/pytest -m faults
    .venv/bin/python -m tests.faults.report /tmp/faults.jsonl > /tmp/faults.md

Each test appends one line per run; the last line of each test wins, so a file collected
over several runs shows the latest figures. Failed tests are listed with their problems
under the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

COLUMNS = (
    ("Fault", "fault"),
    ("Acknowledged", "acknowledged"),
    ("Stored", "stored"),
    ("Lost", "lost"),
    ("Downloads", "downloads"),
    ("Downloaded twice", "downloaded_twice"),
    ("Over the cap", "extra_downloads"),
    ("Recovery (s)", "recovery_seconds"),
    ("Bound (s)", "bound_seconds"),
)


def load(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The last record of each test, in the order the tests first appear."""
    latest: dict[str, dict[str, Any]] = {}
    for line in lines:
        if line.strip():
            record = json.loads(line)
            latest.pop(record["test"], None)  # re-inserted: ordered by the latest run
            latest[record["test"]] = record
    return list(latest.values())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _short_name(test: str) -> str:
    return test.rsplit("::", 1)[-1].removeprefix("test_").replace("_", " ")


def _other_figures(extra: dict[str, Any]) -> str:
    return ", ".join(f"{key} {_cell(value)}" for key, value in sorted(extra.items())) or "-"


def markdown(records: Sequence[dict[str, Any]]) -> str:
    header = ["Test", *(title for title, _ in COLUMNS), "Other figures", "Result"]
    out = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for record in records:
        cells = [_short_name(record["test"])]
        cells += [_cell(record.get(key)) for _, key in COLUMNS]
        cells.append(_cell(_other_figures(record.get("extra", {}))))
        cells.append("pass" if record.get("passed") else "**FAIL**")
        out.append("| " + " | ".join(cells) + " |")
    failed = [r for r in records if not r.get("passed")]
    if failed:
        out += ["", "Failures:", ""]
        for record in failed:
            out.append(f"- `{record['test']}`")
            out += [f"  - {_cell(problem)}" for problem in record.get("problems", [])]
    passed = len(records) - len(failed)
    out += ["", f"{passed} of {len(records)} fault tests passed."]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "report",
        nargs="?",
        default=os.environ.get("INGEST_FAULTS_REPORT"),
        help="the JSON lines file (default: $INGEST_FAULTS_REPORT)",
    )
    args = parser.parse_args(argv)
    if not args.report:
        parser.error("name the report file (or set INGEST_FAULTS_REPORT)")
    path = Path(args.report)
    if not path.exists():
        parser.error(f"{path} does not exist")
    sys.stdout.write(markdown(load(path.read_text(encoding="utf-8").splitlines())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
