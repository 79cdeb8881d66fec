"""Admission: from an HTTP request to an `Exchange` holding its money, or a refusal.

Admission owns everything decided before a provider is called (docs/SPEC.md §3.3):

- the body, the model it names and the provider that serves it, and the route to it
  (what cannot be translated is refused here, before anything is held);
- who pays: an API key's caller (llm_proxy.auth), or, in platform mode (§7), the user
  and ordered attempts the platform resolves a user token into (llm_proxy.platform);
- the price (llm_proxy.pipeline.pricing) and, when the default output maximum does not
  fit what is left, a smaller one (llm_proxy.pipeline.budget);
- the rate limits, then the budget hold: opening the hold is the last step, so that a
  request refused for any other reason holds nothing.

A refusal of a known caller leaves a usage row (`exchange.refusal_close`); a refusal
before the caller is known (bad key, malformed body with an unknown key) leaves none.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http.request import RawPostDataException
from django.utils import timezone

from budgets.exceptions import BudgetExceeded, ModelNotAllowed, PricingMissing, UserBlocked
from budgets.rest import credential_from_headers
from budgets.selectors import rates_current
from budgets.services import holds
from common.exceptions import (
    BadRequest,
    GatewayError,
    PayloadTooLarge,
    PermissionDenied,
    ServiceUnavailable,
)
from common.rest_json import STORABLE_MESSAGE, storable
from llm_proxy import platform, ratelimit, routing
from llm_proxy.auth import (
    authenticate,
    authenticate_platform_user,
    is_platform_user_token,
    kept_caller,
    model_allowed,
)
from llm_proxy.pipeline import budget, pricing
from llm_proxy.pipeline.attempts import Attempt, Target, refusal_reports
from llm_proxy.pipeline.exchange import Exchange, refusal_close
from llm_proxy.providers import resolve_model
from llm_proxy.routing import health
from usage.pricing import prompt_tokens_from_chars

if TYPE_CHECKING:
    import uuid
    from datetime import datetime

    from django.http import HttpRequest

    from budgets.selectors import Caller
    from budgets.services.holds import BudgetState
    from llm_proxy.formats.base import ApiFormat
    from llm_proxy.providers.base import Provider
    from llm_proxy.ratelimit import RateAdmission
    from usage.pricing import Rates


def parse_body(request: HttpRequest) -> dict[str, Any]:
    try:
        raw = request.body
    except RequestDataTooBig as exc:
        raise PayloadTooLarge from exc
    except RawPostDataException as exc:  # pragma: no cover - body already consumed
        raise BadRequest("Could not read the request body") from exc
    try:
        # Decoded strictly first: json.loads(bytes) decodes with "surrogatepass", which
        # lets a lone surrogate sent as bytes (CESU-8) through unseen by the check below.
        body = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: JSON nested thousands of levels deep.
        raise BadRequest("Request body is not valid JSON", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object", code="invalid_json")
    # Valid JSON may carry text no one can use, the rule of the management API
    # (common.rest_json.text_storable): a lone surrogate ("\ud800") cannot be encoded for
    # the provider, and a NUL ("\u0000") in a model or user name fails the statements
    # that look it up or write it (PostgreSQL's text refuses NUL). Only a body with such
    # an escape at all (rare: emoji arrive as UTF-8) is walked.
    if _UNSTORABLE_ESCAPE.search(raw) and not storable(body):
        raise BadRequest(STORABLE_MESSAGE)
    return body


_UNSTORABLE_ESCAPE = re.compile(rb"\\u(?:[dD][89a-fA-F]|0000)")
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def model_selector(body: dict[str, Any]) -> str:
    """The model the body names (`provider:model`, or a platform selector)."""
    selector = body.get("model")
    if not isinstance(selector, str) or not selector:
        raise BadRequest("model is required", code="invalid_model", param="model")
    if _CONTROL_CHARACTERS.search(selector):
        # No provider or policy is named so; CR/LF would also forge log lines.
        raise BadRequest(
            "model may not contain control characters", code="invalid_model", param="model"
        )
    if len(selector) > MAX_MODEL_CHARS:
        raise BadRequest(
            f"model must be at most {MAX_MODEL_CHARS} characters",
            code="invalid_model",
            param="model",
        )
    return selector


def named_user_check(caller: Caller, named_users: list[str]) -> None:
    """The one identity rule of every generation endpoint (docs/SPEC.md §1): a request
    may name only the user it is billed to, in `user` and in `metadata.user_id` alike
    (ApiFormat.named_users). A key's request naming another user, or a master-key
    request whose two names disagree, is a 403 `user_mismatch`.

    Some clients fill those fields with ids of their own (Claude Code sets
    metadata.user_id); OTARI_REJECT_USER_MISMATCH=false lets them through, and the key's
    user (the master key's: the first name) is billed either way.
    """
    if not settings.OTARI_REJECT_USER_MISMATCH:
        return
    if any(name != caller.user_id for name in named_users):
        raise PermissionDenied(
            "This API key belongs to a different user than the request names"
            if caller.api_key_id is not None
            else "The request's user and metadata.user_id name different users",
            code="user_mismatch",
        )


# What the usage row's and the hold's model columns hold.
MAX_MODEL_CHARS = 255


async def admit(
    request: HttpRequest, fmt: ApiFormat, request_id: uuid.UUID, started: float
) -> Exchange:
    """Authenticate and admit, or raise the refusal (after logging it, for known users)."""
    credential = credential_from_headers(request)
    if await is_platform_user_token(credential):
        return await _admit_platform(request, fmt, request_id, started, credential)
    return await _admit_local(request, fmt, request_id, started, credential)


async def _admit_local(
    request: HttpRequest, fmt: ApiFormat, request_id: uuid.UUID, started: float, credential: str
) -> Exchange:
    """A request made with an API key (or the master key): one attempt, at the provider
    the model names.

    The body is checked before the caller is loaded, but a malformed body of a known
    caller is still refused after the load, so that it leaves a usage row.
    """
    body: dict[str, Any] = {}
    refusal: GatewayError | None = None
    provider: Provider | None = None
    target: Target | None = None
    model = model_key = ""
    try:
        body = parse_body(request)
        selector = model_selector(body)
        if routing.is_routing_name(selector):
            return await _admit_routed(request, fmt, request_id, started, credential, body)
        provider, model = resolve_model(selector)
        model_key = f"{provider.name}:{model}"
        fmt.validate(body)
        target = Target.build(fmt, provider, body, model, request.headers)
    except GatewayError as exc:
        refusal = exc
    now = timezone.now()
    if refusal is None and provider is not None and target is not None:
        exchange = await _admit_kept(
            request, fmt, body, request_id, started, credential, provider, model, target, now
        )
        if exchange is not None:
            return exchange
    caller = await authenticate(
        credential=credential, named_user=fmt.named_user(body), model_key=model_key, now=now
    )
    try:
        if refusal is not None or provider is None or target is None:
            raise refusal or BadRequest("model is required")
        named_user_check(caller, fmt.named_users(body))
        allowed = model_allowed(caller.allowed_models, model_key)
        attempt = Attempt(
            provider=provider,
            provider_name=provider.name,
            model=model,
            model_key=model_key,
            # A refused caller does not get to freeze a catalog price.
            rates=(
                await pricing.rates_for(
                    caller=caller, provider=provider, model=model, model_key=model_key, now=now
                )
                if allowed and not caller.blocked
                else caller.rates
            ),
            target=target,
            refusal=None if allowed else ModelNotAllowed(),
        )
        return await _admit_caller(caller, fmt, body, [attempt], request_id, started, now)
    except GatewayError as exc:
        provider_name = provider.name if provider else ""
        model = model or str(body.get("model") or "")[:255]
        await refusal_close(exc, caller, fmt, request_id, started, provider_name, model)
        raise


async def _admit_kept(
    request: HttpRequest,
    fmt: ApiFormat,
    body: dict[str, Any],
    request_id: uuid.UUID,
    started: float,
    credential: str,
    provider: Provider,
    model: str,
    target: Target,
    now: datetime,
) -> Exchange | None:
    """Admission with the caller this process kept for the key (llm_proxy.auth), its hold
    taken by ADMIT_CHECKED, which vouches for the caller: a successful request's only
    statement before the provider. A refusal for the user's money that ADMIT_CHECKED
    reports (holds.CheckedRefusal) is explained and recorded here. None when there is no
    kept caller, or when anything else would come of it (another refusal, a request that
    takes no hold, an output maximum to fit): the request is then admitted from a fresh
    load, which decides it as if nothing had been kept. Nothing is written before
    ADMIT_CHECKED (a kept caller has no rate limits), so that second admission starts
    from a clean slate."""
    if not holds.caller_reuse_enabled():
        return None
    model_key = f"{provider.name}:{model}"
    kept = kept_caller(credential=credential, model_key=model_key, now=now)
    if kept is None:
        return None
    caller, key_hash = kept
    attempt = Attempt(
        provider=provider,
        provider_name=provider.name,
        model=model,
        model_key=model_key,
        rates=caller.rates,
        target=target,
    )
    try:
        named_user_check(caller, fmt.named_users(body))
        if not model_allowed(caller.allowed_models, model_key):
            return None
        attempt.rates = await pricing.rates_for(
            caller=caller, provider=provider, model=model, model_key=model_key, now=now
        )
        return await _admit_caller(
            caller, fmt, body, [attempt], request_id, started, now, kept=key_hash
        )
    except holds.CheckedRefusal as exc:
        # Refused for money by ADMIT_CHECKED, which verified the caller: a refusal in two
        # round trips (that statement, and the usage row).
        await refusal_close(exc, caller, fmt, request_id, started, provider.name, model)
        raise
    except ServiceUnavailable:
        # The database, not the caller: answered as any request's outage is.
        raise
    except (GatewayError, holds.CallerUnverified):
        return None


async def _admit_routed(
    request: HttpRequest,
    fmt: ApiFormat,
    request_id: uuid.UUID,
    started: float,
    credential: str,
    body: dict[str, Any],
) -> Exchange:
    """A request naming an alias or a routing policy (docs/ROUTING.md): its attempts are
    the policy's plan for this caller, tried in order until one reaches its commit point.

    The caller is loaded first (a policy may be the user's own, and its conditions read
    the budget), then the plan and the prices of its targets (one statement). A name
    that is no policy is refused as a model selector that names no provider.
    """
    now = timezone.now()
    caller = await authenticate(
        credential=credential, named_user=fmt.named_user(body), model_key="", now=now
    )
    name = body["model"]
    try:
        named_user_check(caller, fmt.named_users(body))
        policy = await routing.policy_lookup_async(name, user_id=caller.user_id)
        if policy is None:
            resolve_model(name)  # raises the refusal of a selector without a provider
        fmt.validate(body)
        state = budget.loaded_state(caller, caller.limit_usd(now), now)
        plan = routing.plan(
            policy,
            routing.Context(
                user_id=caller.user_id,
                key_id=str(caller.api_key_id) if caller.api_key_id else None,
                budget_used_pct=state.used_pct if state else None,
                budget_remaining_usd=state.remaining_usd if state else None,
                allowed_models=caller.allowed_models,
            ),
            cooling=await health.cooling(policy.targets()),
        )
        if not plan.candidates:
            raise ModelNotAllowed
        rates = await rates_current(model_keys=plan.candidates, now=now)
        attempts = [
            _routed_attempt(request, fmt, body, key, rates.get(key)) for key in plan.candidates
        ]
        exchange = await _admit_caller(
            caller, fmt, body, attempts, request_id, started, now, hold_first=True
        )
    except GatewayError as exc:
        await refusal_close(exc, caller, fmt, request_id, started, "", name[:MAX_MODEL_CHARS])
        raise
    exchange.policy = policy.name
    return exchange


def _routed_attempt(
    request: HttpRequest,
    fmt: ApiFormat,
    body: dict[str, Any],
    model_key: str,
    rates: Rates | None,
) -> Attempt:
    """One target of a plan, routed (and translated) as a direct request to it is; or,
    when it cannot be tried (no route, no price while prices are required), with its
    refusal."""
    provider_name, _, model = model_key.partition(":")
    attempt = Attempt(
        provider=None, provider_name=provider_name, model=model, model_key=model_key, rates=rates
    )
    try:
        # A target whose provider left the configuration since the policy was saved.
        attempt.provider, _ = resolve_model(model_key)
        if rates is None and settings.OTARI_REQUIRE_PRICING:
            raise PricingMissing.for_model(attempt.model_key)
        attempt.target = Target.build(fmt, attempt.provider, body, model, request.headers)
    except GatewayError as exc:
        attempt.provider = None
        attempt.refusal = exc
    return attempt


async def _admit_platform(
    request: HttpRequest,
    fmt: ApiFormat,
    request_id: uuid.UUID,
    started: float,
    user_token: str,
) -> Exchange:
    """Admission of a request made with a platform user token.

    The request is checked before the platform is asked (a malformed request is the
    caller's 400 without a round trip), then resolved: the platform names the user, held
    and billed locally, and the attempts. Refusals before the user is known leave no
    usage row, as for an unknown key.
    """
    body = parse_body(request)
    selector = model_selector(body)
    fmt.validate(body)
    resolution = await platform.resolve(user_token=user_token, selector=selector)
    now = timezone.now()
    caller = await authenticate_platform_user(user_id=resolution.user_id, now=now)
    rates = await rates_current(
        model_keys=[resolved.model_key for resolved in resolution.attempts], now=now
    )
    attempts = [
        _platform_attempt(request, fmt, body, caller, resolved, rates.get(resolved.model_key))
        for resolved in resolution.attempts
    ]
    try:
        return await _admit_caller(
            caller, fmt, body, attempts, request_id, started, now, resolution.request_id
        )
    except GatewayError as exc:
        # Recorded against the first attempt that could have been tried (else the last).
        first = next((a for a in attempts if a.refusal is None), attempts[-1])
        reports = refusal_reports(attempts, exc, resolution.request_id)
        await refusal_close(
            exc, caller, fmt, request_id, started, first.provider_name, first.model, reports
        )
        raise


def _platform_attempt(
    request: HttpRequest,
    fmt: ApiFormat,
    body: dict[str, Any],
    caller: Caller,
    resolved: platform.ResolvedAttempt,
    rates: Rates | None,
) -> Attempt:
    """An attempt as the gateway will try it, routed (and translated) exactly as a local
    request is; or, when it cannot be tried, with its refusal."""
    attempt = Attempt(
        provider=None,
        provider_name=resolved.provider,
        model=resolved.model,
        model_key=resolved.model_key,
        rates=rates,
        resolved=resolved,
    )
    try:
        provider = platform.provider_for(resolved)
        # The local operator's restrictions on the user still apply.
        if not model_allowed(caller.allowed_models, resolved.model_key):
            raise ModelNotAllowed
        attempt.target = Target.build(fmt, provider, body, resolved.model, request.headers)
        attempt.provider = provider
    except GatewayError as exc:
        attempt.refusal = exc
    return attempt


async def _admit_caller(
    caller: Caller,
    fmt: ApiFormat,
    body: dict[str, Any],
    attempts: list[Attempt],
    request_id: uuid.UUID,
    started: float,
    now: datetime,
    platform_request_id: str | None = None,
    *,
    hold_first: bool = False,
    kept: str | None = None,
) -> Exchange:
    """The admission checks of §3.3, in order, and the hold.

    A local request has one attempt; a platform request (§7) has the resolved ones, and
    an attempt that cannot be tried (a model the user may not use, no route) carries its
    refusal. The hold covers the dearest usable attempt, so whichever serves fits under
    it; or, for a routed request (`hold_first`), the first one, and a failover to a
    dearer one grows it (Exchange.advance). The request is charged at the price of the
    attempt that serves. The platform prices
    and bills its own attempts: `require_pricing` is for local providers.

    A `kept` caller (_admit_kept; `kept` is its key's hash) is not fitted to its loaded
    money, which may be out of date: its hold is the full estimate, taken by
    ADMIT_CHECKED; when that fits the locked row, fitting would have changed nothing.
    When it does not, the refusal carries the locked row's money: a smaller output
    maximum that fits it sends the request to a fresh load, fitted there; otherwise the
    refusal is explained from that money.
    """
    if caller.blocked:
        raise UserBlocked
    usable = [index for index, attempt in enumerate(attempts) if attempt.refusal is None]
    if not usable:
        # Nothing can be tried: the last attempt's reason is the request's.
        refusal = attempts[-1].refusal
        assert refusal is not None  # noqa: S101
        raise refusal
    limit = caller.limit_usd(now)
    state = budget.loaded_state(caller, limit, now)
    priced = [rates for index in usable if (rates := attempts[index].rates) is not None]
    texts = fmt.prompt_texts(body)
    prompt_chars = fmt.prompt_chars(body, texts)
    held_for = priced[:1] if hold_first else priced
    ask = budget.Ask(fmt, prompt_chars, fmt.output_token_budget(body), held_for)
    if not priced and platform_request_id is None and settings.OTARI_REQUIRE_PRICING:
        if state is not None and state.remaining_usd <= 0:
            raise budget.explain(BudgetExceeded(state=state), ask)
        raise PricingMissing.for_model(attempts[usable[0]].model_key)
    # Free models and keys excluded from budget take no hold and are never refused for
    # money (docs/SPEC.md §1, §3.3).
    takes_hold = any(not rates.is_free for rates in priced) and not caller.exclude_from_budget
    if kept is not None and not takes_hold:
        raise holds.CallerUnverified
    fitted = budget.fit_max_output(ask, body, state) if takes_hold and kept is None else None
    if fitted is not None:
        body = {**body, fmt.max_output_fields[0]: fitted}
        ask = budget.Ask(fmt, prompt_chars, fitted, held_for)
        for attempt in attempts:
            attempt.retarget(body)
    for attempt in attempts:
        if attempt.rates is not None:
            alone = budget.Ask(fmt, prompt_chars, ask.max_output_tokens, [attempt.rates])
            attempt.estimate_usd = alone.estimate_usd()
    # Rate limits (429) before the budget: no hold is taken for a request refused here.
    rate = await ratelimit.rate_admit(
        caller=caller, tokens=prompt_tokens_from_chars(prompt_chars) + ask.max_output_tokens
    )
    estimate = ask.estimate_usd()
    held = False
    if takes_hold:
        try:
            state = await _hold_open(
                rate,
                kept=(caller, kept) if kept is not None else None,
                user_id=caller.user_id,
                request_id=request_id,
                amount_usd=estimate,
                limit_usd=limit,
                model_key=attempts[usable[0]].model_key,
                scopes=caller.scopes,
                provider=attempts[usable[0]].provider_name,
                now=now,
            )
        except BudgetExceeded as exc:
            if kept is not None and _fits_smaller(ask, body, exc.state):
                # Admitted from a fresh load, which fits the request to what is left.
                raise holds.CallerUnverified from None
            raise budget.explain(exc, ask) from None
        held = True
    for index in range(usable[0]):
        attempts[index].failure = attempts[index].refusal
    return Exchange(
        request_id=request_id,
        fmt=fmt,
        caller=caller,
        attempts=attempts,
        current=usable[0],
        prompt_chars=prompt_chars,
        prompt_texts=texts,
        started=started,
        estimate_usd=estimate,
        held=held,
        budget_state=state,
        body=body,
        platform_request_id=platform_request_id,
        rate=rate,
        fitted_max_tokens=fitted,
        hold_usd=estimate if held else Decimal(0),
    )


def _fits_smaller(ask: budget.Ask, body: dict[str, Any], state: BudgetState | None) -> bool:
    """Whether a smaller output maximum than the request's default fits `state`. When
    not even the floor fits, the refusal is the one the hold's own explains."""
    try:
        return budget.fit_max_output(ask, body, state) is not None
    except BudgetExceeded:
        return False


async def _hold_open(
    rate: RateAdmission | None, kept: tuple[Caller, str] | None, **hold: Any
) -> BudgetState:
    """`hold_open_async` (`hold_open_checked` for a kept caller and its key's hash); a
    refusal gives the rate limiter back the request's tokens (it used none) and still
    shows the caller its rate limits."""
    if kept is not None:
        caller, key_hash = kept
        if caller.fingerprint is None:
            raise holds.CallerUnverified
        return await holds.hold_open_checked(
            fingerprint=caller.fingerprint, key_hash=key_hash, **hold
        )
    try:
        return await holds.hold_open_async(**hold)
    except GatewayError as exc:
        await ratelimit.rate_settle(rate, tokens=0)
        if rate is not None:
            exc.headers.update(ratelimit.rate_headers(rate.windows))
        raise
