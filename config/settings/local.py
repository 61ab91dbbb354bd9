"""Developer settings: embedded defaults so `make run` needs nothing but Python."""

from .base import *  # noqa: F403
from .base import BASE_DIR, database_from_env, env_bool, env_list

DEBUG = True
SECRET_KEY = "django-insecure-local-development-only"
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")

DATABASES = {"default": database_from_env(f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}

SAGA_CHAOS_ENABLED = env_bool("SAGA_CHAOS_ENABLED", True)
