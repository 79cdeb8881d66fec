"""CI cannot skip the browser tests silently: OTARI_REQUIRE_BROWSER=1 fails the run."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import CALENDAR_INSTANTS, REPO


def _collect(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "tests/admin/test_browser.py", "-q", "-rs", "--co"],
        cwd=REPO,
        env={**os.environ, "OTARI_CHROMIUM": "/nonexistent/chromium", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_missing_chromium_skips_with_the_reason_locally():
    result = _collect(OTARI_REQUIRE_BROWSER="")
    assert result.returncode == 0, result.stdout + result.stderr
    # Two browser tests, each at every instant of the calendar guard.
    assert f"{2 * len(CALENDAR_INSTANTS)} tests collected" in result.stdout


def test_missing_chromium_fails_the_run_when_required():
    result = _collect(OTARI_REQUIRE_BROWSER="1")
    assert result.returncode != 0
    assert "OTARI_REQUIRE_BROWSER=1 but headless browser tests need Debian's chromium" in (
        result.stdout + result.stderr
    )
