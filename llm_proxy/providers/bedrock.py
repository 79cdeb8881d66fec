"""The `bedrock` kind: AWS Bedrock's Converse and ConverseStream APIs.

```yaml
providers:
  bedrock: {kind: bedrock, region: us-east-1}                # the default credential chain
  bedrock-eu: {kind: bedrock, region: eu-west-1, profile: prod}
```

- Credentials come from the standard AWS chain, resolved by botocore: the environment
  (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), the shared files (the
  `profile` option, else AWS_PROFILE), web identity, container and instance roles.
  Temporary credentials are refreshed in a worker thread before they expire
  (providers.credentials), never on the event loop.
- Every request is signed with SigV4 by botocore's signer (service `bedrock`).
- The region is the `region` option, else AWS_REGION / AWS_DEFAULT_REGION, else the
  profile's. `api_base` replaces `https://bedrock-runtime.<region>.amazonaws.com`
  (a VPC endpoint, or a test server).
- Models are Bedrock model ids or inference profiles, e.g.
  `bedrock:anthropic.claude-3-5-haiku-20241022-v1:0`, `bedrock:us.amazon.nova-lite-v1:0`.
- ConverseStream answers in AWS's binary event-stream framing; `stream_chunks` parses it
  with botocore's parser and hands the gateway server-sent events (translate.converse).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import botocore.session
import httpx
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import RefreshableCredentials
from botocore.eventstream import EventStreamBuffer, ParserError
from botocore.exceptions import BotoCoreError
from django.core.exceptions import ImproperlyConfigured

from llm_proxy.providers.base import Provider
from llm_proxy.providers.credentials import CredentialsMissing, Refresher
from llm_proxy.translate.converse import API

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from datetime import datetime

    from botocore.credentials import ReadOnlyCredentials

    from common.config import ProviderConfig

# Temporary credentials are replaced this long before they expire (botocore's own
# advisory refresh starts 15 minutes ahead; its mandatory one 10 minutes ahead).
_REFRESH_AHEAD_S = 15 * 60
_SERVICE = "bedrock"


class NoCredentials(CredentialsMissing):
    message = "The gateway has no AWS credentials for this provider"


class BedrockProvider(Provider):
    kind = "bedrock"
    default_api_base = ""  # per region, see __init__
    native_apis = frozenset({API})
    options = frozenset({"region", "profile"})
    model_in_url = True

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        profile = config.options.get("profile") or None
        self._session = botocore.session.Session(profile=profile)
        self.region = (
            config.options.get("region")
            or os.environ.get("AWS_REGION")
            or self._session.get_config_variable("region")
        )
        if not self.region:
            raise ImproperlyConfigured(
                f"providers.{config.name}: the bedrock kind needs a region "
                "(the region option, AWS_REGION, or the profile's region)"
            )
        if not config.api_base:
            self.api_base = f"https://bedrock-runtime.{self.region}.amazonaws.com"
        self._credentials = Refresher(
            self._load_credentials, ahead_s=_REFRESH_AHEAD_S, failure=NoCredentials
        )

    def _load_credentials(self) -> tuple[ReadOnlyCredentials, datetime | None]:
        """The chain's current credentials (blocking: files, STS, instance metadata)."""
        try:
            credentials = self._session.get_credentials()
            frozen = credentials.get_frozen_credentials() if credentials else None
        except BotoCoreError as exc:
            raise NoCredentials(f"{NoCredentials.message}: {type(exc).__name__}") from exc
        if frozen is None or not frozen.access_key:
            raise NoCredentials
        expires_at = None
        if isinstance(credentials, RefreshableCredentials):
            # botocore's own record of the expiry (it has no public accessor).
            expires_at = credentials._expiry_time
        return frozen, expires_at

    async def credentials(self) -> ReadOnlyCredentials:
        return await self._credentials.get()

    def model_url(self, model: str, *, stream: bool) -> str:
        # Model ids contain ':' and ARNs '/': one path segment, percent-encoded.
        action = "converse-stream" if stream else "converse"
        return f"{self.api_base}/model/{quote(model, safe='')}/{action}"

    def signed_headers(
        self, credentials: ReadOnlyCredentials, url: str, content: bytes
    ) -> dict[str, str]:
        """The Converse (or ConverseStream) request's headers, signed with SigV4."""
        signed = AWSRequest(
            method="POST",
            url=url,
            data=content,
            headers={"Content-Type": "application/json"},
        )
        SigV4Auth(credentials, _SERVICE, self.region).add_auth(signed)
        return dict(signed.headers)

    def stream_chunks(self, response: httpx.Response) -> AsyncIterator[bytes]:
        return _events_as_sse(response.aiter_bytes())

    def secrets(self) -> list[str]:
        frozen = self._credentials.current
        return [frozen.secret_key, frozen.token or ""] if frozen is not None else []


async def _events_as_sse(raw: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """ConverseStream's event-stream frames as server-sent events: `event:` the frame's
    event (or exception) type, `data:` its JSON payload. Only whole frames are passed
    on; a frame that fails its checksum ends the stream as a broken one."""
    frames = EventStreamBuffer()
    async for chunk in raw:
        frames.add_data(chunk)
        out = []
        try:
            for message in frames:
                out.append(_sse(message.headers, message.payload))
        except ParserError as exc:
            raise httpx.DecodingError(f"malformed event-stream frame: {exc}") from exc
        if out:
            yield b"".join(out)


def _sse(headers: dict[str, Any], payload: bytes) -> bytes:
    kind = headers.get(":message-type")
    if kind == "event":
        name = headers.get(":event-type", "")
    elif kind == "exception":
        name = headers.get(":exception-type", "")
    else:  # "error": the service's own failure, described in headers only
        name = "internalServerException"
        payload = json.dumps({"message": headers.get(":error-message", "")}).encode()
    if b"\n" in payload:  # one data line per event (JSON needs no raw newlines)
        payload = json.dumps(json.loads(payload), separators=(",", ":")).encode()
    return b"event: " + str(name).encode() + b"\ndata: " + payload + b"\n\n"
