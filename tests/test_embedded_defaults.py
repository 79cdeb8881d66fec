"""The README's first command on a fresh machine: the embedded SQLite database migrates
from nothing and the gateway bootstraps. CI runs the suite on PostgreSQL, so this is what
keeps `python3 dev.py run` working (a migration that PostgreSQL accepts and SQLite refuses
broke it once)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_a_fresh_sqlite_database_migrates_and_bootstraps(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "OTARI_MASTER_KEY")}
    env["OTARI_VAR_DIR"] = str(tmp_path)
    env["CELERY_BROKER_URL"] = ""

    def manage(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    migrated = manage("migrate", "--no-input", "-v", "0")
    assert migrated.returncode == 0, migrated.stderr
    booted = manage("bootstrap")
    assert booted.returncode == 0, booted.stderr
    assert "otari-mk-" in booted.stdout
    assert (tmp_path / "otari.sqlite3").exists()
