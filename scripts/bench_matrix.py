"""The external harness's run_matrix.py, also counting PostgreSQL's CPU (scripts/bench.sh).

    python scripts/bench_matrix.py --bench-dir DIR --pg-db NAME --pg-targets ours[,...] \
        [--summary FILE] -- <run_matrix.py arguments>

For each target named in --pg-targets, the CPU (utime + stime) of the PostgreSQL backends
serving database --pg-db is read from /proc around the same measured load run as the
gateway's own CPU, so one run gives both "gateway" and "gateway + PostgreSQL" CPU per
request. Only that database's backends are counted: PostgreSQL's shared processes (WAL
writer, checkpointer) also serve every other database on the machine, so their CPU cannot
be attributed to the benchmark when the server is shared; on a dedicated server
`--pg-tree` counts the postmaster's whole process tree instead.

Then it writes a summary in the shape of docs/PERFORMANCE.md's comparison table (direct,
each gateway, and the peers side by side per mode and concurrency).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def _psql(sql: str) -> str:
    """One query's output, unaligned, on the local server's `postgres` database."""
    command = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-Atc", sql]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def _backend_pids(db: str) -> list[int]:
    """The PostgreSQL backends connected to `db` now (psql connects to `postgres`, so it
    never counts itself)."""
    out = _psql(f"SELECT pid FROM pg_stat_activity WHERE datname = '{db}'")
    return [int(line) for line in out.split()]


def _postmaster_pid() -> int:
    datadir = _psql("SHOW data_directory").strip()
    with open(os.path.join(datadir, "postmaster.pid")) as fh:
        return int(fh.readline())


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench-dir", required=True)
    ap.add_argument("--pg-db", required=True)
    ap.add_argument("--pg-targets", default="ours")
    ap.add_argument("--pg-tree", action="store_true")
    ap.add_argument("--summary")
    ours = ap.parse_args(argv[:split])
    rest = argv[split + 1 :]

    sys.path.insert(0, os.path.abspath(ours.bench_dir))
    import run_matrix  # the external harness (not part of this repository)

    loadgen = run_matrix.loadgen
    pg_targets = set(ours.pg_targets.split(","))
    pg_tree = [_postmaster_pid()] if ours.pg_tree else None

    def pg_cpu() -> tuple[float, list[int]]:
        pids = pg_tree or _backend_pids(ours.pg_db)
        return run_matrix.cpu_seconds(pids) if pg_tree else _cpu_of(pids), pids

    def _cpu_of(pids: list[int]) -> float:
        # Backends have no children worth counting; reading them one by one also keeps
        # another database's backends (children of the same postmaster) out.
        total = 0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    stat = fh.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
        return total / run_matrix.CLK

    def measure(t, api, stream, c, args, upstream_pids):
        """run_matrix.measure, with PostgreSQL's CPU read around the same wrk run."""
        if t.name not in pg_targets:
            return original_measure(t, api, stream, c, args, upstream_pids)
        if args.warmup > 0:
            loadgen.run(
                t.url,
                api,
                stream,
                c,
                args.warmup,
                t.key,
                t.model,
                "wrk",
                timeout_s=args.timeout,
                cpus=args.driver_cpus,
            )
        pg0, _ = pg_cpu()
        cpu0 = run_matrix.cpu_seconds(t.pids)
        res = loadgen.run(
            t.url,
            api,
            stream,
            c,
            args.duration,
            t.key,
            t.model,
            "wrk",
            timeout_s=args.timeout,
            cpus=args.driver_cpus,
        )
        cpu1 = run_matrix.cpu_seconds(t.pids)
        # A backend the pool opened during the run counts from zero.
        pids1 = pg_tree or _backend_pids(ours.pg_db)
        pg1 = run_matrix.cpu_seconds(pg_tree) if pg_tree else _cpu_of(pids1)
        ok = res["ok"]
        res["cpu_ms_per_req"] = (cpu1 - cpu0) * 1000.0 / ok if ok else None
        res["cpu_util"] = (cpu1 - cpu0) / res["duration_s"]
        res["pg_cpu_ms_per_req"] = (pg1 - pg0) * 1000.0 / ok if ok else None
        res["pg_backends"] = len(pids1)
        t.sample_memory()
        if stream and args.ttfb_duration > 0:
            py = loadgen.run(
                t.url,
                api,
                stream,
                c,
                args.ttfb_duration,
                t.key,
                t.model,
                "py",
                timeout_s=args.timeout,
                cpus=args.driver_cpus,
            )
            res["ttfb_ms"] = py["ttfb_ms"]
            res["py"] = {
                k: py[k]
                for k in (
                    "rps",
                    "ok",
                    "error_count",
                    "errors",
                    "latency_ms",
                    "headers_ms",
                    "ttfb_ms",
                    "status_counts",
                )
            }
            t.sample_memory()
        return res

    def aggregate(runs):
        out = original_aggregate(runs)
        pg = [r["pg_cpu_ms_per_req"] for r in runs if r.get("pg_cpu_ms_per_req") is not None]
        out["pg_cpu_ms_per_req"] = statistics.median(pg) if pg else None
        return out

    original_measure, original_aggregate = run_matrix.measure, run_matrix.aggregate
    run_matrix.measure, run_matrix.aggregate = measure, aggregate
    code = run_matrix.main(rest)
    out = rest[rest.index("--out") + 1] if "--out" in rest else None
    if out and ours.summary:
        with open(out) as fh:
            report = json.load(fh)
        table = summary(report)
        with open(ours.summary, "w") as fh:
            fh.write(table + "\n")
        print()
        print(table)
    return code


def _f(value, digits=2):
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.{digits}f}"


def _added(a: dict, direct: dict | None, name: str, key: str) -> float | None:
    """The target's figure minus direct's: what the gateway adds."""
    if name == "direct" or not direct or a[key] is None or direct[key] is None:
        return None
    return a[key] - direct[key]


def summary(report: dict) -> str:
    """One row per target and cell: the figures docs/PERFORMANCE.md's comparison shows."""
    rss = {r["name"]: r["peak_rss_mib"] for r in report["resources"]}
    lines = [
        "| mode | c | target | req/s | +p50 ms | +p99 ms | +TTFB p50 ms | CPU ms/req "
        "| CPU ms/req + PostgreSQL | peak RSS MiB | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in report["cells"]:
        direct = cell["targets"].get("direct")
        for name, a in cell["targets"].items():
            cpu = a["upstream_cpu_ms_per_req"] if name == "direct" else a["cpu_ms_per_req"]
            pg = a.get("pg_cpu_ms_per_req")
            with_pg = cpu + pg if cpu is not None and pg is not None else None
            lines.append(
                f"| {cell['mode']} | {cell['concurrency']} | {name} | {_f(a['rps'], 1)} "
                f"| {_f(_added(a, direct, name, 'p50'))} | {_f(_added(a, direct, name, 'p99'))} "
                f"| {_f(_added(a, direct, name, 'ttfb_p50'))} "
                f"| {_f(cpu)} | {_f(with_pg)} | {_f(rss.get(name), 0)} | {a['errors']} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
