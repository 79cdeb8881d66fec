"""Fault drills (docs/RELIABILITY.md): tests marked `drill` break something on purpose
for a while and check the books afterwards.

A drill runs for `drill_seconds()`: a few seconds in the suite (CI runs every drill at
that length on every change), the full length under `python3 dev.py soak`, which sets
OTARI_SOAK=1. What a drill measured is recorded with `record()`; the soak command prints
the records as the table of docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any


def soaking() -> bool:
    return os.environ.get("OTARI_SOAK") == "1"


def drill_seconds(short: float, full: float = 60.0) -> float:
    """How long a drill runs: `short` in the suite, `full` in the soak."""
    return full if soaking() else short


def record(drill: str, **figures: Any) -> None:
    """Keep a drill's figures (requests, failures by status, holds leaked, rows lost,
    reports lost, overspend, p99...) for the soak's report. Outside the soak the figures
    only go to the test's output."""
    line = json.dumps({"drill": drill, **figures}, default=_plain, sort_keys=False)
    sys.stdout.write(f"drill figures: {line}\n")
    path = os.environ.get("OTARI_DRILL_REPORT")
    if path:
        with Path(path).open("a", encoding="utf-8") as report:
            report.write(line + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")
