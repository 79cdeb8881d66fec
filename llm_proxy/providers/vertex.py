"""The `vertex` kind: Gemini on Google Cloud's Vertex AI (generateContent), with OAuth.

```yaml
providers:
  vertex: {kind: vertex, project: my-project, location: us-central1}   # ADC
  vertex-sa: {kind: vertex, location: europe-west4,
              credentials_file: /run/secrets/vertex-sa.json}           # a service account
```

- Credentials come from google-auth: a service-account (or other credentials) JSON file
  named by `credentials_file`, else Application Default Credentials
  (GOOGLE_APPLICATION_CREDENTIALS, gcloud's user credentials, the metadata server of
  GCE, GKE and Cloud Run). The access token is fetched in a worker thread on first use
  and refreshed in the background five minutes before it expires, never per request
  and never on the event loop (providers.credentials).
- `project` defaults to the credentials' project; `location` to `us-central1`
  (`global` is served by `https://aiplatform.googleapis.com`). `api_base` replaces
  `https://{location}-aiplatform.googleapis.com/v1`.
- Requests go to `{api_base}/projects/{project}/locations/{location}/publishers/google/
  models/{model}:generateContent` (or `:streamGenerateContent?alt=sse`), the same wire
  format as the gemini kind (translate.gemini).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import google.auth
import google.auth.exceptions
import google.oauth2.credentials
import urllib3
from google.auth.transport.urllib3 import Request as GoogleAuthRequest
from google.oauth2 import service_account

from llm_proxy.providers.credentials import CredentialsMissing, Refresher
from llm_proxy.providers.gemini import GoogleProvider

if TYPE_CHECKING:
    from google.auth.credentials import Credentials

    from common.config import ProviderConfig

_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
# Access tokens live an hour; a new one is fetched this long before the old one expires
# (google-auth itself treats a token as expired 3 min 45 s early).
_REFRESH_AHEAD_S = 5 * 60


class NoCredentials(CredentialsMissing):
    message = "The gateway could not obtain Google Cloud credentials for this provider"


def _from_file(path: str) -> tuple[Credentials, str | None]:
    """A service account's key file, or a user's (`gcloud auth application-default
    login`); loaded by type, as google-auth advises, so no other kind of credential
    configuration is ever followed from a file."""
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise NoCredentials(f"{NoCredentials.message}: cannot read {path}") from exc
    kind = info.get("type") if isinstance(info, dict) else None
    if kind == "service_account":
        credentials = service_account.Credentials.from_service_account_info(info, scopes=_SCOPES)
        return credentials, info.get("project_id")
    if kind == "authorized_user":
        user = google.oauth2.credentials.Credentials.from_authorized_user_info(info, scopes=_SCOPES)
        return user, info.get("quota_project_id")
    raise NoCredentials(
        f"{NoCredentials.message}: {path} is not a service-account or user credentials file"
    )


class VertexProvider(GoogleProvider):
    kind = "vertex"
    default_api_base = ""  # per location, see __init__
    options = frozenset({"project", "location", "credentials_file"})

    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config)
        self.project: str | None = config.options.get("project") or None
        self.location: str = config.options.get("location") or "us-central1"
        self.credentials_file: str | None = config.options.get("credentials_file") or None
        if not config.api_base:
            host = (
                "aiplatform.googleapis.com"
                if self.location == "global"
                else f"{self.location}-aiplatform.googleapis.com"
            )
            self.api_base = f"https://{host}/v1"
        self._google: Credentials | None = None
        self._http = GoogleAuthRequest(urllib3.PoolManager())
        self._token = Refresher(self._fetch_token, ahead_s=_REFRESH_AHEAD_S, failure=NoCredentials)

    def _fetch_token(self) -> tuple[str, datetime | None]:
        """A fresh access token (blocking: reads the credentials, calls the token
        endpoint or the metadata server)."""
        try:
            if self._google is None:
                if self.credentials_file:
                    credentials, project = _from_file(self.credentials_file)
                else:
                    credentials, project = google.auth.default(scopes=_SCOPES)
                self.project = self.project or project
                self._google = credentials
            self._google.refresh(self._http)
        except google.auth.exceptions.GoogleAuthError as exc:
            raise NoCredentials(f"{NoCredentials.message}: {type(exc).__name__}") from exc
        token = self._google.token
        if not token:
            raise NoCredentials
        expiry = self._google.expiry  # naive UTC, as google-auth keeps it
        return token, expiry.replace(tzinfo=UTC) if expiry is not None else None

    def model_url(self, model: str, *, stream: bool) -> str:
        prefix = (
            f"{self.api_base}/projects/{self.project}/locations/{self.location}/publishers/google"
        )
        return self.method_url(prefix, model, stream=stream)

    async def credentials(self) -> dict[str, str]:
        token = await self._token.get()
        if not self.project:
            raise NoCredentials(
                "No Google Cloud project for this provider: set its `project` option"
            )
        return {"Authorization": f"Bearer {token}"}

    def secrets(self) -> list[str]:
        token = self._token.current
        return [token] if token else []
