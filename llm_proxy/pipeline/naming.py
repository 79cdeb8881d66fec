"""The model name a routed request's caller sees: the policy (or alias) it named, in the
answer and in every stream event, whichever target served it (docs/ROUTING.md). The
usage row keeps the model that served.

Renamed at the byte level, without parsing: every `"model": "..."` member of the JSON the
client is sent. A `"model"` inside a string value is escaped (`\\"model\\"`) and so never
matches.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm_proxy.pipeline.sse import StreamCodec

_MODEL_MEMBER = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')


def renamed(content: bytes, name: str) -> bytes:
    """`content` with every `model` member naming `name`."""
    member = b'"model":' + json.dumps(name).encode()
    return _MODEL_MEMBER.sub(lambda _: member, content)


class RenamingCodec:
    """A stream codec whose output names `name` as the model; everything else is the
    wrapped codec's."""

    def __init__(self, codec: StreamCodec, name: str) -> None:
        self._codec = codec
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._codec, attribute)

    def feed(self, chunk: bytes) -> bytes:
        return renamed(self._codec.feed(chunk), self._name)

    def closing(self) -> bytes:
        return renamed(self._codec.closing(), self._name)
