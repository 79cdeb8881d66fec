#!/usr/bin/env python3
"""Developer entry point; needs nothing but Python 3.11+.

    python3 dev.py run     # the gateway on 127.0.0.1:8000 (SQLite and no broker by default)
    python3 dev.py test    # the test suite (pytest arguments may follow)
    python3 dev.py lint    # ruff check and format check
    python3 dev.py soak    # the fault drills at full length, with their figures (PostgreSQL, Redis)

Each command creates `.venv/` on first use and installs the project into it, again only
when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"


def _ensure_venv(extras: str = "") -> None:
    if sys.version_info < (3, 11):
        sys.exit("Python 3.11 or newer is required")
    if not PYTHON.exists():
        print("Creating .venv ...", flush=True)
        venv.create(VENV, with_pip=True)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    stamp = VENV / f".installed-{extras or 'base'}-{digest}"
    if not stamp.exists():
        target = f".[{extras}]" if extras else "."
        print(f"Installing {target} into .venv ...", flush=True)
        subprocess.run(
            [PYTHON, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-e", target],
            cwd=ROOT,
            check=True,
        )
        for old in VENV.glob(f".installed-{extras or 'base'}-*"):
            old.unlink()
        stamp.touch()


def _run(*args: str | Path) -> None:
    result = subprocess.run([str(a) for a in args], cwd=ROOT)
    if result.returncode:
        sys.exit(result.returncode)


def run(argv: list[str]) -> None:
    _ensure_venv()
    host = os.environ.get("OTARI_HOST", "127.0.0.1")
    port = os.environ.get("OTARI_PORT", "8000")
    _run(PYTHON, "manage.py", "migrate", "--no-input", "-v", "0")
    _run(PYTHON, "manage.py", "bootstrap")
    print(f"The gateway listens on http://{host}:{port} (Ctrl+C stops it).", flush=True)
    os.execv(
        PYTHON,
        [
            str(PYTHON),
            "-m",
            "uvicorn",
            "otari.asgi:application",
            "--host",
            host,
            "--port",
            port,
            "--lifespan",
            "on",
            "--no-access-log",
            *argv,
        ],
    )


def test(argv: list[str]) -> None:
    _ensure_venv("dev")
    _run(PYTHON, "-m", "pytest", *argv)


def soak(argv: list[str]) -> None:
    """The drills of docs/RELIABILITY.md at full length (about 10 minutes): the tests
    marked `drill`, with OTARI_SOAK=1, then their figures as a table. They need
    PostgreSQL and Redis, as CI does; DATABASE_URL defaults to the local server."""
    _ensure_venv("dev")
    env = dict(os.environ)
    env.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/otari_soak")
    env.update(OTARI_SOAK="1", OTARI_REQUIRE_POSTGRES="1")
    report = ROOT / ".soak-report.jsonl"
    report.unlink(missing_ok=True)
    env["OTARI_DRILL_REPORT"] = str(report)
    result = subprocess.run(
        # A full-length drill may outlast the suite's 300 s per test on a loaded machine.
        [
            str(PYTHON),
            "-m",
            "pytest",
            "-m",
            "drill",
            "-p",
            "no:cacheprovider",
            "--timeout=900",
            *argv,
        ],
        cwd=ROOT,
        env=env,
    )
    _run(PYTHON, "-m", "tests.drill_report", report)
    if result.returncode:
        sys.exit(result.returncode)


def lint(argv: list[str]) -> None:
    _ensure_venv("dev")
    _run(PYTHON, "-m", "ruff", "check", ".")
    _run(PYTHON, "-m", "ruff", "format", "--check", ".")


COMMANDS = {"run": run, "test": test, "lint": lint, "soak": soak}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    COMMANDS[sys.argv[1]](sys.argv[2:])
