"""Print the figures the drills recorded (tests/drills.py) as a Markdown table:
`python -m tests.drill_report <report.jsonl>`, run by `python3 dev.py soak`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(lines: list[dict]) -> str:
    columns: list[str] = []
    for line in lines:
        columns += [key for key in line if key not in columns]
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for line in lines:
        rows.append("| " + " | ".join(str(line.get(key, "")) for key in columns) + " |")
    return "\n".join(rows)


def main(path: str) -> None:
    report = Path(path)
    lines = (
        [json.loads(text) for text in report.read_text().splitlines() if text.strip()]
        if report.exists()
        else []
    )
    sys.stdout.write((table(lines) if lines else "No drill recorded any figures.") + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
