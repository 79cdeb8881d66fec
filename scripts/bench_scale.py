"""How the gateway holds up at scale (docs/PERFORMANCE.md, "Hot row, workers, memory"):

    .venv/bin/python scripts/bench_scale.py hot-row   # 64 connections billing one user vs 64 users
    .venv/bin/python scripts/bench_scale.py workers   # uvicorn --workers 1 vs 2
    .venv/bin/python scripts/bench_scale.py soak      # RSS over a 10-minute run, and its slope
    .venv/bin/python scripts/bench_scale.py tail --seconds 40   # every request's latency at c=1

Self-contained like the CI guard (scripts/perf_guard.py, whose fake provider, load loop and
/proc readings it uses): a PostgreSQL database of its own, dropped and recreated
(OTARI_SCALE_DATABASE_URL, default otari_bench_scale), the test suite's fake provider, the
gateway served by uvicorn with its warm-up (`--lifespan on`), and a closed-loop HTTP/1.1
load generator in this process. Budgets on: every request is held, settled and logged.
Each run ends with `manage.py audit_budgets`, which fails when the books do not balance.

- hot-row: one gateway process on CPU 1; 64 keep-alive connections, each with a key of its
  own. `hot`: the 64 keys belong to one user, so that every admission and settlement
  locks the same row; `spread`: 64 users, one key each. Alternating, `--rounds` each.
- workers: the same load against `--workers 1` and `--workers 2`, nothing pinned (a
  second worker needs the second core, which the fake provider, the load generator and
  PostgreSQL share with it on a 2-core machine).
- soak: one worker under steady load for `--minutes`; the resident memory of the worker
  every 10 s, and the slope of a least-squares line through the samples after the first
  minute (the warm-up's and the pools' growth are over by then).
- tail: one connection, every request timed: p50, p99 and the slowest requests with their
  time into the run. `--synchronous-commit off` on the benchmark's database tells whether
  the slow ones are WAL flushes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import perf_guard as guard  # a sibling script, not a package

REPO = guard.REPO
USERS = 64


def prepare_database(url: str) -> dict[str, list[str]]:
    """A fresh database: 64 users with a key each (`spread`) and one user with 64 keys
    (`hot`), on budgets that never refuse."""
    guard.fresh_database(url)
    script = f"""
import django
django.setup()
from decimal import Decimal
from django.core.management import call_command
call_command("migrate", verbosity=0)
call_command("bootstrap", verbosity=0)
from budgets.services import accounts, keys
budget = accounts.budget_create(name="scale", max_budget_usd=Decimal("999999999"))
hot = accounts.user_create(user_id="hot", budget=budget)
for i in range({USERS}):
    print("hot", keys.api_key_create(user=hot)[1])
    user = accounts.user_create(user_id=f"spread-{{i}}", budget=budget)
    print("spread", keys.api_key_create(user=user)[1])
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    keys: dict[str, list[str]] = {"hot": [], "spread": []}
    for line in done.stdout.splitlines():
        kind, _, key = line.partition(" ")
        if kind in keys:
            keys[kind].append(key)
    return keys


async def _load(
    port: int, requests: list[bytes], seconds: float
) -> tuple[int, int, list[tuple[float, float]]]:
    """One keep-alive connection per request in `requests`, each sending it in a closed
    loop for `seconds`: (ok, failed, and per request: seconds into the run, latency in ms)."""
    started = time.perf_counter()
    counts = [0, 0]
    timed: list[tuple[float, float]] = []

    async def worker(request: bytes) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (sent := time.perf_counter()) - started < seconds:
                writer.write(request)
                status = await guard.read_response(reader)
                timed.append((sent - started, (time.perf_counter() - sent) * 1000))
                counts[0 if status == 200 else 1] += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker(r) for r in requests))
    return counts[0], counts[1], timed


def measure(pid: int, port: int, requests: list[bytes], seconds: float) -> dict[str, float]:
    cpu_before, started, machine = guard.cpu_seconds(pid), time.monotonic(), guard.busy_seconds()
    ok, failed, timed = asyncio.run(_load(port, requests, seconds))
    elapsed, cpu = time.monotonic() - started, guard.cpu_seconds(pid) - cpu_before
    busy, total = (b - a for a, b in zip(machine, guard.busy_seconds(), strict=True))
    latencies = [ms for _, ms in timed]
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99
    return {
        "req_s": ok / elapsed,
        "errors": failed,
        "p50_ms": quantiles[49],
        "p99_ms": quantiles[98],
        "cpu_ms_per_req": cpu * 1000 / max(ok, 1),
        # How much of the whole machine was busy: at 100% no process could go faster.
        "machine_busy_pct": 100 * busy / max(total, 1e-9),
    }


def rss_mib(pid: int) -> float:
    """Resident memory of `pid`, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Gateway:
    """The fake provider and one uvicorn server on the database, for the `with` block."""

    def __init__(self, args: argparse.Namespace, workers: int = 1, pinned: bool = True):
        self.args, self.workers, self.pinned = args, workers, pinned
        self.tmp = Path(tempfile.mkdtemp(prefix="otari-scale-"))
        self.fake_port, self.port = args.fake_port, guard.free_port()
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> Gateway:
        pin = guard.pin if self.pinned else (lambda cpu: [])
        self.fake = subprocess.Popen(
            [*pin(0), sys.executable, "tests/fake_provider.py", "--port", str(self.fake_port)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
        )
        self.processes.append(self.fake)
        command = [
            *pin(1),
            sys.executable,
            "-m",
            "uvicorn",
            "otari.asgi:application",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--lifespan",
            "on",
        ]
        if self.workers > 1:
            command += ["--workers", str(self.workers)]
        self.server = subprocess.Popen(
            command, cwd=REPO, stderr=(self.tmp / "gateway.log").open("wb")
        )
        self.processes.append(self.server)
        guard.wait_http(self.fake_port, self.fake, "/health")
        guard.wait_http(self.port, self.server, "/v1/models")
        if self.pinned and guard.pin(0):
            os.sched_setaffinity(0, {0})
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))

    def requests(self, keys: list[str], stream: bool = False) -> list[bytes]:
        model = f"openai:{guard.MODEL}"
        return [guard.request_bytes(self.port, key, model, stream) for key in keys]


def audit() -> None:
    done = subprocess.run(
        [sys.executable, "manage.py", "audit_budgets"], cwd=REPO, capture_output=True, text=True
    )
    print(f"audit_budgets: {(done.stdout + done.stderr).strip()}", flush=True)
    if done.returncode:
        raise SystemExit("bench_scale: the books do not balance")


def row(label: str, figures: dict[str, float]) -> str:
    return (
        f"| {label} | {figures['req_s']:.1f} | {figures['p50_ms']:.2f} | "
        f"{figures['p99_ms']:.2f} | {figures['cpu_ms_per_req']:.2f} | {figures['errors']:.0f} | "
        f"{figures['machine_busy_pct']:.0f}% |"
    )


HEADER = (
    "| target | req/s | p50 ms | p99 ms | gateway CPU ms/req | errors | machine busy |\n"
    "|---|---|---|---|---|---|---|"
)


def _rounds(args, targets: dict[str, tuple[Gateway, list[bytes]]]) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {name: [] for name in targets}
    for gateway, requests in targets.values():  # warm-up: every key's first request
        measure(gateway.server.pid, gateway.port, requests, 2.0)
    for round_ in range(args.rounds):
        names = list(targets) if round_ % 2 == 0 else list(reversed(targets))
        for name in names:
            gateway, requests = targets[name]
            figures = measure(gateway.server.pid, gateway.port, requests, args.seconds)
            results[name].append(figures)
            print(f"  round {round_} {row(name, figures)}", flush=True)
    return results


def _median(rows: list[dict]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def hot_row(args: argparse.Namespace, keys: dict[str, list[str]]) -> None:
    with Gateway(args) as gateway:
        count = args.concurrency
        targets = {
            f"spread ({count} users)": (gateway, gateway.requests(keys["spread"][:count])),
            "hot (1 user)": (gateway, gateway.requests(keys["hot"][:count])),
        }
        results = _rounds(args, targets)
    audit()
    medians = {name: _median(rows) for name, rows in results.items()}
    spread, hot = medians.values()
    print(HEADER)
    for name, figures in medians.items():
        print(row(name, figures))
    print(f"hot / spread req/s: {hot['req_s'] / spread['req_s']:.2f}")


def workers(args: argparse.Namespace, keys: dict[str, list[str]]) -> None:
    medians = {}
    for count in (1, 2):
        with Gateway(args, workers=count, pinned=False) as gateway:
            requests = gateway.requests(keys["spread"][: args.concurrency])
            name = f"--workers {count}"
            medians[name] = _median(_rounds(args, {name: (gateway, requests)})[name])
    audit()
    print(HEADER)
    for name, figures in medians.items():
        print(row(name, figures))
    one, two = medians.values()
    print(
        f"--workers 2 / --workers 1: req/s {two['req_s'] / one['req_s']:.2f}, "
        f"CPU per request {two['cpu_ms_per_req'] / one['cpu_ms_per_req']:.2f}"
    )


def soak(args: argparse.Namespace, keys: dict[str, list[str]]) -> None:
    with Gateway(args) as gateway:
        # Half plain, half streamed: both paths' buffers and pools stay in play.
        requests = gateway.requests(keys["spread"][: args.concurrency // 2]) + gateway.requests(
            keys["spread"][args.concurrency // 2 : args.concurrency], stream=True
        )
        pid = gateway.server.pid
        samples: list[tuple[float, float]] = []
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < args.minutes * 60:
            figures = measure(pid, gateway.port, requests, 10.0)
            samples.append((elapsed / 60, rss_mib(pid)))
            print(
                f"  {elapsed / 60:5.2f} min  RSS {samples[-1][1]:.1f} MiB  "
                f"{figures['req_s']:.0f} req/s  p99 {figures['p99_ms']:.1f} ms  "
                f"errors {figures['errors']:.0f}",
                flush=True,
            )
    audit()
    late = [(t, m) for t, m in samples if t >= 1.0]
    slope = statistics.linear_regression([t for t, _ in late], [m for _, m in late]).slope
    print(
        f"RSS: {samples[0][1]:.1f} MiB after 10 s, {late[0][1]:.1f} at 1 min, "
        f"{samples[-1][1]:.1f} at {samples[-1][0]:.1f} min; slope after the first minute "
        f"{slope * 1024:+.1f} KiB/min"
    )


def tail(args: argparse.Namespace, keys: dict[str, list[str]]) -> None:
    if args.synchronous_commit:
        # A diagnosis only (is a slow request a slow WAL flush?): the product never runs
        # without durable commits.
        import psycopg

        with psycopg.connect(args.database_url, autocommit=True) as conn:
            name = urlsplit(args.database_url).path.lstrip("/")
            conn.execute(
                f'ALTER DATABASE "{name}" SET synchronous_commit = {args.synchronous_commit}'
            )
    with Gateway(args) as gateway:
        request = gateway.requests(keys["spread"][:1])[0]
        asyncio.run(_load(gateway.port, [request], 3.0))  # warm-up
        _, _, timed = asyncio.run(_load(gateway.port, [request], args.seconds))
    audit()
    quantiles = statistics.quantiles([ms for _, ms in timed], n=100)
    print(
        f"{len(timed)} requests at c=1: p50 {quantiles[49]:.2f} ms, p99 {quantiles[98]:.2f} ms, "
        f"p99/p50 {quantiles[98] / quantiles[49]:.2f}; over 25 ms: "
        f"{sum(ms > 25 for _, ms in timed)}"
    )
    slowest = sorted(sorted(timed, key=lambda t: -t[1])[:20])
    print("slowest (s into the run: ms):", " ".join(f"{t:.1f}:{ms:.0f}" for t, ms in slowest))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("hot-row", "workers", "soak", "tail"))
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "OTARI_SCALE_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/otari_bench_scale"
        ),
    )
    parser.add_argument("--concurrency", type=int, default=USERS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0, help="per measurement")
    parser.add_argument("--minutes", type=float, default=10.0, help="soak length")
    parser.add_argument(
        "--synchronous-commit",
        choices=("on", "off"),
        help="tail: set it on the benchmark's database (a diagnosis, never a setting)",
    )
    args = parser.parse_args()
    args.concurrency = min(args.concurrency, USERS)
    os.environ.update(
        DATABASE_URL=args.database_url,
        OTARI_MASTER_KEY="otari-mk-bench-scale",
        DJANGO_SETTINGS_MODULE="otari.settings",
        OTARI_EMBEDDED_BEAT="0",
    )
    # The config names the fake's port; `bootstrap` (in prepare_database) stores its prices.
    args.fake_port = guard.free_port()
    config = Path(tempfile.mkdtemp(prefix="otari-scale-")) / "otari.yaml"
    config.write_text(
        "providers:\n"
        f"  openai: {{kind: openai, api_key: fake, "
        f'api_base: "http://127.0.0.1:{args.fake_port}/v1"}}\n'
        "pricing:\n"
        f'  "openai:{guard.MODEL}": '
        "{input_price_per_million: 0.15, output_price_per_million: 0.60}\n"
    )
    os.environ["OTARI_CONFIG"] = str(config)
    keys = prepare_database(args.database_url)
    {"hot-row": hot_row, "workers": workers, "soak": soak, "tail": tail}[args.what](args, keys)
    return 0


if __name__ == "__main__":
    sys.exit(main())
