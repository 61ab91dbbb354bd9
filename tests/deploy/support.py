"""Reading docker-compose.yml and deploy/ as Compose and the tools would."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}
VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<how>:?[-?])(?P<rest>[^}]*))?\}")


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def compose() -> dict:
    return load_yaml(COMPOSE)


def interpolate(value: str, environ: dict[str, str] | None = None) -> str:
    """Compose's substitution of ${...} with ``environ`` as the host's environment."""
    environ = environ or {}

    def replace(match: re.Match) -> str:
        name, how, rest = match["name"], match["how"], match["rest"]
        found = environ.get(name)
        if how in (":-", "-") and (found is None or (how == ":-" and not found)):
            return rest
        if how in (":?", "?") and (found is None or (how == ":?" and not found)):
            raise LookupError(f"{name} is required: {rest}")
        return found or ""

    return VARIABLE.sub(replace, value.replace("$$", "\0")).replace("\0", "$")


def bind_mounts(service: dict) -> dict[str, str]:
    """{host path: container path} of the service's bind mounts (``./...``)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_mode = volume.split(":")
        if source.startswith("./"):
            mounts[source] = target
    return mounts
