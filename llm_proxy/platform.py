"""Platform mode (docs/SPEC.md §7, docs/PLATFORM.md): provider credentials resolved per request.

With OTARI_PLATFORM_URL and OTARI_PLATFORM_TOKEN set, a caller may present a platform user
token instead of a `gw-` key. The gateway forwards it to the platform's resolve endpoint,
which answers with the user to bill and an ordered list of attempts (provider, model and
credentials); llm_proxy.pipeline walks them in order. This module speaks the resolve
protocol and turns an attempt into a Provider; it knows nothing of money.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
from django.conf import settings

from common.config import ProviderConfig
from common.exceptions import GatewayError
from llm_proxy import upstream
from llm_proxy.errors import provider_error_message
from llm_proxy.providers.anthropic import AnthropicProvider
from llm_proxy.providers.base import Provider
from llm_proxy.providers.openai import OpenAIProvider

logger = logging.getLogger(__name__)

# Resolve refusals that reach the caller with the platform's message (anything else the
# platform answers is the gateway's 502). The codes are what the OpenAI-style error
# body carries; the error type follows from the status (llm_proxy.errors).
FORWARDED_RESOLVE_STATUSES = {
    400: "invalid_request",
    401: "invalid_user_token",
    402: "payment_required",
    403: "permission_denied",
    404: "model_not_found",
    429: "rate_limited",
}
_DEFAULT_MESSAGES = {
    400: "The platform rejected the request",
    401: "Invalid user token",
    402: "Payment required: the platform account cannot pay for this request",
    403: "The platform does not allow this request",
    404: "The platform does not know this model",
    429: "The platform is rate limiting requests; retry later",
}
_MAX_MESSAGE_CHARS = 400

# Where an attempt goes when the platform names no api_base. "anthropic" is the one
# provider of the anthropic kind; every other name is an OpenAI-compatible server. A
# provider not listed here must come with an api_base: sending its key to some default
# server (OpenAI's) would hand one vendor's credential to another.
KNOWN_API_BASES = {
    "anthropic": "https://api.anthropic.com",
    "openai": "https://api.openai.com/v1",
    "deepseek": "https://api.deepseek.com/v1",
    "gemini": "https://generativelanguage.googleapis.com/v1beta/openai",
    "groq": "https://api.groq.com/openai/v1",
    "mistral": "https://api.mistral.ai/v1",
    "openrouter": "https://openrouter.ai/api/v1",
    "together": "https://api.together.xyz/v1",
    "xai": "https://api.x.ai/v1",
}
ANTHROPIC_PROVIDER_NAMES = frozenset({"anthropic"})


def enabled() -> bool:
    return bool(settings.OTARI_PLATFORM_URL and settings.OTARI_PLATFORM_TOKEN)


class PlatformUnavailable(GatewayError):
    """Resolve failed for a reason that is not the caller's (timeout, 5xx, 422, nonsense)."""

    status = 502
    code = "platform_unavailable"
    message = "The platform could not resolve a provider for this request"


class AttemptUnusable(GatewayError):
    """An attempt the gateway cannot send anywhere (it is skipped, and reported)."""

    status = 502
    code = "attempt_unusable"
    message = "The platform resolved a provider the gateway cannot reach"


@dataclass(frozen=True, slots=True)
class ResolvedAttempt:
    attempt_id: str
    position: int
    provider: str
    model: str
    api_key: str
    api_base: str
    managed: bool

    @property
    def model_key(self) -> str:
        return f"{self.provider}:{self.model}"


@dataclass(frozen=True, slots=True)
class Resolution:
    request_id: str
    user_id: str
    attempts: tuple[ResolvedAttempt, ...]


def selector_split(selector: str) -> tuple[str | None, str]:
    """`provider:model` or `provider/model` -> (provider, model), as locally (the first
    separator is the provider's); a bare model name -> (None, model)."""
    cut = min((i for i in (selector.find(":"), selector.find("/")) if i > 0), default=-1)
    if cut <= 0 or cut == len(selector) - 1:
        return None, selector
    return selector[:cut], selector[cut + 1 :]


def _refusal(status: int, response: httpx.Response, user_token: str) -> GatewayError:
    message = provider_error_message(response.content)
    if not message:
        try:
            detail = response.json().get("detail")
        except (ValueError, AttributeError):
            detail = None
        message = detail if isinstance(detail, str) else ""
    # The platform is trusted with the message, not with echoing secrets back.
    for secret in (user_token, settings.OTARI_PLATFORM_TOKEN):
        if secret:
            message = message.replace(secret, "[redacted]")
    message = " ".join(message.split())[:_MAX_MESSAGE_CHARS] or _DEFAULT_MESSAGES[status]
    headers = {}
    if status == 429 and response.headers.get("retry-after"):
        headers["Retry-After"] = response.headers["retry-after"]
    return GatewayError(
        message, status=status, code=FORWARDED_RESOLVE_STATUSES[status], headers=headers
    )


def _text(value: Any, field: str, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value) or len(value) > 4096:
        raise ValueError(field)
    return value


def _parse(answer: Any) -> Resolution:
    """The resolve answer, checked; ValueError names the first field that is wrong."""
    if not isinstance(answer, dict):
        raise ValueError("answer")
    raw_attempts = answer.get("attempts")
    if not isinstance(raw_attempts, list) or not raw_attempts:
        raise ValueError("attempts")
    attempts = []
    for raw in raw_attempts:
        if not isinstance(raw, dict):
            raise ValueError("attempts")
        position = raw.get("position", len(attempts))
        if not isinstance(position, int) or isinstance(position, bool):
            raise ValueError("position")
        attempts.append(
            ResolvedAttempt(
                attempt_id=_text(raw.get("attempt_id"), "attempt_id")[:255],
                position=position,
                provider=_text(raw.get("provider"), "provider")[:100],
                model=_text(raw.get("model"), "model")[:255],
                api_key=_text(raw.get("api_key"), "api_key", required=False),
                api_base=_text(raw.get("api_base"), "api_base", required=False),
                managed=raw.get("managed") is True,
            )
        )
    user_id = _text(answer.get("user_id"), "user_id")
    if len(user_id) > 255:
        raise ValueError("user_id")
    # Tried in the platform's order.
    attempts.sort(key=lambda a: a.position)
    request_id = answer.get("request_id")
    return Resolution(
        request_id=str(request_id)[:255] if request_id is not None else "",
        user_id=user_id,
        attempts=tuple(attempts),
    )


async def resolve(*, user_token: str, selector: str) -> Resolution:
    """Ask the platform who the caller is and where the request may go.

    Refusals the caller can act on (400/401/402/403/404/429) are raised with the
    platform's message; everything else (timeouts, connection errors, 422, 5xx, an answer
    that is not the protocol's) is a 502.
    """
    provider, model = selector_split(selector)
    body: dict[str, str] = {"model": model}
    if provider:
        body["provider"] = provider
    timeout_s = settings.OTARI_PLATFORM_RESOLVE_TIMEOUT_SECONDS
    try:
        response = await upstream.client().post(
            f"{settings.OTARI_PLATFORM_URL}/gateway/provider-keys/resolve",
            json=body,
            headers={
                "X-Gateway-Token": settings.OTARI_PLATFORM_TOKEN,
                "X-User-Token": user_token,
                "User-Agent": "otari-gateway",
            },
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
        )
    except httpx.HTTPError as exc:
        logger.warning("platform resolve failed: %s", type(exc).__name__)
        raise PlatformUnavailable from None
    status = response.status_code
    if status in FORWARDED_RESOLVE_STATUSES:
        raise _refusal(status, response, user_token)
    if status != 200:
        logger.warning("platform resolve answered HTTP %s", status)
        raise PlatformUnavailable
    try:
        return _parse(response.json())
    except ValueError as exc:
        logger.warning("platform resolve answer not understood (field %s)", exc)
        raise PlatformUnavailable from None


def provider_for(attempt: ResolvedAttempt) -> Provider:
    """A Provider for one attempt, built on the fly with its credentials.

    `anthropic` -> the anthropic kind; any other provider name -> the openai kind (an
    OpenAI-compatible server) at the attempt's api_base, or the provider's well-known one.
    """
    api_base = attempt.api_base or KNOWN_API_BASES.get(attempt.provider.lower(), "")
    if not api_base:
        raise AttemptUnusable(
            f"The platform named provider '{attempt.provider}' without an api_base"
        )
    if not api_base.startswith(("http://", "https://")):
        raise AttemptUnusable(
            f"The platform gave provider '{attempt.provider}' an invalid api_base"
        )
    anthropic = attempt.provider.lower() in ANTHROPIC_PROVIDER_NAMES
    config = ProviderConfig(
        name=attempt.provider,
        kind=AnthropicProvider.kind if anthropic else OpenAIProvider.kind,
        api_key=attempt.api_key,
        api_base=api_base,
        timeout_s=settings.OTARI_PROVIDER_TIMEOUT_SECONDS,
    )
    return AnthropicProvider(config) if anthropic else OpenAIProvider(config)


# --- /health -----------------------------------------------------------------------------

_HEALTH_CACHE_S = 5.0
_health: tuple[float, bool] | None = None


def reachable() -> bool:
    """Whether the platform answers at all (any HTTP status below 500 within a short
    timeout). Remembered for a few seconds, so that frequent health probes do not turn
    into a stream of requests to the platform."""
    global _health
    now = time.monotonic()
    if _health is not None and now - _health[0] < _HEALTH_CACHE_S:
        return _health[1]
    try:
        response = httpx.get(
            f"{settings.OTARI_PLATFORM_URL}/",
            timeout=min(settings.OTARI_PLATFORM_RESOLVE_TIMEOUT_SECONDS, 3.0),
            follow_redirects=False,
        )
        ok = response.status_code < 500
    except httpx.HTTPError:
        ok = False
    _health = (now, ok)
    return ok


def health_details() -> dict[str, str]:
    """What `/health` adds in platform mode (common/health.py): whether the platform
    answers. Nothing otherwise."""
    if not enabled():
        return {}
    return {"platform": "reachable" if reachable() else "unreachable"}


def reachable_forget() -> None:
    """Forget the last health answer (tests)."""
    global _health
    _health = None
