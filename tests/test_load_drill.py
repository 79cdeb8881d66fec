"""Load, with budgets running out, and clients that vanish mid-stream (issue 19, "Faults
to survive" 1 and 3; docs/RELIABILITY.md).

Both drills run against the gateway as the README serves it, `uvicorn --workers 4`, on
real PostgreSQL, with the fake provider on loopback. Short in the suite, full length
under `python3 dev.py soak -k load_drill` (tests/drills.py); what they measured is
recorded for the soak's table.

What they prove, from the outside (HTTP answers, then the database):
- no admission ever takes a user past the limit: a thread polls `spend + reserved` of
  every capped user throughout, and `spend` ends at or under the limit plus what actual
  costs exceeded their holds (docs/SPEC.md §3.4, §3.5 invariant 3);
- every request that reached a user has exactly one usage row, with its HTTP status;
  no hold is left open; `reserved` is 0 and `spend` the sum of the rows, for everyone;
  `audit_budgets` is clean;
- the only 5xx are the 502s of the requests the fake provider was told to fail
  (provider 5xx -> 502, docs/SPEC.md §2), each refunded;
- a stream the client drops is charged for what it was sent, pro rata (§3.4, §4).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from io import StringIO

import httpx
import pytest
from django.core.management import call_command
from django.db import connections
from django.db.models import Sum

from budgets.models import GatewayUser, Hold
from tests.assertions import assert_books_balance
from tests.conftest import start_server_process
from tests.drills import drill_seconds, record, soaking
from tests.factories import make_budget, make_key, make_user, set_price
from tests.fake_provider import WORDS
from tests.llm_proxy.apis import PATHS, PROMPT, body_for, sse_events, stream_error, text_of
from usage.models import UsageLog
from usage.pricing import Rates, TokenUsage, cost_usd, estimate_usd, prompt_tokens_from_chars

pytestmark = [pytest.mark.drill, pytest.mark.postgres, pytest.mark.slow]

WORKERS = 4
# Per worker: the hot path's pool and Django's. The PostgreSQL server is shared (CI, and
# the other test processes of a machine): 4 x (4 + 2) connections at most.
POOL_ENV = {"OTARI_HOTPATH_POOL_SIZE": "4", "OTARI_DB_POOL_SIZE": "2"}
RATES = Rates(input_per_mtok=Decimal("100"), output_per_mtok=Decimal("100"))
INSTANCES = ("openai", "anthropic")  # the anthropic kind translates chat and responses
PROMPT_TOKENS = prompt_tokens_from_chars(len(PROMPT))


def _price(models: list[str]) -> None:
    for instance in INSTANCES:
        for model in models:
            set_price(f"{instance}:{model}", str(RATES.input_per_mtok), str(RATES.output_per_mtok))


@pytest.fixture(scope="module")
def workers(gateway_config_file, django_db_setup, tmp_path_factory):
    """The gateway in 4 uvicorn workers; its log (stderr) goes to a file the drills read."""
    home = tmp_path_factory.mktemp("load-drill")
    log = home / "gateway.log"
    # A spool of its own: settlements it kept on disk must not be left to other tests.
    server = start_server_process(
        gateway_config_file,
        log_path=log,
        workers=WORKERS,
        OTARI_VAR_DIR=str(home / "var"),
        **POOL_ENV,
    )
    # Every worker up before the clock starts: a burst wider than one worker can take.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        started = time.monotonic()
        asyncio.run(_burst(server.url, 32))
        if time.monotonic() - started < 0.5:
            break
    yield server.url, log
    server.kill()


async def _burst(url: str, n: int) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        await asyncio.gather(*(client.get(url + "/v1/models") for _ in range(n)))


def _tracebacks(log) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if "Traceback" in line]


def _rows_when_written(ids: set[str], timeout: float = 10) -> dict[str, UsageLog]:
    """The usage rows of `ids`; a refusal's or a dropped stream's row may be written just
    after its client saw the answer."""
    deadline = time.monotonic() + timeout
    while True:
        rows = {str(row.id): row for row in UsageLog.objects.all()}
        if ids <= rows.keys() or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def _audit() -> str:
    call_command("audit_budgets", stdout=(out := StringIO()))
    return out.getvalue()


def _assert_closed_books(users: list[GatewayUser]) -> None:
    """No hold open, `reserved` 0 and `spend` the sum of the rows, for every user; the
    audit finds nothing."""
    assert not Hold.objects.filter(status=Hold.Status.OPEN).exists()
    for user in users:
        assert_books_balance(user)
        assert user.reserved_usd == 0
        total = UsageLog.objects.filter(user=user).aggregate(total=Sum("cost_usd"))["total"]
        assert user.spend_usd == (total or 0), user.user_id
    assert _audit() == (
        "audit_budgets: 0 user(s) and 0 ceiling(s) out of balance, 0 overdue hold(s)\n"
    )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


# --- 1. load with budgets running out ---------------------------------------------------

CLIENTS = 64
CAPPED_USERS = 20
AMPLE_USERS = 8
CHUNKS = 8
MAX_TOKENS = 16
# The provider takes a little time (first byte, then between events), so that many holds
# are in flight at once, as with a real model.
OK_MODEL = f"m-chunks-{CHUNKS}-slow-20-delay-5"
FAIL_MODELS = ("m-fail-500", "m-fail-503")
FAIL_SHARE = 0.1
ESTIMATE = estimate_usd(prompt_chars=len(PROMPT), max_output_tokens=MAX_TOKENS, rates=RATES)
# What a served request costs: the prompt and CHUNKS tokens (a failed one is refunded).
SERVED_COST = cost_usd(TokenUsage(input_tokens=PROMPT_TOKENS, output_tokens=CHUNKS), RATES)
WARMUP_SECONDS = 2
CAPPED_SHARE = 0.75


def _cap_running_out_at(rate_per_s: float, seconds: float, fraction: float) -> Decimal:
    """The cap that one capped user's share of traffic at `rate_per_s` (CAPPED_SHARE of
    it on the capped users, FAIL_SHARE refunded) uses up `fraction` of the way through."""
    per_user_per_s = Decimal(rate_per_s * CAPPED_SHARE * (1 - FAIL_SHARE)) / CAPPED_USERS
    cap = SERVED_COST * per_user_per_s * Decimal(seconds * fraction)
    # At least two requests' worth, whatever the rate.
    return max(cap, 2 * ESTIMATE).quantize(Decimal("0.000001"))


@dataclass
class Outcome:
    user: str
    api: str
    stream: bool
    fail: bool
    status: int
    request_id: str | None
    latency_s: float
    at_s: float
    clean: bool  # a 200 whose body or stream is the whole answer, without an error event


class PeakSampler(threading.Thread):
    """Polls `spend + reserved` of the capped users, on a connection of its own, while the
    traffic runs: the highest value each reached."""

    def __init__(self, users: list[str]) -> None:
        super().__init__(daemon=True)
        self.users = users
        self.peaks: dict[str, Decimal] = dict.fromkeys(users, Decimal(0))
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                rows = GatewayUser.objects.filter(pk__in=self.users).values_list(
                    "pk", "spend_usd", "reserved_usd"
                )
                for pk, spend, reserved in rows:
                    self.peaks[pk] = max(self.peaks[pk], spend + reserved)
                self.samples += 1
                time.sleep(0.01)
        finally:
            connections.close_all()


def _answered_whole(api: str, stream: bool, response: httpx.Response) -> bool:
    """A 200 that carries the whole answer: the text, or a stream ending in its terminal
    event with no error event."""
    if not stream:
        return text_of(api, response.json()) == "".join(WORDS[:CHUNKS])
    text = response.text
    if stream_error(api, text) is not None:
        return False
    names = [name for name, _ in sse_events(text)]
    if api == "chat":
        return text.rstrip().endswith("data: [DONE]")
    return names[-1] == ("message_stop" if api == "messages" else "response.completed")


async def _client(
    client: httpx.AsyncClient,
    url: str,
    secrets: dict[str, str],
    users: Iterator[str],
    rng: random.Random,
    started: float,
    deadline: float,
    outcomes: list[Outcome],
    errors: list[str],
) -> None:
    while time.monotonic() < deadline:
        user = next(users)
        api = rng.choice(list(PATHS))
        stream = rng.random() < 0.5
        fail = rng.random() < FAIL_SHARE
        model = rng.choice(FAIL_MODELS) if fail else OK_MODEL
        body = body_for(
            api, f"{rng.choice(INSTANCES)}:{model}", stream=stream, max_tokens=MAX_TOKENS
        )
        sent = time.monotonic()
        try:
            response = await client.post(
                url + PATHS[api], json=body, headers={"Authorization": f"Bearer {secrets[user]}"}
            )
        except httpx.HTTPError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        done = time.monotonic()
        outcomes.append(
            Outcome(
                user=user,
                api=api,
                stream=stream,
                fail=fail,
                status=response.status_code,
                request_id=response.headers.get("X-Otari-Request-Id"),
                latency_s=done - sent,
                at_s=done - started,
                clean=response.status_code == 200 and _answered_whole(api, stream, response),
            )
        )


def _turns(capped: list[str], ample: list[str]) -> Iterator[str]:
    """Whose request is next, for all the clients: each capped user in turn, three times
    in four (CAPPED_SHARE), an ample one the fourth. In turn, not at random: on a slow
    machine a short run has few requests, and every capped user must get enough of them
    to run out."""
    if not capped:
        return itertools.cycle(ample)
    capped_turns = itertools.cycle(capped)
    ample_turns = itertools.cycle(ample)
    return (next(ample_turns if n % 4 == 3 else capped_turns) for n in itertools.count())


async def _load(url, secrets, capped, ample, seconds) -> tuple[list[Outcome], list[str], float]:
    outcomes: list[Outcome] = []
    errors: list[str] = []
    users = _turns(capped, ample)
    # Idle connections are dropped before uvicorn's keep-alive timeout (5 s) closes them:
    # at equal timeouts a request can go out on a connection the server is closing, a
    # ReadError in the client that no server could prevent.
    limits = httpx.Limits(
        max_connections=CLIENTS, max_keepalive_connections=CLIENTS, keepalive_expiry=2
    )
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        started = time.monotonic()
        await asyncio.gather(
            *(
                _client(
                    client,
                    url,
                    secrets,
                    users,
                    random.Random(n),
                    started,
                    started + seconds,
                    outcomes,
                    errors,
                )
                for n in range(CLIENTS)
            )
        )
        return outcomes, errors, time.monotonic() - started


def test_load_with_budgets_running_out_keeps_the_books_exact(gateway, workers):
    url, log = workers
    seconds = drill_seconds(8, 60)
    _price([OK_MODEL, *FAIL_MODELS])
    ample_budget = make_budget(max_budget_usd=Decimal("1000"))
    warmer = make_user(ample_budget, user_id="warm-up")
    # The same traffic for a moment, on an ample budget: it warms the workers' pools, and
    # its rate sizes the caps, so that they run out a third of the way through on a
    # fast machine or a busy one alike.
    # The first second is left out of the rate: each worker opens its pool then.
    warm_secret = {warmer.user_id: make_key(warmer)[1]}
    cold, _, _ = asyncio.run(_load(url, warm_secret, [], [warmer.user_id], 1))
    warm, _, warm_s = asyncio.run(_load(url, warm_secret, [], [warmer.user_id], WARMUP_SECONDS))
    warmup = cold + warm
    limit = _cap_running_out_at(len(warm) / warm_s, seconds, 1 / 3)
    capped_budget = make_budget(max_budget_usd=limit)
    users = [make_user(capped_budget, user_id=f"capped-{n}") for n in range(CAPPED_USERS)]
    users += [make_user(ample_budget, user_id=f"ample-{n}") for n in range(AMPLE_USERS)]
    secrets = {user.user_id: make_key(user)[1] for user in users}
    capped = [user.user_id for user in users[:CAPPED_USERS]]
    ample = [user.user_id for user in users[CAPPED_USERS:]]
    sampler = PeakSampler(capped)
    sampler.start()

    outcomes, errors, elapsed = asyncio.run(_load(url, secrets, capped, ample, seconds))

    sampler.stop.set()
    sampler.join()
    statuses = Counter(o.status for o in outcomes)
    assert errors == []
    # One row per request, with the status the client saw.
    ids = {o.request_id for o in outcomes + warmup}
    assert None not in ids
    rows = _rows_when_written(ids)
    lost = [o for o in outcomes + warmup if o.request_id not in rows]
    assert lost == [], Counter((o.status, o.api, o.stream, o.fail) for o in lost)
    assert rows.keys() == ids
    assert all(rows[o.request_id].status_code == o.status for o in outcomes + warmup)
    # The statuses: 200, a budget refusal (capped users only), and the 502 of a provider
    # told to fail: nothing else, and no 5xx the fake was not told to return.
    for o in outcomes + warmup:
        if o.status == 403:
            assert o.user in capped, o
            assert rows[o.request_id].error_code == "budget_exceeded", o
        elif o.fail:
            assert o.status == 502, o
        else:
            assert (o.status, o.clean) == (200, True), o
    # Every capped user ran out mid-test: served first, refused later.
    ran_out_at = []
    for user in capped:
        mine = [o for o in outcomes if o.user == user]
        assert any(o.status == 200 for o in mine), user
        refused = [o.at_s for o in mine if o.status == 403]
        assert refused, f"{user}'s budget (${limit}) did not run out in {len(mine)} requests"
        ran_out_at.append(min(refused))

    # Never past the limit, by admission: spend + reserved as sampled while running, and
    # spend at the end, are within the limit plus what actual costs exceeded their holds.
    assert sampler.samples > seconds * 10
    overshoot = dict.fromkeys(capped, Decimal(0))
    for hold in Hold.objects.filter(user__in=capped, status=Hold.Status.SETTLED):
        cost = rows[str(hold.request_id)].cost_usd or Decimal(0)
        overshoot[hold.user_id] += max(Decimal(0), cost - hold.amount_usd)
    for user in users[:CAPPED_USERS]:
        user.refresh_from_db()
        assert sampler.peaks[user.user_id] <= limit + overshoot[user.user_id], user.user_id
        assert user.spend_usd <= limit + overshoot[user.user_id], user.user_id

    refunded = Hold.objects.filter(status=Hold.Status.REFUNDED).count()
    assert refunded == statuses[502] + sum(o.status == 502 for o in warmup)
    _assert_closed_books([*users, warmer])
    assert _tracebacks(log) == []

    latencies = [o.latency_s for o in outcomes]
    spend_over_limit = max(
        Decimal(0), *(GatewayUser.objects.get(pk=u).spend_usd - limit for u in capped)
    )
    record(
        "load: 4 workers, 64 clients, 20 budgets running out",
        seconds=round(elapsed, 1),
        requests=len(outcomes),
        per_s=round(len(outcomes) / elapsed),
        statuses=dict(sorted(statuses.items())),
        unexpected_5xx=sum(o.status >= 500 and not o.fail for o in outcomes),
        transport_errors=len(errors),
        refunds=statuses[502],
        cap_usd=limit,
        budgets_ran_out_s=f"{min(ran_out_at):.1f}-{max(ran_out_at):.1f}",
        peak_over_cap_usd=max(sampler.peaks[u] - limit for u in capped),
        overspend_usd=spend_over_limit,
        holds_leaked=Hold.objects.filter(status=Hold.Status.OPEN).count(),
        rows_lost=len(ids - rows.keys()),
        p50_ms=round(statistics.median(latencies) * 1000),
        p99_ms=round(_percentile(latencies, 0.99) * 1000),
    )


# --- 3. clients that vanish mid-stream --------------------------------------------------

STREAM_CHUNKS = 30
VANISH_MODEL = f"m-chunks-{STREAM_CHUNKS}-delay-20"
VANISH_MAX_TOKENS = 64
VANISH_CONCURRENCY = 20
# The charge of a stream cut after j content events: the prompt, and the text it was
# sent, one token per four characters (docs/SPEC.md §3.4), for every j.
DELIVERED_TOKENS = [
    prompt_tokens_from_chars(len("".join(WORDS[i % len(WORDS)] for i in range(j))))
    for j in range(STREAM_CHUNKS + 1)
]


def _content_delta(api: str, name: str | None, data: str) -> str | None:
    """The text of a content event of `api`'s stream (None for any other event)."""
    if data == "[DONE]":
        return None
    event = json.loads(data)
    if api == "chat":
        choices = event.get("choices") or [{}]
        return choices[0].get("delta", {}).get("content") or None
    if api == "messages":
        return event["delta"].get("text") if name == "content_block_delta" else None
    return event["delta"] if name == "response.output_text.delta" else None


@dataclass
class Dropped:
    api: str
    request_id: str
    read: int  # content events the client read before hanging up
    read_chars: int


async def _drop_one(client: httpx.AsyncClient, url: str, secret: str, rng: random.Random):
    api = rng.choice(list(PATHS))
    body = body_for(
        api,
        f"{rng.choice(INSTANCES)}:{VANISH_MODEL}",
        stream=True,
        max_tokens=VANISH_MAX_TOKENS,
    )
    after = rng.randrange(STREAM_CHUNKS)  # 0: right after the headers
    read, chars, block = 0, 0, []
    async with client.stream(
        "POST", url + PATHS[api], json=body, headers={"Authorization": f"Bearer {secret}"}
    ) as response:
        assert response.status_code == 200
        request_id = response.headers["X-Otari-Request-Id"]
        if after:
            async for line in response.aiter_lines():
                if line:
                    block.append(line)
                    continue
                for name, data in sse_events("\n".join(block)):
                    text = _content_delta(api, name, data)
                    if text is not None:
                        read, chars = read + 1, chars + len(text)
                block = []
                if read >= after:
                    break
        # Leaving the block closes the connection mid-stream.
    return Dropped(api=api, request_id=request_id, read=read, read_chars=chars)


async def _vanish(url: str, secret: str, n: int) -> list[Dropped]:
    rng = random.Random(19)
    semaphore = asyncio.Semaphore(VANISH_CONCURRENCY)
    # No keep-alive: each dropped stream's connection is closed, never reused.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one() -> Dropped:
            async with semaphore:
                return await _drop_one(client, url, secret, rng)

        return await asyncio.gather(*(one() for _ in range(n)))


def test_streams_dropped_at_random_points_are_charged_what_they_were_sent(gateway, workers):
    url, log = workers
    n = 200 if soaking() else 40
    _price([VANISH_MODEL])
    user = make_user(make_budget(max_budget_usd=Decimal("1000")), user_id="vanishing")
    _, secret = make_key(user)

    started = time.monotonic()
    dropped = asyncio.run(_vanish(url, secret, n))
    elapsed = time.monotonic() - started

    rows = _rows_when_written({d.request_id for d in dropped})
    assert len(rows) == n
    overcharge = []
    for d in dropped:
        row = rows[d.request_id]
        hold = Hold.objects.get(pk=d.request_id)
        if row.status == UsageLog.Status.SUCCESS:
            # The answer was complete before the hang-up was seen: charged what the
            # provider reported, the whole answer.
            assert (row.prompt_tokens, row.completion_tokens) == (PROMPT_TOKENS, STREAM_CHUNKS)
        else:
            assert (row.status, row.status_code) == ("client_disconnected", 499), row
            assert row.prompt_tokens == PROMPT_TOKENS
            if row.completion_tokens == STREAM_CHUNKS:
                # The provider had finished and reported its usage (the whole answer was
                # relayed), the client hung up before reading the end: charged that.
                sent = STREAM_CHUNKS
            else:
                # Charged the text it was sent: a whole number of content events, never
                # fewer than the client read.
                assert row.completion_tokens in DELIVERED_TOKENS[d.read :], (d, row)
                sent = DELIVERED_TOKENS.index(row.completion_tokens, d.read)
            overcharge.append(sent - d.read)
        usage = TokenUsage(input_tokens=row.prompt_tokens, output_tokens=row.completion_tokens)
        assert row.cost_usd == cost_usd(usage, RATES)
        assert hold.status == Hold.Status.SETTLED
        assert row.cost_usd <= hold.amount_usd
    _assert_closed_books([user])
    assert _tracebacks(log) == []

    statuses = Counter(row.status for row in rows.values())
    record(
        "vanishing clients: streams dropped at random points",
        seconds=round(elapsed, 1),
        requests=n,
        statuses=dict(sorted(statuses.items())),
        rows_lost=n - len(rows),
        holds_leaked=Hold.objects.filter(status=Hold.Status.OPEN).count(),
        charged_usd=user.spend_usd,
        events_charged_past_hangup_max=max(overcharge, default=0),
        upstreams_closed_early=gateway.fake.aborted_by_client,
    )
