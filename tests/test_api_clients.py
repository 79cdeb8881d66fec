"""The real `otari` SDK (control_plane) and `otari-cli`, installed from PyPI, against the
running gateway (issue 4).

Their import name, `otari`, is also this project's package, so they live in a virtualenv
of their own (created once, under var/) and run in subprocesses: the two never share
sys.path. Every value they print is checked against the database.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from budgets.models import APIKey, Budget, GatewayUser
from tests.conftest import MASTER_KEY, REPO
from usage.models import ModelPricing, UsageLog

CLIENTS = ("otari==0.4.1", "otari-cli==0.1.0")
VENV = REPO / "var" / "test-clients-venv"

pytestmark = [pytest.mark.slow]


def _venv_python() -> Path:
    return VENV / "bin" / "python"


@pytest.fixture(scope="session")
def clients_venv() -> Path:
    """A virtualenv with the SDK and the CLI, reused across runs once complete."""
    stamp = VENV / "installed.txt"
    if not (stamp.exists() and stamp.read_text() == "\n".join(CLIENTS)):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run(
            [str(_venv_python()), "-m", "pip", "install", "-q", *CLIENTS],
            check=True,
            timeout=600,
        )
        stamp.write_text("\n".join(CLIENTS))
    return VENV


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=120,
        # Outside the repository, so nothing of this project can shadow the SDK.
        cwd="/",
        env={
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", str(REPO / "var")),
            "COLUMNS": "10000",
            "TERM": "dumb",
            "NO_COLOR": "1",
            **env,
        },
    )


SDK_SCRIPT = textwrap.dedent(
    """
    import json, os
    from otari import OtariClient
    from otari._client import (
        CreateBudgetRequest, CreateKeyRequest, CreateUserRequest, SetPricingRequest,
        UpdateKeyRequest,
    )

    url, master = os.environ["GATEWAY_URL"], os.environ["MASTER_KEY"]
    admin = OtariClient(api_base=url, admin_key=master)
    cp = admin.control_plane
    out = {}
    budget = cp.budgets.create(CreateBudgetRequest(
        name="sdk", max_budget=10.0, budget_duration_sec=86400))
    out["budget"] = budget.model_dump(mode="json")
    user = cp.users.create(CreateUserRequest(user_id="sdk-user", budget_id=budget.budget_id))
    out["user"] = user.model_dump(mode="json")
    created = cp.keys.create(CreateKeyRequest(user_id="sdk-user", key_name="sdk-key"))
    out["created"] = created.model_dump(mode="json")
    out["listed"] = [k.model_dump(mode="json") for k in cp.keys.list(limit=10)]
    out["got"] = cp.keys.get(created.id).model_dump(mode="json")
    out["updated"] = cp.keys.update(
        created.id, UpdateKeyRequest(key_name="renamed")).model_dump(mode="json")
    rotated = cp.keys.raw.keys_rotate_key(created.id)
    out["rotated"] = rotated.model_dump(mode="json")
    price = cp.pricing.set(SetPricingRequest(
        model_key="openai:gpt-4o-mini", input_price_per_million=0.15,
        output_price_per_million=0.6))
    out["price_set"] = price.model_dump(mode="json")
    out["price_got"] = cp.pricing.get("openai:gpt-4o-mini").model_dump(mode="json")
    out["history"] = [p.model_dump(mode="json")
                      for p in cp.pricing.get_history("openai:gpt-4o-mini")]

    chat = OtariClient(api_base=url, api_key=rotated.key).completion(
        model="openai:gpt-4o-mini", messages=[{"role": "user", "content": "Hello there"}])
    out["chat_usage"] = chat.usage.model_dump(mode="json")
    out["usage"] = [e.model_dump(mode="json") for e in cp.usage.list(user_id="sdk-user")]
    out["user_usage"] = [e.model_dump(mode="json") for e in cp.users.get_usage("sdk-user")]
    out["user_after"] = cp.users.get("sdk-user").model_dump(mode="json")
    out["budgets"] = [b.model_dump(mode="json") for b in cp.budgets.list()]
    out["count"] = cp.usage.raw.usage_count_usage(user_id=["sdk-user"]).total
    out["summary_users"] = [
        r.model_dump(mode="json") for r in cp.usage.raw.usage_usage_summary().by_user]
    cp.keys.delete(created.id)
    try:
        cp.users.get("nobody")
    except Exception as exc:
        out["missing"] = [type(exc).__name__, str(exc)]
    print(json.dumps(out))
    """
)


def test_sdk_control_plane(gateway, settings, clients_venv):
    settings.OTARI_MASTER_KEY = MASTER_KEY
    result = _run(
        [str(_venv_python()), "-c", SDK_SCRIPT], GATEWAY_URL=gateway.url, MASTER_KEY=MASTER_KEY
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)

    budget = Budget.objects.get()
    assert out["budget"]["budget_id"] == budget.pk
    assert budget.max_budget_usd == Decimal("10") == Decimal(str(out["budget"]["max_budget"]))
    user = GatewayUser.objects.get(pk="sdk-user")
    assert out["user"]["budget_id"] == user.budget_id == budget.pk

    key = APIKey.objects.get()
    assert out["created"]["id"] == out["got"]["id"] == out["rotated"]["id"] == str(key.pk)
    assert out["created"]["key"] != out["rotated"]["key"]
    assert key.key_prefix == out["rotated"]["key"][:10]
    assert [k["id"] for k in out["listed"]] == [str(key.pk)]
    assert out["updated"]["key_name"] == key.key_name == "renamed"
    assert key.is_active is False  # deleted (revoked) at the end

    price = ModelPricing.objects.get(model_key="openai:gpt-4o-mini", origin="api")
    assert Decimal(str(out["price_got"]["input_price_per_million"])) == (
        price.input_price_per_mtok_usd
    )
    assert out["price_set"]["effective_at"] == out["history"][0]["effective_at"]

    row = UsageLog.objects.get(user=user)
    assert [e["id"] for e in out["usage"]] == [e["id"] for e in out["user_usage"]] == [str(row.id)]
    entry = out["usage"][0]
    assert Decimal(str(entry["cost"])) == row.cost_usd
    assert entry["total_tokens"] == row.total_tokens == out["chat_usage"]["total_tokens"]
    assert entry["api_key_id"] == str(key.pk)
    user.refresh_from_db()
    assert Decimal(str(out["user_after"]["spend"])) == user.spend_usd == row.cost_usd
    assert out["user_after"]["current_requests"] == 1
    assert out["count"] == 1
    assert out["summary_users"][0]["key"] == "sdk-user"
    assert out["budgets"][0]["user_count"] == 1
    assert out["missing"][0] == "ModelNotFoundError"
    assert "nobody" in out["missing"][1]


def _cli(venv: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    return _run(
        [str(venv / "bin" / "otari"), "--api-base", url, "--admin-key", MASTER_KEY, "--json", *args]
    )


def test_cli_commands(gateway, settings, clients_venv):
    settings.OTARI_MASTER_KEY = MASTER_KEY
    url = gateway.url

    health = _cli(clients_venv, url, "health")
    assert health.returncode == 0, health.stderr
    assert json.loads(health.stdout)["ok"] is True

    created_budget = _cli(
        clients_venv, url, "budgets", "create", "--max-budget", "2.5", "--duration-sec", "3600"
    )
    assert created_budget.returncode == 0, created_budget.stderr
    budget = Budget.objects.get()
    assert json.loads(created_budget.stdout)["budget_id"] == budget.pk
    assert (budget.max_budget_usd, budget.budget_duration_sec) == (Decimal("2.5"), 3600)

    assert (
        _cli(clients_venv, url, "users", "create", "cli-user", "--budget", budget.pk).returncode
        == 0
    )
    users = _cli(clients_venv, url, "users", "list")
    assert users.returncode == 0, users.stderr
    assert [u["user_id"] for u in json.loads(users.stdout)] == ["cli-user"]

    created_key = _cli(clients_venv, url, "keys", "create", "--user", "cli-user", "--name", "cli")
    assert created_key.returncode == 0, created_key.stderr
    secret = json.loads(created_key.stdout)["key"]
    key = APIKey.objects.get()
    assert (key.user_id, key.key_name, key.key_prefix) == ("cli-user", "cli", secret[:10])
    keys = _cli(clients_venv, url, "keys", "list")
    assert [k["id"] for k in json.loads(keys.stdout)] == [str(key.pk)]
    assert secret not in keys.stdout

    set_price_body = {
        "model": "openai:gpt-4o-mini",
        "messages": [{"role": "user", "content": "Hello"}],
    }
    ModelPricing.objects.create(
        model_key="openai:gpt-4o-mini",
        effective_at=budget.created_at,
        input_price_per_mtok_usd=Decimal("0.15"),
        output_price_per_mtok_usd=Decimal("0.6"),
    )
    assert gateway.post("/v1/chat/completions", secret, set_price_body).status_code == 200
    usage = _cli(clients_venv, url, "usage", "list", "--user", "cli-user")
    assert usage.returncode == 0, usage.stderr
    entries = json.loads(usage.stdout)
    row = UsageLog.objects.get()
    assert [e["id"] for e in entries] == [str(row.id)]
    assert Decimal(str(entries[0]["cost"])) == row.cost_usd

    missing = _cli(clients_venv, url, "users", "get", "ghost")
    assert missing.returncode == 3  # otari-cli's "not found" exit code


# --- generation through the SDK and the CLI (issue 12, item 4) ------------------------------

GENERATION_SCRIPT = textwrap.dedent(
    """
    import json, os
    from otari import OtariClient

    client = OtariClient(api_base=os.environ["GATEWAY_URL"], api_key=os.environ["API_KEY"])
    meta = client.with_response_metadata
    messages = [{"role": "user", "content": "Hello there"}]
    out = {}
    answered = meta.completion(model="openai:gpt-4o-mini", messages=messages)
    out["request_id"] = answered.request_id
    stream = meta.completion(model="openai:gpt-4o-mini", messages=messages, stream=True)
    out["streamed"] = "".join(c.choices[0].delta.content or "" for c in stream)
    out["stream_request_id"] = stream.request_id
    try:
        client.completion(model="openai:gpt-4o-mini", messages=messages, max_tokens=10**6)
    except Exception as exc:
        out["refused"] = [type(exc).__name__, str(exc)]
    print(json.dumps(out))
    """
)


@pytest.fixture
def gen_user():
    from tests.factories import make_budget, make_key, make_user, set_price

    set_price("openai:gpt-4o-mini")
    user = make_user(budget=make_budget(max_budget_usd=Decimal("0.01")), user_id="gen-user")
    return user, make_key(user)[1]


def test_sdk_reads_request_ids_and_readable_errors(gateway, gen_user, clients_venv):
    result = _run(
        [str(_venv_python()), "-c", GENERATION_SCRIPT], GATEWAY_URL=gateway.url, API_KEY=gen_user[1]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    rows = list(UsageLog.objects.order_by("timestamp"))
    assert [row.status for row in rows] == ["success", "success", "error"]
    # The SDK reads the request id from Otari-Request-ID: the usage row's id.
    assert out["request_id"] == str(rows[0].id)
    assert out["stream_request_id"] == str(rows[1].id)
    assert out["streamed"].startswith("Hello from the fake")
    # A refusal reads as its message, not as the text of a Python dict.
    kind, message = out["refused"]
    assert kind == "AuthenticationError"  # how otari 0.4.1 maps every 403
    assert message == f"[gateway] {rows[2].error_message}"  # the SDK adds the prefix


def test_cli_prints_readable_generation_errors(gateway, gen_user, clients_venv):
    args = [str(clients_venv / "bin" / "otari"), "--api-base", gateway.url]
    args += ["--api-key", gen_user[1], "completion", "-m", "openai:gpt-4o-mini"]
    answered = _run([*args, "Hello there"])
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.startswith("Hello from the fake")

    refused = _run([*args, "--max-tokens", str(10**6), "Hello there"])
    assert refused.returncode == 2  # otari-cli's exit code for 401/403
    row = UsageLog.objects.get(status="error")
    assert refused.stderr.split() == ["Error:", *row.error_message.split()]

    unknown = _run([*args[:-1], "nowhere:model", "Hello there"])
    assert unknown.returncode != 0
    assert "{" not in unknown.stderr, unknown.stderr
