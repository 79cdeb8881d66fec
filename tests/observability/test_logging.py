"""Request ids and structured logs, through HTTP into the ASGI app: the id of a request is
in its response headers, its usage row and every log line written while it ran; logs
carry no prompts, completions or secrets."""

from __future__ import annotations

import json
import logging
import threading
import time

import httpx
import pytest

from otari.logging import JsonFormatter, TextFormatter
from tests.conftest import start_server_process
from tests.factories import make_key, make_user, priced, set_price
from tests.fake_provider import SECRET_IN_ERRORS, WORDS
from usage.models import UsageLog

PROVIDER_KEY = "sk-test-provider-key"  # tests/conftest.py write_config
ANTHROPIC_KEY = "sk-ant-test-provider-key"
CANARY_PROMPT = "Recognizable prompt canary 7f3a9c: tell me a secret"
# The fake's answer starts with these words.
COMPLETION = "".join(WORDS[:5])

# Loggers the gateway's own request path writes to.
_REQUEST_LOGGERS = ("otari", "llm_proxy", "budgets", "usage", "django.request")


def _request_records(caplog) -> list[logging.LogRecord]:
    """The records of the request path: the periodic jobs a request may start in the
    background (otari.celery.embedded_beat_tick) are not part of any request."""
    return [
        r
        for r in caplog.records
        if r.name.startswith(_REQUEST_LOGGERS) and not r.threadName.startswith("otari-tasks")
    ]


def _wait_for_access_lines(caplog, count: int, timeout: float = 5) -> None:
    """The access line is written after the last byte went out, so a client can have
    its response a moment before the line exists."""
    deadline = time.monotonic() + timeout
    while sum(r.name == "otari.access" for r in caplog.records) < count:
        assert time.monotonic() < deadline, "the access lines were not written"
        time.sleep(0.01)


def test_the_request_id_is_in_the_headers_the_usage_row_and_every_log_line(gateway, caplog):
    caplog.set_level(logging.DEBUG)
    set_price()
    failing = priced("gpt-4o-mini-fail-400")
    _, secret = make_key(make_user())
    responses: dict[str, httpx.Response] = {}

    def send(name: str, model: str) -> None:
        responses[name] = gateway.chat(secret, model=model)

    # Two requests at once: each line must carry its own request's id.
    threads = [
        threading.Thread(target=send, args=("ok", "openai:gpt-4o-mini")),
        threading.Thread(target=send, args=("failed", failing)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    _wait_for_access_lines(caplog, 2)
    ids = {name: response.headers["X-Otari-Request-Id"] for name, response in responses.items()}
    assert responses["ok"].status_code == 200
    assert responses["failed"].status_code == 400
    for name, request_id in ids.items():
        assert UsageLog.objects.get(pk=request_id).status_code == responses[name].status_code
    records = _request_records(caplog)
    assert records
    assert {r.request_id for r in records} == set(ids.values()), [
        (r.name, r.request_id, r.getMessage()) for r in records
    ]
    by_id = {
        request_id: [r for r in records if r.request_id == request_id]
        for request_id in ids.values()
    }
    access = {
        request_id: [r for r in lines if r.name == "otari.access"]
        for request_id, lines in by_id.items()
    }
    assert [r.status for r in access[ids["ok"]]] == [200]
    assert [r.status for r in access[ids["failed"]]] == [400]
    assert access[ids["ok"]][0].user_id == UsageLog.objects.get(pk=ids["ok"]).user_id
    assert access[ids["ok"]][0].model == "openai:gpt-4o-mini"
    # Django's own warning about the 400 is a line of that request too.
    assert any(r.name == "django.request" for r in by_id[ids["failed"]])


def test_logs_hold_no_prompt_completion_or_secret(gateway, caplog):
    caplog.set_level(logging.DEBUG)
    set_price()
    failing = priced("gpt-4o-mini-fail-400")
    _, secret = make_key(make_user())
    messages = [{"role": "user", "content": CANARY_PROMPT}]

    ok = gateway.chat(secret, model="openai:gpt-4o-mini", messages=messages)
    failed = gateway.chat(secret, model=failing, messages=messages)
    unknown = gateway.chat(secret + "x", model="openai:gpt-4o-mini", messages=messages)

    assert COMPLETION in ok.json()["choices"][0]["message"]["content"]
    assert (failed.status_code, unknown.status_code) == (400, 401)
    _wait_for_access_lines(caplog, 3)
    records = caplog.records
    assert _request_records(caplog)
    forbidden = (CANARY_PROMPT, COMPLETION, secret, PROVIDER_KEY, ANTHROPIC_KEY, SECRET_IN_ERRORS)
    for formatter in (TextFormatter(), JsonFormatter()):
        written = "\n".join(formatter.format(r) for r in records)
        for text in forbidden:
            assert text not in written


def test_payloads_are_logged_only_when_the_debug_setting_says_so(gateway, caplog, settings):
    caplog.set_level(logging.DEBUG)
    set_price()
    _, secret = make_key(make_user())
    messages = [{"role": "user", "content": CANARY_PROMPT}]

    gateway.chat(secret, model="openai:gpt-4o-mini", messages=messages)
    assert not [r for r in caplog.records if r.name == "otari.payloads"]

    settings.OTARI_LOG_PAYLOADS = True
    response = gateway.chat(secret, model="openai:gpt-4o-mini", messages=messages)
    payloads = [r for r in caplog.records if r.name == "otari.payloads"]
    assert [r.levelno for r in payloads] == [logging.DEBUG, logging.DEBUG]
    assert {r.request_id for r in payloads} == {response.headers["X-Otari-Request-Id"]}
    assert CANARY_PROMPT in payloads[0].getMessage()
    assert COMPLETION in payloads[1].getMessage()


def test_formatters_remove_keys_and_never_serialise_objects():
    logger = logging.getLogger("otari.test")
    record = logger.makeRecord(
        "otari.test",
        logging.WARNING,
        __file__,
        1,
        "provider said %s with Authorization: Bearer %s",
        (f"bad key {PROVIDER_KEY}", "gw-" + "A" * 40),
        None,
        extra={"request": object(), "status_code": 400},
    )
    record.request_id = "r-1"
    text = TextFormatter().format(record)
    assert PROVIDER_KEY not in text
    assert "gw-AAAA" not in text
    assert "[r-1]" in text
    entry = json.loads(JsonFormatter().format(record))
    assert entry["status_code"] == 400
    assert entry["request_id"] == "r-1"
    assert "request" not in entry
    assert PROVIDER_KEY not in json.dumps(entry)


@pytest.mark.postgres
@pytest.mark.slow
def test_a_gateway_process_writes_json_lines_with_the_request_id(
    gateway, gateway_config_file, tmp_path
):
    set_price()
    failing = priced("gpt-4o-mini-fail-400")
    _, secret = make_key(make_user())
    log_path = tmp_path / "gateway.log"
    server = start_server_process(gateway_config_file, log_path=log_path, OTARI_LOG_FORMAT="json")
    try:
        responses = [
            httpx.post(
                f"{server.url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {secret}"},
                json={"model": model, "messages": [{"role": "user", "content": CANARY_PROMPT}]},
                timeout=30,
            )
            for model in ("openai:gpt-4o-mini", failing)
        ]
    finally:
        server.process.terminate()
        server.process.wait(timeout=10)

    text = log_path.read_text()
    entries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    access = {e["request_id"]: e for e in entries if e["logger"] == "otari.access"}
    for response in responses:
        entry = access[response.headers["X-Otari-Request-Id"]]
        assert entry["status"] == response.status_code
        assert entry["method"] == "POST"
        assert entry["path"] == "/v1/chat/completions"
        assert entry["duration_ms"] >= entry["overhead_ms"] >= 0
    success = access[responses[0].headers["X-Otari-Request-Id"]]
    assert (success["model"], success["completion_tokens"]) == ("openai:gpt-4o-mini", 20)
    for forbidden in (CANARY_PROMPT, COMPLETION, secret, PROVIDER_KEY, SECRET_IN_ERRORS):
        assert forbidden not in text


def test_every_response_carries_a_request_id_and_its_log_lines_too(gateway, caplog):
    caplog.set_level(logging.INFO)
    with gateway.client() as client:
        responses = [client.get("/health"), client.get("/v1/models"), client.get("/nowhere")]
    assert [r.status_code for r in responses] == [200, 401, 404]
    ids = [r.headers["X-Otari-Request-Id"] for r in responses]
    assert len(set(ids)) == 3
    _wait_for_access_lines(caplog, 3)
    logged = {r.request_id: r.path for r in caplog.records if r.name == "otari.access"}
    assert [logged[i] for i in ids] == ["/health", "/v1/models", "/nowhere"]


FORGED = "2026-01-01 00:00:00,000 INFO otari.access [x] GET /forged 200 0.1ms"


def test_both_formats_keep_a_message_with_control_characters_on_one_line():
    """A client's text in a log line cannot end it or forge the next one (issue 19, 4)."""
    logger = logging.getLogger("otari.test")
    message = f"GET /v1/models\r\n{FORGED}\x1b[2J\u2028\x85 404"
    record = logger.makeRecord("otari.test", logging.INFO, __file__, 1, "%s", (message,), None)
    record.request_id = "r-1"
    text = TextFormatter().format(record)
    for control in ("\n", "\r", "\x1b", "\u2028", "\x85"):
        assert control not in text
    assert "/v1/models\\x0d\\x0a2026-01-01" in text
    line = JsonFormatter().format(record)
    assert len(line.splitlines()) == 1
    assert "\u2028" not in line
    assert "\x85" not in line
    assert json.loads(line)["message"] == message


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_forged_line_in_the_url_stays_inside_its_access_line(
    gateway, gateway_config_file, tmp_path, log_format
):
    """Without any key: `%0d%0a` in the path is decoded by the server, and the access
    line must carry it escaped, never as a line of its own."""
    log_path = tmp_path / "gateway.log"
    server = start_server_process(
        gateway_config_file, log_path=log_path, OTARI_LOG_FORMAT=log_format
    )
    try:
        forged_path = "/v1/models%0d%0a" + FORGED.replace(" ", "%20")
        response = httpx.get(f"{server.url}{forged_path}", timeout=10)
    finally:
        server.process.terminate()
        server.process.wait(timeout=10)

    assert response.status_code == 404
    lines = log_path.read_text().splitlines()
    assert not [line for line in lines if line.startswith(FORGED[:20])]
    request_id = response.headers["X-Otari-Request-Id"]
    if log_format == "json":
        entries = [json.loads(line) for line in lines if line.startswith("{")]
        (access,) = [
            e for e in entries if e["logger"] == "otari.access" and e["request_id"] == request_id
        ]
        assert access["path"] == "/v1/models\r\n" + FORGED
    else:
        (access,) = [line for line in lines if f"INFO otari.access [{request_id}]" in line]
        assert "/v1/models\\x0d\\x0a" + FORGED in access
