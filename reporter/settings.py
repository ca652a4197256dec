"""Process settings from the environment. The only module that reads (or writes) os.environ.

Every variable is declared once in OPTIONS, with its parser and default, and parsed strictly when a
process starts: a value that cannot be read stops the process with the variable, the value
(passwords masked) and what to write instead, never a silent fall-back to the default.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from reporter import defaults, runstate
from reporter.errors import BrokerUnavailable, ConfigError, Problem


class Invalid(ValueError):
    """A value a parser refuses: what is wrong, and what to write instead."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem}: {fix}")


class SettingsError(ConfigError):
    """One or more environment variables cannot be read; the message names each of them."""

    def __str__(self) -> str:
        lines = [str(p) for p in self.problems]
        return lines[0] if len(lines) == 1 else f"{len(lines)} problems in the environment:\n  " + "\n  ".join(lines)


Parser = Callable[[str, str], Any]
"""(variable name, raw value) -> parsed value; raises Invalid."""


def _text(name: str, raw: str) -> str:
    if raw != raw.strip():
        raise Invalid("has spaces around it", f"write {name}={raw.strip()}")
    if "\0" in raw:
        raise Invalid("contains a NUL character", "write the value without it")
    return raw


def path(name: str, raw: str) -> Path:
    """A file or folder path."""
    return Path(_text(name, raw))


def port(example: int) -> Parser:
    """A TCP port: 1 to 65535, digits only."""

    def parse(name: str, raw: str) -> int:
        text = raw.strip()
        if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
            raise Invalid("not a port number", f"write a whole number from 1 to 65535, such as {name}={example}")
        _text(name, raw)
        return int(text)

    return parse


def seconds(example: int) -> Parser:
    """A whole number of seconds above 0."""

    def parse(name: str, raw: str) -> int:
        text = raw.strip()
        if not (text.isascii() and text.isdigit()):
            try:
                number = float(text)
            except ValueError:
                number = None
            if number is not None and number.is_integer() and number > 0:
                raise Invalid("not a whole number of seconds", f"write {name}={int(number)}")
            raise Invalid("not a whole number of seconds", f"write a whole number above 0, such as {name}={example}")
        if int(text) == 0:
            raise Invalid("must be above 0", f"write a whole number of seconds above 0, or unset {name} to use the default")
        _text(name, raw)
        return int(text)

    return parse


def choice(*allowed: str) -> Parser:
    """One of ALLOWED (any case)."""

    def parse(name: str, raw: str) -> str:
        text = raw.strip().lower()
        if text not in allowed:
            close = difflib.get_close_matches(text, allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise Invalid(f"not one of {', '.join(allowed)}", "write " + " or ".join(f"{name}={a}" for a in allowed) + hint)
        _text(name, raw)
        return text

    return parse


def url(schemes: tuple[str, ...], example: str) -> Parser:
    """A URL starting with one of SCHEMES."""

    def parse(name: str, raw: str) -> str:
        _text(name, raw)
        scheme, sep, rest = raw.partition("://")
        if not sep or scheme.lower() not in schemes:
            spelled = ", ".join(f"{s}://" for s in schemes[:-1]) + f" or {schemes[-1]}://"
            raise Invalid(f"must start with {spelled}", f"write for example {name}={example}")
        if not rest:
            raise Invalid("names nothing after the scheme", f"write for example {name}={example}")
        return raw

    return parse


def database_url(name: str, raw: str) -> str:
    """A SQLAlchemy URL (the driver is checked when the ledger opens)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    _text(name, raw)
    try:
        make_url(raw)
    except (ArgumentError, ValueError):
        raise Invalid(
            "not a SQLAlchemy URL",
            f"write for example {name}=postgresql+psycopg://user:password@host/reporter or sqlite:///var/reporter.db",
        ) from None
    return raw


def smtp_url(name: str, raw: str) -> str:
    """smtp://… or smtps://…, checked as the mailer will read it."""
    from reporter.mail import SmtpSettings

    _text(name, raw)
    SmtpSettings.from_url(raw)  # raises ConfigError with its own precise message
    return raw


BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "amqp", "amqps", "pyamqp")
"""Broker URLs reporter supports: Redis (the default, and what beat's lock and the rate limit use) or RabbitMQ."""


@dataclass(frozen=True)
class Option:
    """One environment variable: its Settings field, parser, default and meaning."""

    name: str
    field: str
    parse: Parser
    default: Any
    doc: str


OPTIONS: tuple[Option, ...] = (
    Option("REPORTER_CONFIG", "config_path", path, Path(defaults.CONFIG_PATH), "path to schedules.yaml"),
    Option("REPORTER_TEMPLATES", "templates_override", path, None, "templates folder (default: templates/ beside the config)"),
    Option("REPORTER_BROKER_URL", "broker_env", url(BROKER_SCHEMES, defaults.BROKER_URL), None, "Celery broker"),
    Option("REPORTER_DATABASE_URL", "database_url", database_url, defaults.DATABASE_URL, "SQLAlchemy URL of the ledger"),
    Option("REPORTER_SMTP_URL", "smtp_url", smtp_url, None, "SMTP server (default: the Maildir outbox)"),
    Option("REPORTER_OUTBOX", "outbox", path, Path(defaults.OUTBOX), "Maildir used when no SMTP URL is set"),
    Option("REPORTER_METRICS_PORT", "metrics_port", port(defaults.METRICS_PORT), None, "port of each worker's Prometheus endpoint"),
    Option("REPORTER_LOG_FORMAT", "log_format", choice("text", "json"), "text", "delivery log lines: text or json"),
    Option("REPORTER_VISIBILITY_TIMEOUT", "visibility_timeout", seconds(7200), None, "Redis' redelivery timeout in seconds"),
    Option(
        "REPORTER_RELOAD_INTERVAL",
        "reload_interval",
        seconds(defaults.RELOAD_INTERVAL),
        defaults.RELOAD_INTERVAL,
        "seconds between a process's looks at schedules.yaml and the templates for an edit",
    ),
    Option(
        "REPORTER_SWEEP_INTERVAL",
        "sweep_interval",
        seconds(defaults.SWEEP_INTERVAL),
        defaults.SWEEP_INTERVAL,
        "seconds between two runs of the sweep that re-enqueues lost and abandoned deliveries",
    ),
    Option(
        "REPORTER_SWEEP_GRACE",
        "sweep_grace",
        seconds(defaults.SWEEP_GRACE),
        defaults.SWEEP_GRACE,
        "seconds a delivery may stay queued past its slot before the sweep takes its task for lost",
    ),
    Option(
        "REPORTER_CLAIM_MARGIN",
        "claim_margin",
        seconds(defaults.CLAIM_MARGIN),
        defaults.CLAIM_MARGIN,
        "seconds past the hard time limit before a send's claim counts as abandoned by a killed process",
    ),
    Option("FLOWER_PORT", "flower_port", port(defaults.FLOWER_PORT), defaults.FLOWER_PORT, "Flower's port (Flower reads it too)"),
)
"""Every variable reporter reads. Each may instead name a file holding the value: NAME_FILE."""

IGNORED_PREFIXES = ("REPORTER_TEST_",)
"""REPORTER_* names that are not settings: the test suite's own (REPORTER_TEST_PG_URL)."""


def _raw(environ: Mapping[str, str], name: str) -> str | None:
    """NAME, or the contents of the file named by NAME_FILE (for Docker/Kubernetes secrets); None if unset or empty."""
    value = environ.get(name)
    if value:
        return value
    file_name = environ.get(f"{name}_FILE")
    if file_name:
        try:
            # A secrets file normally ends with a newline: that is not part of the value.
            return Path(file_name).read_text().strip()
        except OSError as exc:
            why = f"cannot read {file_name}: {exc.strerror or type(exc).__name__}; fix the path or set {name} instead"
            raise ConfigError([Problem(f"{name}_FILE", None, "", why)]) from None
    return None


def shown(raw: str) -> str:
    """RAW as an error message may show it: passwords in URLs masked."""
    return repr(mask_url(raw) if "://" in raw or "@" in raw else raw)


def parse_environ(environ: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Every OPTIONS field parsed from ENVIRON, and warnings; raises ConfigError naming every bad variable."""
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    for option in OPTIONS:
        try:
            raw = _raw(environ, option.name)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        try:
            values[option.field] = option.default if raw is None else option.parse(option.name, raw)
        except Invalid as exc:
            problems.append(Problem(option.name, None, "", f"{exc.problem}: {exc.fix} (got {shown(raw or '')})"))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise SettingsError(problems)
    return values, unknown_names(environ)


def unknown_names(environ: Mapping[str, str]) -> list[str]:
    """A warning for each REPORTER_* variable that is no setting, with a did-you-mean."""
    known = [o.name for o in OPTIONS]
    known_all = set(known) | {f"{n}_FILE" for n in known}
    out = []
    for name in sorted(environ):
        if name.startswith("REPORTER_") and name not in known_all and not name.startswith(IGNORED_PREFIXES):
            # Compared without the shared prefix, which would make every name look alike.
            stems = [n.removeprefix("REPORTER_") for n in known if n.startswith("REPORTER_")]
            close = difflib.get_close_matches(name.removeprefix("REPORTER_").removesuffix("_FILE"), stems, n=1)
            hint = f"; did you mean REPORTER_{close[0]}{'_FILE' if name.endswith('_FILE') else ''}?" if close else ""
            out.append(f"{name} is not a reporter setting and is ignored{hint}")
    return out


BrokerOrigin = Literal["env", "run", "default", "stale"]


@dataclass(frozen=True)
class Broker:
    """The broker every command and process uses, and where that choice came from."""

    url: str | None
    """None only when var/broker.url was left by a `reporter run` that has stopped."""
    origin: BrokerOrigin
    """'env' (REPORTER_BROKER_URL), 'run' (a live `reporter run` here), 'default', or 'stale'."""
    pid: int | None = None
    """The live run's PID, or the dead run's for 'stale' (when known)."""

    @property
    def shared(self) -> bool:
        """True when workers are known to use this broker, so `send --sync` should share its rate limit."""
        return self.origin in ("env", "run")

    def require(self) -> str:
        """The URL; raises BrokerUnavailable, saying what to do, when there is none."""
        if self.url is None:
            pid = f" (pid {self.pid})" if self.pid else ""
            raise BrokerUnavailable(
                f"no `reporter run` is running in this folder: the one{pid} that wrote {Path(defaults.VAR_DIR) / runstate.MARKER_NAME} "
                "has stopped. Start `reporter run` again, set REPORTER_BROKER_URL, or delete that file to use the default "
                f"broker {defaults.BROKER_URL}"
            )
        return self.url

    def advice(self) -> str:
        """What to do when this broker does not answer, by where it came from."""
        return {
            "env": "check that it is running and that REPORTER_BROKER_URL is right",
            "run": f"the `reporter run` here (pid {self.pid or '?'}) is up but its Redis does not answer; see var/redis.log",
            "default": "no `reporter run` is running here and REPORTER_BROKER_URL is not set: start `reporter run` in another "
            "terminal, or set REPORTER_BROKER_URL to your broker",
            "stale": "start `reporter run` again, or set REPORTER_BROKER_URL",
        }[self.origin]

    def unreachable(self, error: object) -> str:
        """The message for a broker that does not answer: which one, why, and what to do."""
        return f"cannot reach the broker at {mask_url(self.url or '')} ({error}); {self.advice()}"


def resolve_broker(env_url: str | None, var_dir: Path) -> Broker:
    """The one rule: REPORTER_BROKER_URL, else the live `reporter run`'s Redis (var/broker.url), else
    defaults.BROKER_URL. A var/broker.url whose run has stopped gives no broker, so nothing is blamed
    on a Redis that went with it."""
    if env_url:
        return Broker(env_url, "env")
    marker = runstate.read_marker(var_dir)
    if marker is not None:
        if marker.live:
            return Broker(marker.url, "run", marker.pid)
        return Broker(None, "stale", marker.last_pid)
    return Broker(defaults.BROKER_URL, "default")


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
    broker: Broker
    database_url: str
    smtp_url: str | None
    outbox: Path
    var_dir: Path
    variables: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    """What `${VAR}` in schedules.yaml may name: the environment this process started with. Kept out of
    repr, as it holds secrets; child processes get theirs from child_environ()."""
    log_format: str = "text"
    """REPORTER_LOG_FORMAT: text, or json for one JSON object per delivery log line."""
    metrics_port: int | None = None
    """REPORTER_METRICS_PORT: where workers serve Prometheus metrics (unset: no endpoint)."""
    visibility_timeout: int | None = None
    """REPORTER_VISIBILITY_TIMEOUT: Redis' redelivery timeout in seconds (unset: derived from the config)."""
    templates_override: Path | None = None
    """REPORTER_TEMPLATES, when set: used whichever config is chosen."""
    flower_port: int = defaults.FLOWER_PORT
    """FLOWER_PORT: where `reporter health flower` looks for Flower."""
    reload_interval: int = defaults.RELOAD_INTERVAL
    """REPORTER_RELOAD_INTERVAL: seconds between a process's looks at the config files for an edit."""
    sweep_interval: int = defaults.SWEEP_INTERVAL
    """REPORTER_SWEEP_INTERVAL: seconds between two runs of the sweep (beat's built-in entry)."""
    sweep_grace: int = defaults.SWEEP_GRACE
    """REPORTER_SWEEP_GRACE: seconds a row may stay queued past its slot before the sweep re-enqueues it."""
    claim_margin: int = defaults.CLAIM_MARGIN
    """REPORTER_CLAIM_MARGIN: seconds past the hard time limit before a claim is taken for abandoned."""
    warnings: tuple[str, ...] = field(default=(), compare=False)
    """Unknown REPORTER_* variables, each with a did-you-mean; the caller prints them."""

    @property
    def broker_url(self) -> str | None:
        """The broker's URL (None only for a stale var/broker.url); see Broker."""
        return self.broker.url

    @property
    def log_json(self) -> bool:
        return self.log_format == "json"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Parse every OPTIONS variable strictly; raises ConfigError naming each one that is malformed."""
        env = dict(os.environ if environ is None else environ)
        values, warnings = parse_environ(env)
        var_dir = Path(defaults.VAR_DIR)
        config_path: Path = values["config_path"]
        override: Path | None = values["templates_override"]
        return cls(
            config_path=config_path,
            templates_dir=override or config_path.parent / defaults.TEMPLATES_DIRNAME,
            broker=resolve_broker(values["broker_env"], var_dir),
            database_url=values["database_url"],
            smtp_url=values["smtp_url"],
            outbox=values["outbox"],
            var_dir=var_dir,
            variables=env,
            log_format=values["log_format"],
            metrics_port=values["metrics_port"],
            visibility_timeout=values["visibility_timeout"],
            templates_override=override,
            flower_port=values["flower_port"],
            reload_interval=values["reload_interval"],
            sweep_interval=values["sweep_interval"],
            sweep_grace=values["sweep_grace"],
            claim_margin=values["claim_margin"],
            warnings=tuple(warnings),
        )

    def with_config(self, config_path: Path) -> Settings:
        """These settings for another schedules.yaml (--config); its templates beside it unless REPORTER_TEMPLATES is set."""
        templates = self.templates_override or config_path.parent / defaults.TEMPLATES_DIRNAME
        return replace(self, config_path=config_path, templates_dir=templates)

    def child_environ(self, **overrides: str) -> dict[str, str]:
        """The environment for a child process (`reporter run`'s worker and beat): this process's, with OVERRIDES."""
        return {**self.variables, **overrides}

    @staticmethod
    def export(name: str, value: str) -> None:
        """Set NAME in this process's own environment, for children it forks or starts later to inherit
        (prometheus_client's multiprocess folder, which its library reads from the environment)."""
        os.environ[name] = value


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
