"""Settings: this module only parses configuration (environment, `.env`, defaults).

Every variable is documented in README.md and `.env.example`. The defaults make a fresh
checkout run with nothing installed: SQLite in `var/`, tasks in-process, a secret key
generated once into `var/`. PostgreSQL and Redis are the real deployment.
"""

from __future__ import annotations

import secrets
import warnings
from decimal import Decimal
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
if (BASE_DIR / ".env").is_file():
    environ.Env.read_env(BASE_DIR / ".env")

# Where the embedded defaults keep their files (SQLite database, generated secret key).
VAR_DIR = Path(env.str("OTARI_VAR_DIR", default=str(BASE_DIR / "var")))


def _secret_key() -> str:
    """DJANGO_SECRET_KEY, or one generated on first start and kept in var/secret_key.

    It signs admin sessions and CSRF tokens only; API keys are hashed, not signed.
    """
    configured = env.str("DJANGO_SECRET_KEY", default="")
    if configured:
        return configured
    path = VAR_DIR / "secret_key"
    if not path.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env.bool("DJANGO_DEBUG", default=False)
# The host names the gateway answers to. common/hosts.py applies them to every request,
# before Django, with JSON errors; health probes answer any Host, and the APIs do too with
# OTARI_API_ANY_HOST. Django's own check is therefore off: it ran only where something
# called get_host() (never on generation routes) and answered with an HTML 400 and a
# logged traceback.
OTARI_ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
OTARI_API_ANY_HOST = env.bool("OTARI_API_ANY_HOST", default=False)
ALLOWED_HOSTS = ["*"]
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    # Daphne first: it makes `manage.py runserver` serve ASGI (development only; production
    # runs uvicorn, chosen by measurement, see docs/PERFORMANCE.md).
    "daphne",
    # The admin with Otari's site: the spend dashboard as its index (budgets/admin_site.py).
    "otari.apps.OtariAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    # Swagger UI's files, bundled: /docs works with no network access.
    "drf_spectacular_sidecar",
    "channels",
    # Versions of every money setting (common/history.py).
    "simple_history",
    "budgets",
    "usage",
    "llm_proxy",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's CSS/JS (Django's and the dashboard's) from the app itself, so the
    # console works offline with no web server or CDN in front. Generation routes bypass
    # this stack entirely (otari/asgi.py).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    # Who changed a money setting, and through what (common/history.py).
    "common.audit.AuditContextMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "otari.urls"
ASGI_APPLICATION = "otari.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'otari.sqlite3'}"),
}
_db = DATABASES["default"]
if _db["ENGINE"] == "django.db.backends.postgresql":
    # Under ASGI every request would otherwise open a new PostgreSQL connection (+30 ms);
    # psycopg's pool keeps them. CONN_MAX_AGE must be 0 with a pool.
    _db["CONN_MAX_AGE"] = 0
    _db.setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": env.int("OTARI_DB_POOL_SIZE", default=10),
        # Under ASGI every concurrent request may hold one of these (a thread each), so a
        # burst waits for them; an outage is detected by the hot path's pool instead
        # (common/pgpool.py, OTARI_DB_TIMEOUT_SECONDS; docs/RELIABILITY.md).
        "timeout": 10,
    }
elif _db["ENGINE"] == "django.db.backends.sqlite3":
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    # BEGIN IMMEDIATE takes SQLite's write lock up front, so two writers queue on the
    # timeout instead of failing with "database is locked" halfway through a transaction.
    _db.setdefault("OPTIONS", {}).update({"transaction_mode": "IMMEDIATE", "timeout": 20})
# How PostgreSQL is reached: directly (or through a pooler in session mode), or through a
# pooler in transaction mode (PgBouncer's pool_mode = transaction), which hands each
# transaction, not each connection, a server connection of its own. Nothing of a session
# then carries from one transaction to the next (docs/OPERATIONS.md, "Several hosts").
OTARI_DB_POOLER = env.str("OTARI_DB_POOLER", default="none")
if OTARI_DB_POOLER not in ("none", "transaction"):
    raise ImproperlyConfigured("OTARI_DB_POOLER must be none or transaction")
if OTARI_DB_POOLER == "transaction" and _db["ENGINE"] == "django.db.backends.postgresql":
    # QuerySet.iterator() would DECLARE a cursor WITH HOLD in one transaction and FETCH
    # from it in the next, maybe on another server connection: Django then reads the
    # whole result at once instead.
    _db["DISABLE_SERVER_SIDE_CURSORS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
# ISO-style dates ("2026-01-31 14:05 UTC") in the admin (otari/formats/en/formats.py).
FORMAT_MODULE_PATH = ["otari.formats"]

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
# Serve straight from the apps' static/ folders: no `collectstatic` step is needed (the
# admin's files are few and are indexed once at start-up). `collectstatic` into
# STATIC_ROOT still works for a reverse proxy that serves them itself.
WHITENOISE_USE_FINDERS = True
# WhiteNoise warns when STATIC_ROOT does not exist, which is the normal case here.
warnings.filterwarnings("ignore", message="No directory at: ")

# Generation requests carry whole conversations (and base64 images): allow large bodies,
# but bounded (10 MiB by default; a deployment that sends many large images raises it).
# An oversized body is a 413 in the API's own error shape, before it is read.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("OTARI_MAX_REQUEST_BYTES", default=10 * 1024 * 1024)

# --- Money ----------------------------------------------------------------------------------
# One definition of a money column for the whole project. Twelve integer digits hold the
# contract's largest amount (999,999,999,999) and ten places hold per-million prices exactly.
MONEY_MAX_DIGITS = 22
MONEY_DECIMAL_PLACES = 10
MONEY_MAX_USD = Decimal("999999999999")

# --- Gateway behaviour (docs/SPEC.md §9) --------------------------------------------------------
OTARI_CONFIG = env.str("OTARI_CONFIG", default="")
OTARI_MASTER_KEY = env.str("OTARI_MASTER_KEY", default="")
OTARI_REQUIRE_PRICING = env.bool("OTARI_REQUIRE_PRICING", default=True)
# A model without an operator price is priced from the genai-prices catalog (usage.catalog);
# false: only operator prices count, and an unpriced model is refused (402).
OTARI_PRICE_CATALOG = env.bool("OTARI_PRICE_CATALOG", default=True)
# An API key whose request names another user (`user`, or `metadata.user_id` on
# /v1/messages) is refused (403, docs/SPEC.md §1); false ignores the name instead.
OTARI_REJECT_USER_MISMATCH = env.bool("OTARI_REJECT_USER_MISMATCH", default=True)
OTARI_DEFAULT_MAX_OUTPUT_TOKENS = env.int("OTARI_DEFAULT_MAX_OUTPUT_TOKENS", default=1024)
# A request that sets no maximum output and whose default does not fit the budget that is
# left is sent with the largest maximum that does (X-Otari-Max-Tokens), unless fewer than
# OTARI_FIT_MIN_OUTPUT_TOKENS fit; false refuses it instead (docs/ARCHITECTURE.md).
OTARI_FIT_MAX_TOKENS = env.bool("OTARI_FIT_MAX_TOKENS", default=True)
OTARI_FIT_MIN_OUTPUT_TOKENS = env.int("OTARI_FIT_MIN_OUTPUT_TOKENS", default=16)
# What a stream that never reported usage costs: its estimate, nothing, or an error row
# charged at the estimate (docs/SPEC.md §3.4).
OTARI_STREAM_MISSING_USAGE = env.str("OTARI_STREAM_MISSING_USAGE", default="estimate")
OTARI_PROVIDER_TIMEOUT_SECONDS = env.float("OTARI_PROVIDER_TIMEOUT_SECONDS", default=600.0)
# A hold must outlive the longest request it covers, or the sweeper would release money
# that a live stream is still spending: default = provider timeout + 5 minutes.
OTARI_HOLD_TTL_SECONDS = env.int(
    "OTARI_HOLD_TTL_SECONDS", default=int(OTARI_PROVIDER_TIMEOUT_SECONDS) + 300
)
OTARI_STREAM_KEEPALIVE_SECONDS = env.float("OTARI_STREAM_KEEPALIVE_SECONDS", default=15.0)
OTARI_HOTPATH_POOL_SIZE = env.int("OTARI_HOTPATH_POOL_SIZE", default=10)
OTARI_DB_TIMEOUT_SECONDS = env.float("OTARI_DB_TIMEOUT_SECONDS", default=0.5)
# On PostgreSQL each money step is first sent as one statement from the event loop (the
# fast path). Off: every step takes the general path (row locks, then the same statement
# in a transaction). For comparing the two and for diagnosis; both keep the books exact.
OTARI_MONEY_FAST_PATH = env.bool("OTARI_MONEY_FAST_PATH", default=True)
# A gateway process keeps each key's caller (configuration and price) and lets ADMIT verify
# it instead of loading it per request (docs/ARCHITECTURE.md); false loads it every time.
OTARI_CALLER_REUSE = env.bool("OTARI_CALLER_REUSE", default=True)

# --- Platform mode (docs/SPEC.md §7, docs/PLATFORM.md) -------------------------------------------
# Both set: platform user tokens are resolved per request and every attempt is reported.
OTARI_PLATFORM_URL = env.str("OTARI_PLATFORM_URL", default="").rstrip("/")
OTARI_PLATFORM_TOKEN = env.str("OTARI_PLATFORM_TOKEN", default="")
# The resolve call is on the request path: a platform that does not answer quickly is a 502.
OTARI_PLATFORM_RESOLVE_TIMEOUT_SECONDS = env.float(
    "OTARI_PLATFORM_RESOLVE_TIMEOUT_SECONDS", default=5.0
)
# One usage-report POST (off the request path, in a worker).
OTARI_PLATFORM_REPORT_TIMEOUT_SECONDS = env.float(
    "OTARI_PLATFORM_REPORT_TIMEOUT_SECONDS", default=10.0
)
# The first retry of a report waits about this long; each later one twice as long.
OTARI_PLATFORM_REPORT_BACKOFF_SECONDS = env.float(
    "OTARI_PLATFORM_REPORT_BACKOFF_SECONDS", default=1.0
)
# Tries of one report in all (the first and the retries), then it is dead-lettered.
OTARI_PLATFORM_REPORT_MAX_TRIES = env.int("OTARI_PLATFORM_REPORT_MAX_TRIES", default=8)
# A report still pending this long after it was due lost its task (broker outage, worker
# crash): the periodic re-drive enqueues it again.
OTARI_PLATFORM_REPORT_REDRIVE_AFTER_SECONDS = env.float(
    "OTARI_PLATFORM_REPORT_REDRIVE_AFTER_SECONDS", default=60.0
)

# Provider shortcuts (the YAML file can define more named instances).
OPENAI_API_KEY = env.str("OPENAI_API_KEY", default="")
OPENAI_API_BASE = env.str("OPENAI_API_BASE", default="")
ANTHROPIC_API_KEY = env.str("ANTHROPIC_API_KEY", default="")
ANTHROPIC_API_BASE = env.str("ANTHROPIC_API_BASE", default="")

# --- Celery ---------------------------------------------------------------------------------
# Unset broker = the embedded default: tasks run in a background thread of the process
# that enqueued them (never on the request path), see otari/celery.py.
CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default="")
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SOFT_TIME_LIMIT = 60
CELERY_TASK_TIME_LIMIT = 90
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TIMEZONE = "UTC"
# How often the periodic jobs run: under `celery beat`, or, with no broker, in the gateway
# process itself (at most once per interval, started by an incoming request). Also the
# "one sweep interval" of docs/SPEC.md §3.5 invariant 4.
OTARI_BEAT_INTERVAL_SECONDS = env.float("OTARI_BEAT_INTERVAL_SECONDS", default=60.0)
# With no broker, run the periodic jobs in the gateway process (see otari/celery.py).
OTARI_EMBEDDED_BEAT = env.bool("OTARI_EMBEDDED_BEAT", default=True)
# Every job is idempotent; `expires` drops a run that waited a whole interval in the queue
# (workers down), so a backlog of identical sweeps never piles up.
CELERY_BEAT_SCHEDULE = {
    "budgets-roll-due-periods": {
        "task": "budgets.roll_due_periods",
        "schedule": OTARI_BEAT_INTERVAL_SECONDS,
        "options": {"expires": OTARI_BEAT_INTERVAL_SECONDS},
    },
    "budgets-expire-stale-holds": {
        "task": "budgets.expire_stale_holds",
        "schedule": OTARI_BEAT_INTERVAL_SECONDS,
        "options": {"expires": OTARI_BEAT_INTERVAL_SECONDS},
    },
    "budgets-sweep-alerts": {
        "task": "budgets.sweep_alerts",
        "schedule": OTARI_BEAT_INTERVAL_SECONDS,
        "options": {"expires": OTARI_BEAT_INTERVAL_SECONDS},
    },
    # Platform mode: usage reports whose delivery task was lost (docs/PLATFORM.md).
    "usage-redrive-reports": {
        "task": "usage.redrive_reports",
        "schedule": OTARI_BEAT_INTERVAL_SECONDS,
        "options": {"expires": OTARI_BEAT_INTERVAL_SECONDS},
    },
}
CELERY_BEAT_SCHEDULE_FILENAME = env.str(
    "CELERY_BEAT_SCHEDULE_FILENAME", default=str(VAR_DIR / "celerybeat-schedule")
)

# --- Budget alerts (docs/OPERATIONS.md) ----------------------------------------------------
OTARI_ALERT_WEBHOOK_TIMEOUT_SECONDS = env.float("OTARI_ALERT_WEBHOOK_TIMEOUT_SECONDS", default=10.0)
# A delivery attempt still running after this long is presumed dead (its worker was killed)
# and the beat sweep sends the alert again. Above the task's hard time limit (90 s), so an
# attempt in progress is never taken for a dead one.
OTARI_ALERT_LEASE_SECONDS = env.float("OTARI_ALERT_LEASE_SECONDS", default=120.0)
# A pending alert with no attempt in progress and none for this long lost its task (the
# broker lost the message): the beat sweep enqueues it again. Above the retry backoff's cap
# (60 s), so a scheduled retry is not sent early.
OTARI_ALERT_REDRIVE_AFTER_SECONDS = env.float("OTARI_ALERT_REDRIVE_AFTER_SECONDS", default=600.0)
OTARI_ALERT_FROM_EMAIL = env.str("OTARI_ALERT_FROM_EMAIL", default="otari@localhost")
# Django's mail backend, from one URL: smtp+tls://user:password@host:587 (STARTTLS),
# smtp+ssl://...:465, consolemail:// (print), dummymail:// (drop). Default: SMTP on
# localhost:25.
vars().update(env.email_url("EMAIL_URL", default="smtp://localhost:25"))

# --- Observability and rate limits (docs/OBSERVABILITY.md) ---------------------------------
OTARI_ENABLE_METRICS = env.bool("OTARI_ENABLE_METRICS", default=False)
# GET /metrics requires `Authorization: Bearer <token>`: the metrics show the gateway's
# traffic, models, errors and money. Without a token it is refused (403) unless the operator
# opts out with OTARI_METRICS_PUBLIC (a scraper on a network they trust); either way each
# worker says so at startup (otari/metrics.py warn_at_startup).
OTARI_METRICS_TOKEN = env.str("OTARI_METRICS_TOKEN", default="")
OTARI_METRICS_PUBLIC = env.bool("OTARI_METRICS_PUBLIC", default=False)
OTARI_LOG_FORMAT = env.str("OTARI_LOG_FORMAT", default="text")
if OTARI_LOG_FORMAT not in ("text", "json"):
    raise ImproperlyConfigured("OTARI_LOG_FORMAT must be text or json")
# One line per HTTP request (logger otari.access), with its request id.
OTARI_ACCESS_LOG = env.bool("OTARI_ACCESS_LOG", default=True)
# Debugging only: log request and response bodies (prompts, completions) at DEBUG level.
OTARI_LOG_PAYLOADS = env.bool("OTARI_LOG_PAYLOADS", default=False)
# Where rate limits are counted, shared by every process. Default: the Celery broker when
# it is Redis; else per process (a warning says so at startup).
OTARI_RATELIMIT_REDIS_URL = env.str(
    "OTARI_RATELIMIT_REDIS_URL",
    default=CELERY_BROKER_URL
    if CELERY_BROKER_URL.startswith(("redis://", "rediss://", "unix://"))
    else "",
)
# The length of a rate-limit window: rpm_limit and tpm_limit count per window (a minute).
OTARI_RATELIMIT_WINDOW_SECONDS = env.int("OTARI_RATELIMIT_WINDOW_SECONDS", default=60)
OTARI_RATELIMIT_KEY_PREFIX = env.str("OTARI_RATELIMIT_KEY_PREFIX", default="otari:rl:")

# --- The console's login throttle (docs/ADMIN.md, common/login_throttle.py) ---------------
# After OTARI_LOGIN_FAILURE_LIMIT failed logins for one username, or from one client
# address, within OTARI_LOGIN_FAILURE_WINDOW_SECONDS, further attempts are refused for
# OTARI_LOGIN_LOCKOUT_SECONDS without the password being checked.
OTARI_LOGIN_FAILURE_LIMIT = env.int("OTARI_LOGIN_FAILURE_LIMIT", default=5)
OTARI_LOGIN_FAILURE_WINDOW_SECONDS = env.int("OTARI_LOGIN_FAILURE_WINDOW_SECONDS", default=900)
OTARI_LOGIN_LOCKOUT_SECONDS = env.int("OTARI_LOGIN_LOCKOUT_SECONDS", default=900)
if (
    min(OTARI_LOGIN_FAILURE_LIMIT, OTARI_LOGIN_FAILURE_WINDOW_SECONDS, OTARI_LOGIN_LOCKOUT_SECONDS)
    < 1
):
    raise ImproperlyConfigured(
        "OTARI_LOGIN_FAILURE_LIMIT, OTARI_LOGIN_FAILURE_WINDOW_SECONDS and "
        "OTARI_LOGIN_LOCKOUT_SECONDS must be at least 1"
    )
# Django's cache, where the login throttle counts: Redis (OTARI_CACHE_URL; default the rate
# limits' Redis), shared by every process and host; unset, each process's own memory.
OTARI_CACHE_URL = env.str("OTARI_CACHE_URL", default=OTARI_RATELIMIT_REDIS_URL)
CACHES = {
    "default": (
        {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": OTARI_CACHE_URL,
            "KEY_PREFIX": "otari",
            # A Redis that does not answer must not hang a console login (the throttle
            # then lets logins through, with a warning).
            "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
        }
        if OTARI_CACHE_URL
        else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    )
}

# --- Routing health (docs/ROUTING.md) -------------------------------------------------------
# A target that failed this many times in a row is skipped for OTARI_ROUTING_COOLDOWN_SECONDS.
OTARI_ROUTING_FAILURE_THRESHOLD = env.int("OTARI_ROUTING_FAILURE_THRESHOLD", default=3)
OTARI_ROUTING_COOLDOWN_SECONDS = env.int("OTARI_ROUTING_COOLDOWN_SECONDS", default=30)
if OTARI_ROUTING_FAILURE_THRESHOLD < 1 or OTARI_ROUTING_COOLDOWN_SECONDS < 1:
    raise ImproperlyConfigured(
        "OTARI_ROUTING_FAILURE_THRESHOLD and OTARI_ROUTING_COOLDOWN_SECONDS must be at least 1"
    )
# Where the failure counts and cooldowns are shared by every process: the rate limits'
# Redis by default; empty: per process.
OTARI_ROUTING_REDIS_URL = env.str("OTARI_ROUTING_REDIS_URL", default=OTARI_RATELIMIT_REDIS_URL)
OTARI_ROUTING_KEY_PREFIX = env.str("OTARI_ROUTING_KEY_PREFIX", default="otari:rt:")

# --- REST framework (management API) --------------------------------------------------------
# JSON with exact Decimals and `{"detail": ...}` errors: common/rest.py (master-key auth:
# budgets/rest.py).
REST_FRAMEWORK = {
    # Every management view is master-key only unless it says otherwise (health is public).
    "DEFAULT_AUTHENTICATION_CLASSES": ["budgets.rest.MasterKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["budgets.rest.IsMaster"],
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_RENDERER_CLASSES": ["common.rest_json.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["common.rest_json.JSONParser"],
    "EXCEPTION_HANDLER": "common.rest.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "COERCE_DECIMAL_TO_STRING": False,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Otari gateway API",
    "DESCRIPTION": (
        "Generation endpoints (OpenAI and Anthropic wire formats, API key) and the "
        "management API (master key). Every `/v1/...` route is also served, identically, "
        "under `/api/v1/...` (the path the otari SDK and otari-cli call). Management "
        'errors are `{"detail": "..."}`; money is USD as exact JSON numbers.'
    ),
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_AUTHENTICATION": [],
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "COMPONENT_SPLIT_REQUEST": True,
    "SCHEMA_PATH_PREFIX": r"/v1",
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "PREPROCESSING_HOOKS": ["otari.openapi.endpoints_dedupe"],
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "otari.openapi.schema_complete",
    ],
    "ENUM_NAME_OVERRIDES": {
        "ResetAlignmentEnum": "budgets.models.ResetAlignment",
        "UsageStatusEnum": "usage.models.UsageLog.Status",
    },
}

# --- Logging --------------------------------------------------------------------------------
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # Both formatters add the request id and remove secrets (otari/logging.py).
    "formatters": {
        "text": {"()": "otari.logging.TextFormatter"},
        "json": {"()": "otari.logging.JsonFormatter"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": OTARI_LOG_FORMAT}},
    "root": {"handlers": ["console"], "level": env.str("OTARI_LOG_LEVEL", default="INFO")},
    "loggers": {
        # httpx logs every request line, which would put provider URLs in the log stream.
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
    },
}
