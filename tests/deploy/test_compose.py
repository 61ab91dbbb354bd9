"""docker-compose.yml: the stack as before, plus the observability profile (no Docker needed)."""

from __future__ import annotations

import re

import pytest

from tests.deploy.support import COMPOSE, REPO, bind_mounts, compose, interpolate

OBSERVABILITY = ("prometheus", "grafana", "jaeger")
APP = ("migrate", "web", "worker", "beat", "flower")
SECRETS = {
    "DJANGO_SECRET_KEY": "s" * 50,
    "POSTGRES_PASSWORD": "pw",
    "FLOWER_BASIC_AUTH": "u:p",
}


def service(name: str) -> dict:
    return compose()["services"][name]


def test_the_observability_services_run_only_under_their_profile():
    services = compose()["services"]

    for name in OBSERVABILITY:
        assert services[name]["profiles"] == ["observability"], name
    # A plain `docker compose up` starts what it started before.
    assert {name for name, spec in services.items() if "profiles" not in spec} == {
        "postgres",
        "redis",
        *APP,
    }


def test_no_observability_service_requires_a_variable():
    """Compose interpolates every service, profile or not: a ${VAR:?} here breaks `up`."""
    for name in OBSERVABILITY:
        text = str(service(name))
        assert not re.search(r"\$\{\w+:?\?", text), name


def test_no_default_value_contains_a_brace():
    """Some Compose versions end ${VAR:-...} at the first "}" and append the rest to a set value."""
    for match in re.finditer(r"\$\{[^}]*", COMPOSE.read_text()):
        assert "{" not in match.group()[2:], match.group()


@pytest.mark.parametrize(
    ("name", "service_name"), [("web", "backtrack-web"), ("worker", "backtrack-worker")]
)
def test_web_and_worker_export_traces_only_when_asked(name, service_name):
    environment = service(name)["environment"]

    assert environment["OTEL_TRACES_EXPORTER"] == "${OTEL_TRACES_EXPORTER:-none}"
    assert interpolate(environment["OTEL_TRACES_EXPORTER"]) == "none"
    assert interpolate(environment["OTEL_TRACES_EXPORTER"], {"OTEL_TRACES_EXPORTER": "otlp"}) == (
        "otlp"
    )
    assert interpolate(environment["OTEL_EXPORTER_OTLP_ENDPOINT"]) == "http://jaeger:4318"
    assert environment["OTEL_SERVICE_NAME"] == service_name
    # The shared settings are still there under the additions.
    assert environment["DATABASE_URL"].startswith("postgres://backtrack:")
    assert environment["DJANGO_SETTINGS_MODULE"] == "config.settings.production"


def test_the_web_links_sagas_to_their_trace_in_jaeger_and_takes_the_metrics_token():
    environment = service("web")["environment"]
    template = environment["SAGA_TRACE_URL_TEMPLATE"]

    assert interpolate(template) == "http://localhost:16686/trace/{trace_id}"
    assert interpolate(template, {"JAEGER_UI_URL": "https://jaeger.example"}) == (
        "https://jaeger.example/trace/{trace_id}"
    )
    assert interpolate(environment["METRICS_TOKEN"], {"METRICS_TOKEN": "t0ken"}) == "t0ken"
    assert interpolate(environment["METRICS_TOKEN"]) == ""  # staff only, as before
    assert "web" in interpolate(environment["DJANGO_ALLOWED_HOSTS"]).split(",")


def test_jaeger_takes_otlp_on_4317_and_4318_and_shows_its_ui_on_16686():
    jaeger = service("jaeger")

    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    published = {port.rsplit(":", 1)[1] for port in jaeger["ports"]}
    assert published == {"16686", "4317", "4318"}
    assert all(port.startswith("127.0.0.1:") for port in jaeger["ports"])


def test_grafana_needs_an_admin_password_and_lets_anyone_view():
    grafana = service("grafana")
    environment = grafana["environment"]
    script = grafana["entrypoint"][-1].replace("$$", "$")

    assert environment["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-}"
    assert 'if [ -z "$GF_SECURITY_ADMIN_PASSWORD" ]' in script
    assert script.endswith("exec /run.sh")
    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert environment["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]
    assert service("prometheus")["ports"] == ["127.0.0.1:9090:9090"]


def test_every_mounted_file_exists_and_every_named_volume_is_declared():
    declared = set(compose()["volumes"])
    for name, spec in compose()["services"].items():
        for source in bind_mounts(spec):
            assert (REPO / source).exists(), f"{name}: {source}"
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith(("./", "/")):
                assert source in declared, f"{name}: volume {source} is not declared"


def test_the_whole_file_interpolates_with_only_the_three_documented_secrets():
    def walk(node, environ):
        if isinstance(node, dict):
            for value in node.values():
                walk(value, environ)
        elif isinstance(node, list):
            for value in node:
                walk(value, environ)
        elif isinstance(node, str):
            interpolate(node, environ)

    walk(compose(), SECRETS)
    with pytest.raises(LookupError, match="POSTGRES_PASSWORD"):
        walk(compose(), {**SECRETS, "POSTGRES_PASSWORD": ""})
