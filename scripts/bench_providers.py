"""CPU of building one upstream request per provider kind, and of a catalog price lookup,
in one process (docs/PERFORMANCE.md, "Provider kinds and the price catalog").

    .venv/bin/python scripts/bench_providers.py [--rounds 7] [--number 20000]

Each figure is the median over rounds of the mean time per call; kinds are timed in turn
within every round, so drift on a shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "otari.settings")

import django

django.setup()

import httpx  # noqa: E402

from common.config import ProviderConfig  # noqa: E402
from llm_proxy.providers.azure import AzureProvider  # noqa: E402
from llm_proxy.providers.openai import OpenAIProvider  # noqa: E402
from usage import catalog  # noqa: E402

# What the benchmark's load generator sends, as the chat format hands it to the provider.
BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello to the benchmark in one short line."}],
    "max_tokens": 64,
    "stream": True,
    "stream_options": {"include_usage": True},
}
ENDPOINT = "https://my-resource.openai.azure.com"
KEY = "k" * 32

COLD_LOOKUP = """
import time
t = time.perf_counter()
from usage import catalog
catalog.catalog_price("openai", "gpt-4o-mini-2024-07-18")
print(time.perf_counter() - t)
"""


def _providers() -> dict[str, object]:
    return {
        "openai": OpenAIProvider(
            ProviderConfig(name="openai", kind="openai", api_key=KEY, api_base=ENDPOINT + "/v1")
        ),
        "azure (v1)": AzureProvider(
            ProviderConfig(
                name="azure",
                kind="azure",
                api_key=KEY,
                api_base=ENDPOINT,
                options={"deployments": {"gpt-4o-mini": "mini"}},
            )
        ),
        "azure (deployment URL)": AzureProvider(
            ProviderConfig(
                name="azure",
                kind="azure",
                api_base=ENDPOINT,
                options={
                    "azure_ad_token": KEY,
                    "api_version": "2024-10-21",
                    "deployments": {"gpt-4o-mini": "mini"},
                },
            )
        ),
    }


def _cold_lookup_s() -> float:
    # A fresh interpreter: the first lookup of a process imports and loads the catalog.
    out = subprocess.run(
        [sys.executable, "-c", COLD_LOOKUP],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    return float(out.stdout.strip().splitlines()[-1])


async def main(rounds: int, number: int) -> None:
    client = httpx.AsyncClient()
    providers = _providers()
    catalog.catalog_price("openai", "gpt-4o-mini")  # warm: the per-process cache
    cases = {
        name: (lambda p=provider: p.build_request(client, "chat", BODY))
        for name, provider in providers.items()
    }
    cases["catalog lookup (cached)"] = lambda: catalog.catalog_price("openai", "gpt-4o-mini")
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, case in cases.items():
            times[name].append(timeit.timeit(case, number=number) / number)
    await client.aclose()
    base = statistics.median(times["openai"])
    print(f"{'case':<28} {'us/call':>9} {'x openai':>9}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<28} {median * 1e6:9.2f} {median / base:9.2f}")
    colds = [_cold_lookup_s() for _ in range(3)]
    print(f"catalog first lookup in a fresh process: {statistics.median(colds) * 1000:.0f} ms")
    started = time.perf_counter()
    catalog.catalog_price.cache_clear()
    catalog.catalog_price("anthropic", "claude-3-5-sonnet-latest")
    print(f"catalog lookup, loaded but not cached: {(time.perf_counter() - started) * 1e6:.0f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=20000)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.number))
