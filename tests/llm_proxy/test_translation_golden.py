"""Translation golden tests: fixed requests, answers and streams in each API
(tests/fixtures/translation/) and the exact translated output.

Set OTARI_REGENERATE_GOLDENS=1 to rewrite the expected files after a deliberate change,
then review the diff: the files are the specification of the translation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llm_proxy.formats import FORMATS
from llm_proxy.pipeline.sse import EventSplitter
from llm_proxy.translate import Route
from usage.pricing import TokenUsage

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "translation"
REGENERATE = os.environ.get("OTARI_REGENERATE_GOLDENS") == "1"
CREATED = 1750000000


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("llm_proxy.translate._now", lambda: CREATED)


def _golden_json(path: Path, value: object) -> None:
    if REGENERATE:
        path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    assert json.loads(path.read_text()) == value


def _cases(folder: str) -> list[str]:
    return sorted(p.stem for p in (FIXTURES / folder).glob("*.json") if "." not in p.stem)


@pytest.mark.parametrize("name", _cases("requests"))
def test_request_translation(name: str) -> None:
    case = json.loads((FIXTURES / "requests" / f"{name}.json").read_text())
    client, upstream = FORMATS[case["client"]], FORMATS[case["upstream"]]
    request = case["request"]
    client.validate(request)
    translated = Route(client, upstream).upstream_body(
        request, case["model"], stream=request.get("stream") is True
    )
    _golden_json(FIXTURES / "requests" / f"{name}.expected.json", translated)


@pytest.mark.parametrize("name", _cases("responses"))
def test_answer_translation(name: str) -> None:
    case = json.loads((FIXTURES / "responses" / f"{name}.json").read_text())
    route = Route(FORMATS[case["client"]], FORMATS[case["upstream"]])
    translated = route.response_body(case["request"], case["answer"])
    _golden_json(FIXTURES / "responses" / f"{name}.expected.json", translated)
    # The client is told the usage it is charged for (the upstream's). Chat and Responses
    # have no cache-write count: those tokens show as ordinary prompt tokens.
    charged = FORMATS[case["upstream"]].usage_from_body(case["answer"])
    shown = FORMATS[case["client"]].usage_from_body(translated)
    assert (shown.prompt_tokens, shown.output_tokens, shown.cache_read_tokens) == (
        charged.prompt_tokens,
        charged.output_tokens,
        charged.cache_read_tokens,
    )


STREAM_CASES = json.loads((FIXTURES / "streams" / "cases.json").read_text())


@pytest.mark.parametrize("case", STREAM_CASES, ids=[case["name"] for case in STREAM_CASES])
def test_stream_translation(case: dict) -> None:
    route = Route(FORMATS[case["client"]], FORMATS[case["upstream"]])
    codec = route.stream_codec(case["request"])
    upstream = (FIXTURES / "streams" / case["input"]).read_bytes()
    splitter = EventSplitter()
    out = b""
    # Fed in uneven pieces, as the network delivers them.
    for start in range(0, len(upstream), 97):
        for event in splitter.feed(upstream[start : start + 97]):
            out += codec.transform(event)
    assert codec.finished
    assert codec.complete is case["complete"]
    out += codec.closing() if codec.complete else codec.error_event()
    path = FIXTURES / "streams" / f"{case['name']}.expected.sse"
    if REGENERATE:
        path.write_bytes(out)
    assert out.decode() == path.read_text()
    expected_usage = case["usage"]
    assert codec.usage == (TokenUsage(**expected_usage) if expected_usage else None)
