import os

from django.core.asgi import get_asgi_application

from config.tracing import configure_tracing

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

# Before the handler loads the middleware, which the Django instrumentation extends.
configure_tracing("web")
application = get_asgi_application()
