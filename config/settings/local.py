"""Developer settings: embedded defaults so `make run` needs nothing but Python."""

from .base import *  # noqa: F403
from .base import BASE_DIR, REDIS_URL, database_from_env, env_bool, env_list

DEBUG = True
SECRET_KEY = "django-insecure-local-development-only"
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")

WHITENOISE_AUTOREFRESH = True

# `make run` starts Redis on a free port and records its URL here, so that a
# second shell (`manage.py shell`, `manage.py chaos`) reaches the same broker.
RUN_REDIS_URL_FILE = BASE_DIR / ".run" / "redis.url"
if not REDIS_URL and RUN_REDIS_URL_FILE.exists():
    REDIS_URL = RUN_REDIS_URL_FILE.read_text().strip()
    CELERY_BROKER_URL = REDIS_URL

DATABASES = {"default": database_from_env(f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}

SAGA_CHAOS_ENABLED = env_bool("SAGA_CHAOS_ENABLED", True)
