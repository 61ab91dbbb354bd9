"""Test settings: a real broker and a real database, never eager mode."""

import os

from .base import *  # noqa: F403
from .base import BASE_DIR, database_from_env

DEBUG = False
SECRET_KEY = "django-insecure-test-only"
ALLOWED_HOSTS = ["testserver", "localhost", "127.0.0.1"]

DATABASES = {"default": database_from_env(f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not memory: the test worker thread opens its own connection.
    # One per process, so that two runs on one checkout do not share it.
    DATABASES["default"]["TEST"] = {"NAME": str(BASE_DIR / f".test-db-{os.getpid()}.sqlite3")}

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
SAGA_CHAOS_ENABLED = True
REST_FRAMEWORK = {**REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"auth": "10000/minute"}}  # noqa: F405
# Short backoff keeps retry tests quick; the policy shape is the same.
SAGA_RETRY_DELAY_SCALE = 0.05
# tok_late captures land this much later: as short next to the scaled retry
# budgets as the 2 s default is next to production's.
PAYMENTS_FAKE_LATE_CAPTURE_S = 0.5
# A saga type with no domain app behind it (tests/toy): proves the engine stands alone.
INSTALLED_APPS = [*INSTALLED_APPS, "tests.toy"]  # noqa: F405
