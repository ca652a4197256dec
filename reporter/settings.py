"""Process settings from the environment. The only module that reads os.environ."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from reporter import defaults
from reporter.errors import ConfigError, Problem


def _env(environ: Mapping[str, str], name: str) -> str | None:
    """NAME, or the contents of the file named by NAME_FILE (for Docker/Kubernetes secrets)."""
    value = environ.get(name)
    if value:
        return value
    file_name = environ.get(f"{name}_FILE")
    if file_name:
        try:
            return Path(file_name).read_text().strip()
        except OSError as exc:
            why = f"cannot read {file_name}: {exc.strerror or type(exc).__name__}; fix the path or set {name} instead"
            raise ConfigError([Problem(f"{name}_FILE", None, "", why)]) from None
    return None


def is_redis_url(url: str | None) -> bool:
    """True for the URL forms redis-py and kombu's Redis transport accept."""
    return bool(url) and str(url).startswith(("redis://", "rediss://", "unix://", "redis+socket://"))


def redis_client_url(url: str) -> str:
    """kombu's redis+socket:// spelled the way redis-py wants it (unix://)."""
    return url.replace("redis+socket://", "unix://", 1)


@dataclass(frozen=True)
class Settings:
    """Where things are: config, templates, broker, ledger, mail. Built once per process."""

    config_path: Path
    templates_dir: Path
    broker_url: str | None
    database_url: str
    smtp_url: str | None
    outbox: Path
    var_dir: Path
    environ: Mapping[str, str]
    log_json: bool = False
    """REPORTER_LOG_FORMAT=json: one JSON object per delivery log line."""
    metrics_port: int | None = None
    """REPORTER_METRICS_PORT: where workers serve Prometheus metrics (unset: no endpoint)."""
    visibility_timeout: int | None = None
    """REPORTER_VISIBILITY_TIMEOUT: Redis' redelivery timeout in seconds (unset: derived from the config)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        config_path = Path(_env(env, "REPORTER_CONFIG") or defaults.CONFIG_PATH)
        templates = _env(env, "REPORTER_TEMPLATES")
        templates_dir = Path(templates) if templates else config_path.parent / defaults.TEMPLATES_DIRNAME
        var_dir = Path(defaults.VAR_DIR)
        broker_url = _env(env, "REPORTER_BROKER_URL")
        if broker_url is None:
            # `reporter run` writes the address of the Redis it started, so that `reporter send`
            # and `celery inspect` from another terminal find it.
            marker = var_dir / "broker.url"
            if marker.exists():
                broker_url = marker.read_text().strip() or None
        return cls(
            config_path=config_path,
            templates_dir=templates_dir,
            broker_url=broker_url,
            database_url=_env(env, "REPORTER_DATABASE_URL") or defaults.DATABASE_URL,
            smtp_url=_env(env, "REPORTER_SMTP_URL"),
            outbox=Path(_env(env, "REPORTER_OUTBOX") or defaults.OUTBOX),
            var_dir=var_dir,
            environ=env,
            log_json=(_env(env, "REPORTER_LOG_FORMAT") or "text").lower() == "json",
            metrics_port=int(port) if (port := _env(env, "REPORTER_METRICS_PORT")) and port.isdigit() else None,
            visibility_timeout=int(vt) if (vt := _env(env, "REPORTER_VISIBILITY_TIMEOUT")) and vt.isdigit() else None,
        )


def mask_url(url: str) -> str:
    """URL with any password replaced by '***', for logs, errors and history.

    Works on the text, not on a parsed URL, so a password with an unescaped '/' or a URL that
    urllib cannot parse is still masked.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        # A mistyped URL ('smtp//user:pw@host') still carries the password: the user starts after
        # the last '/' before the '@'.
        scheme, rest = "", url
    authority_end = len(rest.split("?", 1)[0].split("#", 1)[0])
    at = rest.rfind("@", 0, authority_end)
    if at == -1:
        return url
    begin = 0 if sep else rest.rfind("/", 0, at) + 1
    colon = rest.find(":", begin, at)
    if colon == -1:
        return url
    return f"{scheme}{sep}{rest[:colon]}:***{rest[at:]}"


def scrub(text: str, *secrets: str | None) -> str:
    """TEXT with each secret, as written and percent-encoded, replaced by '***' (drivers and servers
    sometimes quote credentials back in their errors). Secrets under 3 characters are left alone:
    replacing them would garble the message without hiding anything."""
    from urllib.parse import quote

    for secret in secrets:
        if secret and len(secret) >= 3:
            for form in {secret, quote(secret, safe="")}:
                text = text.replace(form, "***")
    return text
