"""Test fixtures: a fake provider on loopback, the gateway served by a real ASGI server,
and a configuration that points one at the other.

Tests that talk to the gateway over HTTP use the `gateway` fixture: it is transactional
(the server's connections must see what the test wrote, and the test what the server
wrote) and resets the fake provider's counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import time_machine
import uvicorn
from django.conf import settings
from django.db import connections

from tests.budgets.webhook import WebhookReceiver
from tests.fake_azure import FakeAzure
from tests.fake_provider import FakeProvider
from tests.own_redis import OwnRedis

REPO = Path(__file__).resolve().parent.parent
# Generous for real work, short enough that timeout tests are quick.
PROVIDER_TIMEOUT_S = 3
SHORT_TIMEOUT_S = 1


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """PostgreSQL-only tests skip on SQLite locally; CI sets OTARI_REQUIRE_POSTGRES=1,
    which turns a missing PostgreSQL into a failure instead."""
    if settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        return
    if os.environ.get("OTARI_REQUIRE_POSTGRES"):
        raise pytest.UsageError("OTARI_REQUIRE_POSTGRES is set but DATABASE_URL is not PostgreSQL")
    skip = pytest.mark.skip(reason="needs PostgreSQL (set DATABASE_URL)")
    for item in items:
        if "postgres" in item.keywords:
            item.add_marker(skip)


# --- the calendar guard ------------------------------------------------------------------
# A test whose outcome depends on the date must pass on every day of the year. Tests marked
# `calendar` (periods, alerts, the dashboard, the browser) run once at each of these
# instants, with the clock ticking from there, so one that only passes on some days fails
# in CI on any day. A test that moves the clock itself still does: the innermost travel wins.
# In the past: a subprocess a test starts (a command given `--now`) keeps the real clock.
CALENDAR_INSTANTS = {
    "month-start": datetime(2025, 3, 1, 0, 0, 0, tzinfo=UTC),
    "leap-february-end": datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC),
    "monday-midnight": datetime(2025, 1, 6, 0, 0, 0, tzinfo=UTC),
    "mid-month": datetime(2025, 6, 15, 12, 30, 0, tzinfo=UTC),
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("calendar") is not None:
        metafunc.parametrize("calendar_clock", list(CALENDAR_INSTANTS), indirect=True)


@pytest.fixture(autouse=True)
def calendar_clock(request: pytest.FixtureRequest) -> Iterator[datetime | None]:
    """The instant a `calendar` test runs at (None for the others). Autouse, so that
    the clock is set before any fixture of the test writes a row."""
    name = getattr(request, "param", None)
    if name is None:
        yield None
        return
    with time_machine.travel(CALENDAR_INSTANTS[name], tick=True):
        yield CALENDAR_INSTANTS[name]


@pytest.fixture(autouse=True)
def books_balanced(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test that commits to the database (the gateway's tests, the services'
    concurrency and path tests: `transactional_db`), the audit (`manage.py
    audit_budgets`) finds every user's books balanced: reserved = open holds, spend =
    counted usage in the window (docs/SPEC.md §3.5). A test that unbalances them on
    purpose says so with the `books_unbalanced` marker.

    Tests in a rolled-back transaction are left out: many of them freeze the clock at an
    instant before the rows their fixtures wrote at the real time, so for them time runs
    backwards and a window can begin after a charge it does not contain."""
    transactional = request.node.get_closest_marker("django_db") is not None and (
        request.node.get_closest_marker("django_db").kwargs.get("transaction", False)
    )
    uses_db = transactional or "transactional_db" in request.fixturenames
    if not uses_db or request.node.get_closest_marker("books_unbalanced") is not None:
        yield
        return
    # Set up before this fixture, so torn down (rolled back, flushed) after its check.
    request.getfixturevalue("_django_db_helper")
    yield
    from budgets.selectors import books_drift_list

    drifts = books_drift_list()
    assert not drifts, f"the books do not balance after the test: {drifts}"


def is_postgres() -> bool:
    return connections["default"].vendor == "postgresql"


@pytest.fixture(autouse=True, scope="session")
def _no_embedded_beat() -> None:
    """Tests decide when the periodic jobs run: the in-process gateway would otherwise
    start resets and sweeps in the background on its first request (otari/celery.py)."""
    settings.OTARI_EMBEDDED_BEAT = False


# --- the fake provider and the configuration ----------------------------------------------


@pytest.fixture(scope="session")
def fake_provider() -> Iterator[FakeProvider]:
    with FakeProvider() as fake:
        yield fake


@pytest.fixture(scope="session")
def fake_azure() -> Iterator[FakeAzure]:
    with FakeAzure(deployments={"prod-gpt4o": "gpt-4o-2024-08-06"}) as fake:
        yield fake


def azure_config(fake: FakeAzure) -> str:
    """Azure instances on the fake resource: `azure` on the v1 API with an api-key,
    `azure-dated` on deployment URLs with an Entra ID token; `gpt-4o` is served by the
    deployment `prod-gpt4o`, any other model by the deployment of its name."""
    return f"""
  azure: {{kind: azure, api_base: "{fake.root_url}", api_key: {fake.api_key},
          timeout: {PROVIDER_TIMEOUT_S}, deployments: {{gpt-4o: prod-gpt4o}}}}
  azure-dated: {{kind: azure, api_base: "{fake.root_url}/openai", azure_ad_token: {fake.ad_token},
                api_version: 2025-04-01-preview, timeout: {PROVIDER_TIMEOUT_S},
                deployments: {{gpt-4o: prod-gpt4o}}}}
  azure-badkey: {{kind: azure, api_base: "{fake.root_url}", api_key: not-the-key}}
"""


def write_config(path: Path, fake: FakeProvider, azure: FakeAzure | None = None) -> Path:
    """Provider instances on the fake (and on a closed port), and test prices.

    Both kinds have a normal instance (`openai`, `anthropic`), one with a short timeout
    (`short`, `anthropic-short`) and one on a closed port (`dead`, `anthropic-dead`);
    `chatonly` is an openai-kind server without the Responses API (translated to chat);
    `catalog` is the fake priced as OpenAI by the price catalog (usage.catalog).
    """
    path.write_text(
        f"""
providers:
  openai: {{kind: openai, api_key: sk-test-provider-key, api_base: "{fake.base_url}",
           timeout: {PROVIDER_TIMEOUT_S}}}
  short: {{kind: openai, api_key: sk-test-provider-key, api_base: "{fake.base_url}",
          timeout: {SHORT_TIMEOUT_S}}}
  dead: {{kind: openai, api_key: sk-test-provider-key, api_base: "http://127.0.0.1:9/v1"}}
  anthropic: {{kind: anthropic, api_key: sk-ant-test-provider-key, api_base: "{fake.root_url}",
              timeout: {PROVIDER_TIMEOUT_S}}}
  anthropic-short: {{kind: anthropic, api_key: sk-ant-test-provider-key,
                    api_base: "{fake.root_url}", timeout: {SHORT_TIMEOUT_S}}}
  anthropic-dead: {{kind: anthropic, api_key: sk-ant-test-provider-key,
                   api_base: "http://127.0.0.1:9"}}
  chatonly: {{kind: openai, api_key: sk-test-provider-key, api_base: "{fake.base_url}",
             timeout: {PROVIDER_TIMEOUT_S}, apis: [chat, embeddings]}}
  catalog: {{kind: openai, api_key: sk-test-provider-key, api_base: "{fake.base_url}",
            timeout: {PROVIDER_TIMEOUT_S}, catalog_provider: openai}}
{azure_config(azure) if azure is not None else ""}
pricing:
  "openai:gpt-4o-mini": {{input_price_per_million: 0.15, output_price_per_million: 0.60}}
"""
    )
    return path


@pytest.fixture(scope="session")
def gateway_config_file(
    fake_provider: FakeProvider, fake_azure: FakeAzure, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    from common.config import gateway_config
    from llm_proxy.providers import providers

    path = write_config(tmp_path_factory.mktemp("config") / "otari.yaml", fake_provider, fake_azure)
    previous = settings.OTARI_CONFIG
    settings.OTARI_CONFIG = str(path)
    gateway_config.cache_clear()
    providers.cache_clear()
    yield path
    settings.OTARI_CONFIG = previous
    gateway_config.cache_clear()
    providers.cache_clear()


# --- the gateway, served by uvicorn in a thread of the test process ------------------------


@dataclass
class AsgiServer:
    url: str


def _free_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="session")
def asgi_server(
    gateway_config_file: Path, django_db_setup, django_db_blocker
) -> Iterator[AsgiServer]:
    """The ASGI application (otari.asgi), on a real uvicorn server on loopback."""
    from otari.asgi import application

    sock = _free_socket()
    config = uvicorn.Config(application, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    yield AsgiServer(url=f"http://127.0.0.1:{sock.getsockname()[1]}")
    server.should_exit = True
    thread.join(timeout=10)


def disconnect_other_sessions() -> None:
    """End the server's pooled PostgreSQL sessions (their event loop is gone), so that
    pytest-django can drop the test database."""
    if not is_postgres():
        return
    with connections["default"].cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@dataclass
class Gateway:
    url: str
    fake: FakeProvider

    def client(self, key: str | None = None, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        kwargs.setdefault("timeout", 30)
        return httpx.Client(base_url=self.url, headers=headers, **kwargs)

    def post(self, path: str, key: str | None, json: object, **kwargs) -> httpx.Response:
        with self.client(key) as client:
            return client.post(path, json=json, **kwargs)

    def chat(self, key: str | None, **body) -> httpx.Response:
        body.setdefault("messages", [{"role": "user", "content": "Say hello to the test suite"}])
        return self.post("/v1/chat/completions", key, body)


@pytest.fixture
def gateway(asgi_server: AsgiServer, fake_provider: FakeProvider, transactional_db) -> Gateway:
    fake_provider.reset()
    return Gateway(url=asgi_server.url, fake=fake_provider)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    """A webhook endpoint on loopback that records what it is sent (budget alerts)."""
    with WebhookReceiver() as r:
        yield r


MASTER_KEY = "otari-mk-test-master-key"


@pytest.fixture
def admin(gateway: Gateway, settings) -> Iterator[httpx.Client]:
    """An HTTP client on the gateway's management API, holding the master key."""
    settings.OTARI_MASTER_KEY = MASTER_KEY
    with gateway.client(MASTER_KEY) as client:
        yield client


# --- gateways in separate processes ---------------------------------------------------------


def database_url() -> str:
    """The URL of the database the tests use (the test database pytest-django created)."""
    db = connections["default"].settings_dict
    if db["ENGINE"] == "django.db.backends.postgresql":
        user = db.get("USER") or "postgres"
        password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
        return (
            f"postgres://{user}{password}@{db.get('HOST') or '127.0.0.1'}:"
            f"{db.get('PORT') or 5432}/{db['NAME']}"
        )
    return f"sqlite:///{db['NAME']}"


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen

    def kill(self) -> None:
        # The whole process group: with `workers` > 1 uvicorn's supervisor has children,
        # which a kill of the supervisor alone would leave serving.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def start_server_process(
    config_file: Path,
    *,
    log_path: Path | None = None,
    stdout_too: bool = False,
    workers: int = 1,
    lifespan: str = "off",
    probe: str = "/v1/models",
    **env: str,
) -> ServerProcess:
    """`uvicorn otari.asgi:application` in its own process, on the test database.

    `log_path`: where its stderr (the log stream) goes, for tests that read its logs;
    with `stdout_too`, its stdout as well (everything the process writes).
    `workers`: uvicorn's `--workers`, as the README serves it (one socket, several
    processes). Returns once one of them answers; the others accept connections as they
    come up.
    `lifespan`: "on" to warm the worker up at startup (otari/startup.py), as in production.
    `probe`: the path whose answer (any status) says the server is up.
    """
    sock = _free_socket()
    port = sock.getsockname()[1]
    sock.close()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "otari.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--lifespan",
            lifespan,
            "--log-level",
            "warning",
            *(["--workers", str(workers)] if workers > 1 else []),
        ],
        cwd=REPO,
        start_new_session=True,
        env={
            **os.environ,
            "DATABASE_URL": database_url(),
            "OTARI_CONFIG": str(config_file),
            "DJANGO_SETTINGS_MODULE": "otari.settings",
            **env,
        },
        stderr=log_path.open("ab") if log_path is not None else None,
        stdout=log_path.open("ab") if log_path is not None and stdout_too else None,
    )
    url = f"http://127.0.0.1:{port}"
    # Each worker imports Django on its own: on a busy 2-core machine, 4 take a while.
    deadline = time.monotonic() + 30 * workers
    while True:
        try:
            httpx.get(url + probe, timeout=1)
            return ServerProcess(url=url, process=process)
        except httpx.TransportError:
            if process.poll() is not None or time.monotonic() > deadline:
                ServerProcess(url=url, process=process).kill()
                raise RuntimeError("the gateway process did not start") from None
            time.sleep(0.1)


class _BackgroundLoop:
    """One event loop for the whole test session, in a thread of its own.

    Async services keep per-loop state (the hot-path connection pool); running each call
    under a fresh `asyncio.run` would open a new pool every time.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)


_loop: _BackgroundLoop | None = None


def run_async(coro):
    """Run a coroutine from a synchronous test, on the session's background loop."""
    global _loop
    if _loop is None:
        _loop = _BackgroundLoop()
    return _loop.run(coro)


@pytest.fixture(scope="session", autouse=True)
def _end_pooled_sessions(django_db_setup, django_db_blocker) -> Iterator[None]:
    """At the end of the session, end the pooled PostgreSQL sessions of servers and loops
    that are gone, so that pytest-django can drop the test database."""
    yield
    with django_db_blocker.unblock():
        disconnect_other_sessions()


# --- Redis -------------------------------------------------------------------------------

# CI runs Redis on 127.0.0.1:6379; each branch of work uses its own database number.
REDIS_URL = os.environ.get("OTARI_TEST_REDIS_URL", "redis://127.0.0.1:6379/8")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """An empty Redis database of the tests' own (the rate limiter's, routing health's;
    skipped without Redis locally; CI, which sets OTARI_REQUIRE_POSTGRES, fails instead)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.flushdb()
    except redis.ConnectionError:
        if os.environ.get("OTARI_REQUIRE_POSTGRES"):
            raise
        pytest.skip(f"needs Redis at {REDIS_URL} (set OTARI_TEST_REDIS_URL)")
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    """A Redis server of the test's own, to stop and start (broker outages)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = OwnRedis.on_free_port()
    server.start()
    yield server
    server.stop()
