"""CPU per request of each provider kind's request building, signing included, in one run.

    .venv/bin/python scripts/bench_kinds.py [--requests 20000] [--rounds 5]

What the gateway does on the event loop between admission and sending, for a one-line
chat request: the upstream body (native for openai, translated for the others), then
the provider's HTTP request (URL, JSON, auth: a bearer header, an API key, a SigV4
signature). Credentials are already loaded, as they are on every request but the
first (their refresh runs in a worker thread, off this path). Also the cost of Bedrock's
stream framing per event (botocore's event-stream parser and the re-framing as SSE),
against the SSE splitter every other kind's stream goes through. Kinds alternate within
each round; the figures are medians over the rounds (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "otari.settings")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "AKIDFAKETESTKEY00001")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "fake-test-secret-key-for-sigv4-verification")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

import django

django.setup()

import httpx  # noqa: E402

from common.config import ProviderConfig  # noqa: E402
from llm_proxy.formats import CHAT  # noqa: E402
from llm_proxy.pipeline.sse import EventSplitter  # noqa: E402
from llm_proxy.providers import PROVIDER_CLASSES  # noqa: E402
from llm_proxy.providers.bedrock import _events_as_sse  # noqa: E402
from llm_proxy.translate import route_for  # noqa: E402
from tests.fake_cloud import bedrock_event  # noqa: E402

BODY = {
    "model": "x",
    "messages": [{"role": "user", "content": "Say hello to the benchmark, briefly."}],
    "max_tokens": 64,
}
CONFIGS = {
    "openai": ProviderConfig(name="openai", kind="openai", api_key="sk-bench"),
    "bedrock": ProviderConfig(name="bedrock", kind="bedrock", options={"region": "us-east-1"}),
    "gemini": ProviderConfig(name="gemini", kind="gemini", api_key="bench-key"),
    "vertex": ProviderConfig(
        name="vertex", kind="vertex", options={"project": "p", "location": "us-central1"}
    ),
}
MODELS = {
    "openai": "gpt-4o-mini",
    "bedrock": "anthropic.claude-3-5-haiku-20241022-v1:0",
    "gemini": "gemini-2.5-flash",
    "vertex": "gemini-2.5-flash",
}


async def _prepare(kind: str, client: httpx.AsyncClient):
    provider = PROVIDER_CLASSES[kind](CONFIGS[kind])
    if kind == "vertex":
        # A token as the refresher keeps it: fetched once, valid for the hour.
        provider._token._value = "ya29.bench-token"
        provider._token._expires_at = datetime.now(UTC) + timedelta(hours=1)
    route = route_for(CHAT, provider)
    # The first request loads the credentials (in a worker thread); not measured.
    await provider.upstream_request(
        client,
        route.upstream.name,
        route.upstream_body(BODY, MODELS[kind], stream=False),
        None,
        model=MODELS[kind],
        stream=False,
    )
    return provider, route


async def _per_request_us(kind: str, provider, route, client, n: int) -> float:
    model = MODELS[kind]
    started = time.process_time_ns()
    for _ in range(n):
        body = route.upstream_body(BODY, model, stream=False)
        await provider.upstream_request(
            client, route.upstream.name, body, None, model=model, stream=False
        )
    return (time.process_time_ns() - started) / n / 1000


def _frames(events: int) -> tuple[bytes, bytes]:
    """The same stream of `events` text deltas, as Bedrock frames and as SSE."""
    frames = b"".join(
        bedrock_event("contentBlockDelta", {"delta": {"text": " word"}, "contentBlockIndex": 0})
        for _ in range(events)
    )
    sse = b"".join(
        b'event: contentBlockDelta\ndata: {"delta":{"text":" word"},"contentBlockIndex":0}\n\n'
        for _ in range(events)
    )
    return frames, sse


async def _framing_us(events: int, repeats: int) -> tuple[float, float]:
    frames, sse = _frames(events)

    async def chunks(data: bytes):
        for start in range(0, len(data), 4096):
            yield data[start : start + 4096]

    started = time.process_time_ns()
    for _ in range(repeats):
        async for chunk in _events_as_sse(chunks(frames)):
            EventSplitter().feed(chunk)
    bedrock = (time.process_time_ns() - started) / repeats / events / 1000
    started = time.process_time_ns()
    for _ in range(repeats):
        splitter = EventSplitter()
        async for chunk in chunks(sse):
            splitter.feed(chunk)
    plain = (time.process_time_ns() - started) / repeats / events / 1000
    return bedrock, plain


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    async with httpx.AsyncClient() as client:
        prepared = {kind: await _prepare(kind, client) for kind in CONFIGS}
        runs: dict[str, list[float]] = {kind: [] for kind in CONFIGS}
        for round_ in range(args.rounds):
            kinds = list(CONFIGS)
            kinds = kinds[round_ % len(kinds) :] + kinds[: round_ % len(kinds)]
            for kind in kinds:
                provider, route = prepared[kind]
                runs[kind].append(
                    await _per_request_us(kind, provider, route, client, args.requests)
                )
    base = statistics.median(runs["openai"])
    print("| kind | request building, CPU per request | vs openai |")
    print("|---|---|---|")
    for kind, values in runs.items():
        median = statistics.median(values)
        print(f"| {kind} | {median:.1f} µs | {median / base:.2f}x |")
    bedrock, plain = await _framing_us(200, 200)
    print(f"\nstream framing per event: bedrock event-stream {bedrock:.2f} µs, SSE {plain:.2f} µs")


if __name__ == "__main__":
    asyncio.run(main())
