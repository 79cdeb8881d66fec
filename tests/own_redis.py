"""A redis-server process a test starts and stops by its own pid, on a port of its own:
the broker outage tests stop it, never the machine's shared Redis."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass

import redis


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@dataclass
class OwnRedis:
    port: int
    process: subprocess.Popen | None = None

    @classmethod
    def on_free_port(cls) -> OwnRedis:
        return cls(port=_free_port())

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it empty (no persistence: what was queued before a stop is gone)."""
        self.process = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--loglevel", "warning"),
            ],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        try:
            deadline = time.monotonic() + 10
            while not _pings(client):
                if time.monotonic() > deadline:
                    raise AssertionError("redis-server did not start")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None
