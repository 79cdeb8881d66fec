"""Print the figures the drills recorded (tests/drills.py) as a Markdown table:
`python -m tests.drill_report <report.jsonl>`, run by `python3 dev.py soak`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(lines: list[dict]) -> str:
    """One row per drill: its name, then its figures as `name: value` pairs (drills
    measure different things, so the figures are not columns)."""
    rows = ["| drill | figures |", "|---|---|"]
    for line in lines:
        figures = "; ".join(
            f"{key}: {_text(value)}" for key, value in line.items() if key != "drill"
        )
        rows.append(f"| {line.get('drill', '?')} | {figures} |")
    return "\n".join(rows)


def _text(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_text(inner)}" for key, inner in value.items()) + "}"
    return str(value)


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
