import os

from django.core.wsgi import get_wsgi_application

from config.tracing import configure_tracing

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

# Before the handler loads the middleware, which the Django instrumentation extends.
# Gunicorn imports this in each worker process, after its fork.
configure_tracing("web")
application = get_wsgi_application()
