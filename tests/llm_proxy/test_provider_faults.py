"""Provider faults on every generation endpoint (issue 19, "Faults to survive" item 2).

{chat, messages, responses} x {openai-kind, anthropic-kind provider} x {stream, not} x
each fault below, through HTTP into the ASGI app, against the fake provider
(tests/fake_provider.py, which breaks the wire as the model name says). Half the
combinations are translated (messages on an openai provider, chat and responses on an
anthropic one). A test is one fault; its twelve endpoint x kind x mode cases run at
once, each as a user of its own (a test costs seconds of database set-up, a case
milliseconds, or the provider timeout). After each case, as a client and an auditor see
it:

- the status, and the error body in the shape of the API called (or, once a stream has
  started, its error event);
- exactly one usage row per request, with its status and cost (docs/SPEC.md §3.4):
  refunded with no cost before the commit point, charged pro rata for what was delivered
  after it, the estimate for a stream that never reports usage;
- every hold closed exactly once (settled or refunded, none left open), `reserved` 0,
  `spend` = the sum of the usage costs.

The faults, and where each is proven:

- 500 / 429 / 401 bursts: `burst` here (single requests: test_chat_failures.py on chat,
  test_endpoint_matrix.py's `fail_500` everywhere);
- a first byte later than the provider timeout: `slow_first_byte` here;
- a provider that never answers: before its first byte, test_endpoint_matrix.py's
  `timeout` outcome (`m-hang`) on every endpoint x kind x mode; after its first words,
  `stall` here;
- a connection reset mid-stream (TCP RST): `reset` here (a clean close, FIN:
  test_endpoint_matrix.py's `midstream`);
- garbage SSE (a non-JSON body when not streaming): `garbage` here;
- a stream that never sends usage: `no_usage` here (chat, with the three
  OTARI_STREAM_MISSING_USAGE policies: test_chat_failures.py).

The module's figures (requests, statuses, holds leaked, rows lost) are recorded as one
drill row (tests/drills.py) when the module ends.
"""

from __future__ import annotations

import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal

import pytest
from django.db.models import Sum

from budgets.models import Hold
from tests.assertions import assert_books_balance
from tests.drills import record
from tests.factories import make_budget, make_key, make_user, set_price
from tests.fake_provider import WORDS
from tests.llm_proxy.apis import (
    APIS,
    INSTANCES,
    PATHS,
    PROMPT,
    assert_error_shape,
    body_for,
    stream_error,
)
from usage.models import UsageLog
from usage.pricing import Rates, TokenUsage, cost_usd

pytestmark = [pytest.mark.postgres, pytest.mark.drill]

RATES = Rates(input_per_mtok=Decimal("0.15"), output_per_mtok=Decimal("0.60"))
PROMPT_TOKENS = math.ceil(len(PROMPT) / 4)
MAX_TOKENS = 64  # body_for's output maximum: what a request without usage is charged
DELIVERED = 3  # content chunks a broken stream sends before it breaks
# A burst: each failing status twice, interleaved, on one user.
BURST = [("m-fail-500", 502, "provider_error"), ("m-fail-429", 429, "provider_rate_limited")]
BURST += [("m-fail-401", 502, "provider_auth_error")]
BURST_ROUNDS = 2


def cost(prompt: int, completion: int) -> Decimal:
    return cost_usd(TokenUsage(input_tokens=prompt, output_tokens=completion), RATES)


def delivered_tokens(chunks: int) -> int:
    """What the gateway charges for `chunks` words delivered without reported usage."""
    return math.ceil(len("".join(WORDS[:chunks])) / 4)


# --- the figures of the whole module, recorded once at its end ---------------------------


@dataclass
class Figures:
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    holds_leaked: int = 0
    rows_lost: int = 0
    rows_extra: int = 0
    books_drift_usd: Decimal = Decimal(0)
    cases: int = 0


@pytest.fixture(scope="module")
def figures():
    totals = Figures()
    yield totals
    record(
        "provider faults (3 endpoints x 2 provider kinds x stream/not)",
        cases=totals.cases,
        requests=totals.requests,
        failures_by_status={str(k): v for k, v in sorted(totals.statuses.items()) if k >= 400},
        served_200=totals.statuses[200],
        holds_leaked=totals.holds_leaked,
        rows_lost=totals.rows_lost,
        rows_extra=totals.rows_extra,
        books_drift_usd=totals.books_drift_usd,
    )


KINDS = ("openai", "anthropic")
MODES = (False, True)


@dataclass
class Case:
    """One endpoint x kind x mode combination of a test: its own user, and what it was
    answered."""

    api: str
    kind: str
    stream: bool
    user: object
    secret: str
    responses: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return (
            f"{PATHS[self.api]} on the {self.kind} provider, {'stream' if self.stream else 'json'}"
        )


def _run(gateway, figures: Figures, models, expected_rows: int) -> list[Case]:
    """Every endpoint x kind x mode case, at once: `models(kind)` are the model names to
    send, in order, on that case's own user. The case's figures are counted before any
    assertion, so that a failing case still shows in the recorded row."""
    cases = []
    for api in APIS:
        for kind in KINDS:
            for stream in MODES:
                for model in models(kind):
                    set_price(model, "0.15", "0.60")
                user = make_user(budget=make_budget(max_budget_usd=Decimal("5")))
                cases.append(Case(api, kind, stream, user, make_key(user)[1]))

    def send(case: Case) -> None:
        with gateway.client(case.secret) as client:
            for model in models(case.kind):
                body = body_for(case.api, model, stream=case.stream)
                case.responses.append(client.post(PATHS[case.api], json=body))

    with ThreadPoolExecutor(len(cases)) as pool:
        list(pool.map(send, cases))
    for case in cases:
        _tally(figures, case.user, case.responses, expected_rows)
    return cases


def _tally(figures: Figures, user, responses, expected_rows: int) -> None:
    user.refresh_from_db()
    rows = UsageLog.objects.filter(user=user)
    charged = rows.aggregate(total=Sum("cost_usd"))["total"] or Decimal(0)
    figures.cases += 1
    figures.requests += len(responses)
    figures.statuses.update(r.status_code for r in responses)
    figures.holds_leaked += Hold.objects.filter(user=user, status=Hold.Status.OPEN).count()
    figures.rows_lost += max(0, expected_rows - rows.count())
    figures.rows_extra += max(0, rows.count() - expected_rows)
    figures.books_drift_usd += abs(user.spend_usd - charged) + user.reserved_usd


def _assert_closed_once(case: Case, rows: int, hold_status: str) -> None:
    """`rows` usage rows, as many holds, each closed (`hold_status`), books balanced."""
    user = case.user
    assert UsageLog.objects.filter(user=user).count() == rows, case.label
    holds = Hold.objects.filter(user=user)
    assert holds.count() == rows, case.label
    assert set(holds.values_list("status", flat=True)) == {hold_status}, case.label
    user.refresh_from_db()
    assert user.reserved_usd == 0, case.label
    charged = UsageLog.objects.filter(user=user).aggregate(total=Sum("cost_usd"))["total"]
    assert user.spend_usd == (charged or 0), case.label
    assert_books_balance(user)


def _the_row(case: Case) -> UsageLog:
    (row,) = UsageLog.objects.filter(user=case.user)
    assert case.responses[0].headers["X-Otari-Request-Id"] == str(row.id), case.label
    return row


# --- before the commit point: an HTTP error in the API's shape, a full refund --------------


def test_a_burst_of_500_429_401_is_refunded_request_by_request(gateway, figures):
    sent = [b for _ in range(BURST_ROUNDS) for b in BURST]

    def models(kind: str) -> list[str]:
        return [f"{INSTANCES[kind]['ok']}:{m}" for m, _, _ in sent]

    for case in _run(gateway, figures, models, len(sent)):
        api = case.api
        for response, (_, status, code) in zip(case.responses, sent, strict=True):
            assert response.status_code == status, (case.label, response.text)
            assert not response.headers["content-type"].startswith("text/event-stream")
            error = assert_error_shape(api, status, response.json())
            if api != "messages":
                assert error["code"] == code, case.label
            if status == 429:
                assert response.headers["Retry-After"] == "1"  # the provider's, passed on
        rows = list(UsageLog.objects.filter(user=case.user).order_by("timestamp"))
        assert [(r.status, r.status_code, r.cost_usd) for r in rows] == [
            ("error", status, None) for _, status, _ in sent
        ], case.label
        assert [r.upstream_status_code for r in rows] == [int(m[-3:]) for m, _, _ in sent]
        assert {str(r.id) for r in rows} == {
            r.headers["X-Otari-Request-Id"] for r in case.responses
        }
        _assert_closed_once(case, len(sent), Hold.Status.REFUNDED)
        assert case.user.spend_usd == 0


def test_a_first_byte_later_than_the_provider_timeout_is_a_504_refunded(gateway, figures):
    """The provider answers, but 1.5 s late, on an instance whose timeout is 1 s."""

    def models(kind: str) -> list[str]:
        return [f"{INSTANCES[kind]['short']}:m-chunks-5-slow-1500"]

    for case in _run(gateway, figures, models, 1):
        api = case.api
        (response,) = case.responses
        assert response.status_code == 504, (case.label, response.text)
        error = assert_error_shape(api, 504, response.json())
        if api != "messages":
            assert error["code"] == "provider_timeout"
        row = _the_row(case)
        assert (row.status, row.status_code, row.cost_usd) == ("error", 504, None), case.label
        assert row.upstream_error.startswith("ReadTimeout"), row.upstream_error
        _assert_closed_once(case, 1, Hold.Status.REFUNDED)


# --- after the commit point: an error event, charged what was delivered -------------------

# fault -> (instance role, model); each sends DELIVERED words, then breaks.
BROKEN = {
    # The provider goes silent for ever after the first words; the provider timeout (the
    # allowed gap between chunks, 1 s on the `short` instances) ends it.
    "stall": ("short", f"m-chunks-10-stallafter-{DELIVERED}"),
    # The connection is reset (RST) after the first words.
    "reset": ("ok", f"m-chunks-10-resetafter-{DELIVERED}"),
    # After the first words, bytes that are no events (broken JSON, invalid UTF-8, a line
    # with no field), then a clean end of the body without the closing events.
    "garbage": ("ok", f"m-chunks-{DELIVERED}-garbage"),
}
# A JSON answer broken the same way: never a 200; nothing was delivered, so a refund.
BROKEN_JSON = {
    "stall": (504, "provider_timeout"),
    "reset": (502, "provider_error"),
    "garbage": (502, "provider_error"),
}


@pytest.mark.parametrize("fault", list(BROKEN))
def test_a_provider_that_breaks_mid_answer(gateway, figures, fault):
    role, name = BROKEN[fault]

    def models(kind: str) -> list[str]:
        return [f"{INSTANCES[kind][role]}:{name}"]

    for case in _run(gateway, figures, models, 1):
        api = case.api
        (response,) = case.responses
        row = _the_row(case)
        if not case.stream:
            status, code = BROKEN_JSON[fault]
            assert response.status_code == status, (case.label, response.text)
            error = assert_error_shape(api, status, response.json())
            if api != "messages":
                assert error["code"] == code, case.label
            assert (row.status, row.status_code, row.cost_usd) == ("error", status, None)
            _assert_closed_once(case, 1, Hold.Status.REFUNDED)
            continue
        # Committed at the first bytes: a 200, the words that came, then the API's error
        # event.
        assert response.status_code == 200, (case.label, response.text)
        assert response.headers["content-type"].startswith("text/event-stream")
        assert all(word in response.text for word in WORDS[:DELIVERED]), case.label
        error = stream_error(api, response.text)
        assert error is not None, (case.label, response.text)
        if api == "chat":
            assert error == {
                "error": {"message": "An error occurred during streaming", "type": "server_error"}
            }
            assert response.text.endswith("data: [DONE]\n\n"), case.label
        else:
            assert error["type"] == "error", case.label
        # Nothing of the garbage reached the client.
        assert "not an event" not in response.text, case.label
        assert "unterminated" not in response.text, case.label
        # Charged pro rata: the prompt and the words delivered (no usage was reported).
        assert (row.status, row.status_code) == ("error", 502), case.label
        assert (row.prompt_tokens, row.completion_tokens) == (
            PROMPT_TOKENS,
            delivered_tokens(DELIVERED),
        ), case.label
        assert row.cost_usd == cost(PROMPT_TOKENS, delivered_tokens(DELIVERED)), case.label
        _assert_closed_once(case, 1, Hold.Status.SETTLED)


def test_an_answer_without_usage_is_charged_the_estimate(gateway, figures):
    """docs/SPEC.md §3.4, OTARI_STREAM_MISSING_USAGE=estimate (the default): the prompt's
    estimate and the request's output maximum (more than the 5 words it got)."""

    def models(kind: str) -> list[str]:
        return [f"{INSTANCES[kind]['ok']}:m-chunks-5-nousage"]

    for case in _run(gateway, figures, models, 1):
        api = case.api
        (response,) = case.responses
        assert response.status_code == 200, (case.label, response.text)
        if case.stream:
            assert stream_error(api, response.text) is None, case.label
        row = _the_row(case)
        assert (row.status, row.status_code) == ("success", 200), case.label
        assert (row.prompt_tokens, row.completion_tokens) == (PROMPT_TOKENS, MAX_TOKENS)
        assert row.cost_usd == cost(PROMPT_TOKENS, MAX_TOKENS), case.label
        assert row.error_message == "The provider reported no usage; charged the estimate"
        _assert_closed_once(case, 1, Hold.Status.SETTLED)
