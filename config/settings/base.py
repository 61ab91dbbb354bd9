"""Settings shared by every environment. Secrets and hosts come from the environment."""

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from config.env import http_url_from_env
from config.tracing import endpoint_from_env, exporters_from_env, trace_url_template_from_env

BASE_DIR = Path(__file__).resolve().parent.parent.parent


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(
        f"{name}={raw!r} is not a boolean: use one of 1/0, true/false, yes/no, on/off"
    )


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name}={value} must be at least {minimum}")
    return value


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def postgres_session_options() -> dict:
    """libpq options that bound every wait of a web or worker session (DESIGN.md 2, Recovery).

    - ``lock_timeout``: a statement waiting this long for a row lock fails
      (LockNotAvailable) instead of queueing behind a frozen session.
    - ``statement_timeout``: no statement runs longer than this.
    - ``idle_in_transaction_session_timeout``: a session that sits in an open
      transaction this long without a statement (its host frozen, its network
      cut) is ended by the server, which releases its row locks. Just above
      the longest step transaction: no gateway call runs inside one.
    - TCP keepalives and ``tcp_user_timeout``: a peer that vanished is noticed
      in about ``DB_KEEPALIVES_IDLE_S + 3 * DB_KEEPALIVES_INTERVAL_S`` seconds
      (``DB_TCP_USER_TIMEOUT_MS`` for data sent and never acknowledged),
      not after the operating system's two hours.
    - ``connect_timeout``: connecting to a database that does not answer fails.
    - ``application_name`` (``DATABASE_APPLICATION_NAME``): how the session
      shows in ``pg_stat_activity``, so an operator can tell (and end) them.

    Zero turns a timeout off.
    """
    timeouts = {
        "lock_timeout": env_int("DB_LOCK_TIMEOUT_MS", 5_000),
        "statement_timeout": env_int("DB_STATEMENT_TIMEOUT_MS", 60_000),
        "idle_in_transaction_session_timeout": env_int("DB_IDLE_IN_TRANSACTION_TIMEOUT_MS", 20_000),
    }
    keepalives = {
        "keepalives_idle": env_int("DB_KEEPALIVES_IDLE_S", 10, minimum=1),
        "keepalives_interval": env_int("DB_KEEPALIVES_INTERVAL_S", 5, minimum=1),
        "keepalives_count": env_int("DB_KEEPALIVES_COUNT", 3, minimum=1),
    }
    # The server probes the client the same way, so a session whose host
    # vanished (not merely froze: a frozen host's kernel still answers) ends.
    server = {**timeouts, **{f"tcp_{name}": value for name, value in keepalives.items()}}
    options = {
        "options": " ".join(f"-c {name}={value}" for name, value in server.items()),
        "connect_timeout": env_int("DB_CONNECT_TIMEOUT_S", 5),
        "keepalives": 1,
        **keepalives,
        "tcp_user_timeout": env_int("DB_TCP_USER_TIMEOUT_MS", 30_000),
    }
    name = os.environ.get("DATABASE_APPLICATION_NAME", "").strip()
    if name:
        options["application_name"] = name[:63]
    return options


def database_from_env(default_url: str | None) -> dict:
    url = os.environ.get("DATABASE_URL") or default_url
    if not url:
        raise ImproperlyConfigured("DATABASE_URL is not set")
    try:
        config = dj_database_url.parse(url, conn_max_age=0)
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is not a usable database URL: {exc}") from None
    if config["ENGINE"].startswith("django.db.backends.postgresql"):
        config["OPTIONS"] = {**postgres_session_options(), **config.get("OPTIONS", {})}
    if config["ENGINE"] == "django.db.backends.sqlite3":
        # A worker and the web server write concurrently: wait for the lock
        # instead of failing, and take it up front so transactions never upgrade.
        config["OPTIONS"] = {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    return config


INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_results",
    "django_celery_beat",
    "sagas",
    "inventory",
    "payments",
    "bookings",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's and the API browser's static files from gunicorn.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
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


DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
# Times to the second on every admin page (config/formats/en/formats.py).
FORMAT_MODULE_PATH = ["config.formats"]
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# Served from the apps (WHITENOISE_USE_FINDERS) outside production, which
# collects them into STATIC_ROOT.
WHITENOISE_USE_FINDERS = True


def log_format_from_env() -> str:
    raw = os.environ.get("LOG_FORMAT", "").strip()
    if raw.lower() in ("", "plain"):
        return "plain"
    if raw.lower() == "json":
        return "json"
    raise ImproperlyConfigured(f"LOG_FORMAT={raw!r} is not a log format: use plain or json")


# Every line carries the running saga step's saga_id, step and trace_id
# (sagas.tracing.SagaLogFilter; blank outside a step). LOG_FORMAT=json writes
# one JSON object per line with those as fields.
LOG_FORMAT = log_format_from_env()
_LOG_FORMATTERS = {
    "plain": {
        "()": "sagas.tracing.PlainFormatter",
        # LEVEL/processName as Celery's own format has it: the chaos harness
        # finds a worker's last "CRITICAL/" or "ERROR/Main..." line by it.
        "format": "%(asctime)s %(levelname)s/%(processName)s %(name)s %(message)s",
    },
    "json": {
        "()": "pythonjsonlogger.json.JsonFormatter",
        "fmt": (
            "%(asctime)s %(levelname)s %(processName)s %(name)s %(message)s"
            " %(saga_id)s %(step)s %(trace_id)s"
        ),
        "rename_fields": {
            "asctime": "time",
            "levelname": "level",
            "processName": "process",
            "name": "logger",
        },
    },
}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"saga": {"()": "sagas.tracing.SagaLogFilter"}},
    # Only the one in use: dictConfig builds (and imports) every formatter listed.
    "formatters": {LOG_FORMAT: _LOG_FORMATTERS[LOG_FORMAT]},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["saga"]}
    },
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
}

# --- Tracing (config/tracing.py; README "Tracing and logs") ---------------------
# none (the default: no provider, no instrumentation), otlp, console, or "otlp,console".
OTEL_TRACES_EXPORTER = exporters_from_env()
OTEL_EXPORTER_OTLP_ENDPOINT = endpoint_from_env()
OTEL_SERVICE_NAME = os.environ.get("OTEL_SERVICE_NAME", "").strip()
# The admin links a saga's trace id here, e.g. http://localhost:16686/trace/{trace_id}.
SAGA_TRACE_URL_TEMPLATE = trace_url_template_from_env()

# --- Celery (DESIGN.md section 3) -------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "")
# Never let Celery fall back to its built-in default (amqp on localhost):
# an unset broker is a configuration error, reported by the sagas system check.
CELERY_BROKER_URL = REDIS_URL
# django-celery-results' backend, retrying (with backoff) a store or read whose
# database connection broke: a worker's main process stores hard time limits.
CELERY_RESULT_BACKEND = "sagas.results:ResilientDatabaseBackend"
CELERY_RESULT_BACKEND_ALWAYS_RETRY = True
# Few and quick: the worker's main process stores hard time limits, and a
# long retry there would stall its event loop (and the renewal of its leases).
CELERY_RESULT_BACKEND_MAX_RETRIES = 2
CELERY_RESULT_BACKEND_BASE_SLEEP_BETWEEN_RETRIES_MS = 100
CELERY_RESULT_BACKEND_MAX_SLEEP_BETWEEN_RETRIES_MS = 1000
CELERY_RESULT_EXTENDED = True
# Saga steps store no result on success (SagaLog has it) but always on failure,
# so the admin can link a failed attempt to its stored traceback.
CELERY_TASK_STORE_ERRORS_EVEN_IF_IGNORED = True
CELERY_TASK_TRACK_STARTED = False
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_TIMEZONE = TIME_ZONE
# At-least-once delivery: a message is acknowledged after its task finished,
# and put back when the process running it dies.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 20, minimum=1)
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 30, minimum=2)
# The longest countdown a retry may ask for (sagas.definitions.RetryPolicy caps at it).
SAGA_MAX_RETRY_DELAY_S = env_int("SAGA_MAX_RETRY_DELAY_S", 30, minimum=1)
# Redis redelivers a message left unacknowledged for the visibility timeout.
# Live workers renew their lease on every message they hold this often
# (sagas.leases), so the visibility timeout only has to outlast a few missed
# renewals: a worker that died or froze has its messages handed out again
# within about CELERY_VISIBILITY_TIMEOUT + the restore interval.
SAGA_LEASE_RENEW_S = env_int("SAGA_LEASE_RENEW_S", 2, minimum=1)
# The timeout leaves room for a worker's event loop to stall for a while (a
# slow result store, a busy host) and for hosts' clocks to disagree by a few
# seconds: kombu compares the renewing worker's clock with the restoring one's.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 20, minimum=1),
    # Look for lapsed leases every second (kombu's default: every 100 s).
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
    # The restore takes a lock in Redis; one left by a worker that died or
    # froze holding it must not stop every restore for kombu's default 300 s.
    "unacked_mutex_expire": 10,
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A request must not hang on a broker outage: publishing gives up quickly and
# the reconciler re-dispatches the saga that was already committed.
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2}
# Celery's Django fixup closes the DB connection around every task unless this
# is set; reconnecting per task cut DB-writing chains to a third of their rate.
CELERY_DB_REUSE_MAX = env_int("CELERY_DB_REUSE_MAX", 1000)
CELERY_TASK_DEFAULT_QUEUE = "sagas"
# Workers log through LOGGING above (its saga context filter, LOG_FORMAT),
# not through handlers of Celery's own that replace the root logger's.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Task events (received, started, succeeded) are what Flower shows tasks
# from, so they stay on. The worker commands pass no -E, so this setting
# decides (Flower, where it runs, turns them on again every 5 s: its
# enable_events default).
CELERY_WORKER_SEND_TASK_EVENTS = env_bool("CELERY_WORKER_SEND_TASK_EVENTS", True)
# ... published in batches (sagas.events): one PUBLISH per interval, or per
# batch once it is full, instead of one per event, three per task, which had
# made them the dearest of Celery's per-task machinery (`bench --pipeline`).
# Monitors see an event at most this late; 0 keeps Celery's flush on every
# loop turn.
SAGA_TASK_EVENTS_FLUSH_MS = env_int("SAGA_TASK_EVENTS_FLUSH_MS", 100)
SAGA_TASK_EVENTS_BATCH = env_int("SAGA_TASK_EVENTS_BATCH", 100, minimum=1)
# No "task-sent" events: each would be one more publish on every chain hop,
# and Flower follows tasks from the worker's events (received, succeeded).
CELERY_TASK_SEND_SENT_EVENT = False
# Beat's jobs (reconciler, sweeper, retention) have a queue of their own: a
# backlog of errbacks on "sagas" must not make them expire unrun exactly when
# they are needed. Every worker deployment consumes it (config/Procfile).
MAINTENANCE_QUEUE = "maintenance"
CELERY_TASK_ROUTES = {
    "sagas.reconcile_pending": {"queue": MAINTENANCE_QUEUE},
    "sagas.recover_stalled": {"queue": MAINTENANCE_QUEUE},
    "*.purge_*": {"queue": MAINTENANCE_QUEUE},
}
# ...and send no task events wherever they run, so that Flower's task list
# shows sagas, not a maintenance job every 2.5 s (config.celery_app).
CELERY_TASK_ANNOTATIONS = ["config.celery_app.QuietMaintenanceTasks"]
# Retention (README, "Retention"): beat deletes old rows in batches of
# SAGA_RETENTION_BATCH, each its own short transaction, and a run stops after
# SAGA_RETENTION_MAX_S (the next one continues).
SAGA_RETENTION_INTERVAL_S = env_int("SAGA_RETENTION_INTERVAL_S", 3600, minimum=60)
SAGA_RETENTION_BATCH = env_int("SAGA_RETENTION_BATCH", 1000, minimum=1)
SAGA_RETENTION_MAX_S = env_int("SAGA_RETENTION_MAX_S", 20, minimum=1)
# TaskResults: a day, Celery's default result_expires. At least an hour: an
# errback reads its failed step's stored result, maybe behind a backlog.
SAGA_RETENTION_TASK_RESULTS_S = env_int("SAGA_RETENTION_TASK_RESULTS_S", 86_400, minimum=3600)
# Terminal sagas with their logs: 0 keeps them forever (the default).
SAGA_RETENTION_SAGAS_DAYS = env_int("SAGA_RETENTION_SAGAS_DAYS", 0)
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# No result expiry: with one set (Celery's default is a day), beat schedules
# celery.backend_cleanup, which deletes every expired TaskResult in ONE
# statement, holding its locks and WAL for as long as that takes.
# sagas.purge_expired deletes them in short batches instead
# (SAGA_RETENTION_TASK_RESULTS_S).
CELERY_RESULT_EXPIRES = None
CELERY_BEAT_SCHEDULE = {
    "sagas-reconcile-pending": {
        "task": "sagas.reconcile_pending",
        "schedule": float(env_int("SAGA_RECONCILE_INTERVAL_S", 5, minimum=1)),
        "options": {"queue": MAINTENANCE_QUEUE, "expires": 30},
    },
    "sagas-recover-stalled": {
        "task": "sagas.recover_stalled",
        "schedule": float(env_int("SAGA_SWEEP_INTERVAL_S", 5, minimum=1)),
        "options": {"queue": MAINTENANCE_QUEUE, "expires": 60},
    },
    # A retention job still queued when the next one is due has been superseded.
    "sagas-purge-expired": {
        "task": "sagas.purge_expired",
        "schedule": float(SAGA_RETENTION_INTERVAL_S),
        "options": {"queue": MAINTENANCE_QUEUE, "expires": SAGA_RETENTION_INTERVAL_S},
    },
    "bookings-purge-idempotency-keys": {
        "task": "bookings.purge_idempotency_keys",
        "schedule": float(SAGA_RETENTION_INTERVAL_S),
        "options": {"queue": MAINTENANCE_QUEUE, "expires": SAGA_RETENTION_INTERVAL_S},
    },
}

# --- Sagas ------------------------------------------------------------------
# A PENDING saga older than this was committed but never published.
SAGA_DISPATCH_GRACE_S = env_int("SAGA_DISPATCH_GRACE_S", 5, minimum=1)
SAGA_CHAOS_ENABLED = env_bool("SAGA_CHAOS_ENABLED", False)
SAGA_STORE_STEP_RESULTS = env_bool("SAGA_STORE_STEP_RESULTS", False)
# Added to a step's worst case (every attempt at its hard limit plus every
# backoff) before the sweeper calls it stalled where the broker cannot be
# read (not Redis), and to the default saga and compensation deadlines.
SAGA_STALL_GRACE_S = env_int("SAGA_STALL_GRACE_S", 10, minimum=1)
# The live feed's cursor stays behind log rows that finished less than this ago: a row
# whose transaction commits within it after it finished is never skipped (sagas.feed).
SAGA_FEED_SETTLE_S = env_int("SAGA_FEED_SETTLE_S", 5, minimum=0)
# A saga quiet this long with no message of it in the broker lost its
# messages: the sweeper publishes the rest of its chain (sagas.broker).
SAGA_LOST_AFTER_S = env_int("SAGA_LOST_AFTER_S", 10, minimum=1)
# One sweep works through stalled sagas in batches for at most this long (the
# sweeper's soft time limit is this plus 20 s).
SAGA_SWEEP_BUDGET_S = env_int("SAGA_SWEEP_BUDGET_S", 10, minimum=1)
# Above this many saga messages in the broker the sweeper does not read them
# (it would cost more than it saves) and waits out step budgets instead.
SAGA_BROKER_SCAN_MAX = env_int("SAGA_BROKER_SCAN_MAX", 100_000, minimum=1)
# How long an external step's call (a payment) may still land after its
# STARTED row was written: a saga does not finish compensating before then.
# It bounds a worker frozen mid-call; one frozen longer is beyond it.
SAGA_CALL_HORIZON_S = env_int("SAGA_CALL_HORIZON_S", 120, minimum=1)
# A step or compensation whose message came back this many times after its
# worker was lost (crashed, killed, frozen) fails for good: a message that
# kills every worker it reaches cannot keep its saga from ending.
# A warm shutdown hands back what a worker held as "redelivered" too, so this
# leaves room for a rolling restart.
SAGA_MAX_LOST_DELIVERIES = env_int("SAGA_MAX_LOST_DELIVERIES", 5, minimum=1)
# The database unreachable or a bounded wait run out (a lock held by a frozen
# session): a step is tried again this many times, backing off to
# SAGA_OUTAGE_MAX_DELAY_S, before it counts against its own retry policy.
SAGA_OUTAGE_RETRIES = env_int("SAGA_OUTAGE_RETRIES", 20)
SAGA_OUTAGE_MAX_DELAY_S = env_int("SAGA_OUTAGE_MAX_DELAY_S", 10, minimum=1)

# --- Payments ---------------------------------------------------------------
PAYMENTS_GATEWAY = os.environ.get("PAYMENTS_GATEWAY", "payments.gateways.fake.FakeGateway")
PAYMENTS_CURRENCIES = env_list("PAYMENTS_CURRENCIES", "EUR,USD,GBP")
# The fake gateway (payments/gateways/fake.py) keeps its books in Redis: in
# PAYMENTS_FAKE_GATEWAY_URL when a settings module sets one, otherwise in
# REDIS_URL's server, database number + 1 (redis://h:6379/0 -> /1), so that a
# FLUSHDB of the broker's database never erases them. A broker on database 15
# leaves no next one: then PAYMENTS_FAKE_GATEWAY_URL must be set. It is left
# undefined here on purpose, so the books follow REDIS_URL (a chaos run's own
# broker included).
# Seconds after which a tok_late capture at the fake gateway lands (is visible).
try:
    PAYMENTS_FAKE_LATE_CAPTURE_S = float(os.environ.get("PAYMENTS_FAKE_LATE_CAPTURE_S") or 2.0)
except ValueError:
    raise ImproperlyConfigured(
        "PAYMENTS_FAKE_LATE_CAPTURE_S is not a number of seconds, e.g. 2.0"
    ) from None

# --- Bookings ---------------------------------------------------------------
# How long an Idempotency-Key replays its first response; beat deletes older
# keys, after which the same key books anew. The API documents no window, so
# a day (Stripe prunes its keys after 24 hours too).
BOOKINGS_IDEMPOTENCY_KEY_TTL_S = env_int("BOOKINGS_IDEMPOTENCY_KEY_TTL_S", 86_400, minimum=60)

# --- DRF --------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    # Every view names its permission; this default only catches one that forgets.
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "config.api.AutoSchema",
    # Every /api/ answer is JSON, for a browser too (browsers show JSON well); the
    # interactive docs are /api/docs/.
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "EXCEPTION_HANDLER": "config.api.exception_handler",
    "DEFAULT_PAGINATION_CLASS": "config.pagination.PageNumberPagination",
    "DEFAULT_THROTTLE_RATES": {"auth": os.environ.get("API_AUTH_THROTTLE", "20/minute")},
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Backtrack API",
    "DESCRIPTION": "Bookings run as sagas: every step is undone in reverse when a later one fails.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "SagaStatusEnum": "sagas.models.Saga.Status",
        "SagaLogStatusEnum": "sagas.models.SagaLog.Status",
        "BookingStatusEnum": "bookings.models.Booking.Status",
    },
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "config.api.add_error_responses",
    ],
}

# --- Flower -----------------------------------------------------------------
# Where operators reach Flower (make run sets http://127.0.0.1:5555): the
# admin links each saga log row to its task there, <FLOWER_URL>/task/<task id>.
# Unset, no links. Flower lists only the tasks it saw events of while running.
FLOWER_URL = http_url_from_env("FLOWER_URL", example="http://localhost:5555")

# --- Metrics ----------------------------------------------------------------
# GET /metrics (sagas/metrics.py) answers staff users and, when this is set,
# requests with "Authorization: Bearer <METRICS_TOKEN>" (Prometheus' bearer_token).
METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "")
# Each web process queries the database at most once per this many seconds.
METRICS_CACHE_S = env_int("METRICS_CACHE_S", 15)
# A SagaLog row is folded into a process's kept step histogram once it finished
# this long ago: it must exceed commit delay plus clock skew between hosts.
METRICS_STEP_LAG_S = env_int("METRICS_STEP_LAG_S", 60, minimum=1)
