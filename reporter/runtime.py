"""The per-process Runtime: settings, config, ledger and limiter, built once per process.

Worker children get their own after the fork (database connections must not cross a fork).
"""

from __future__ import annotations

import os

from reporter import config as config_mod
from reporter import ratelimit
from reporter.deliver import LogObserver, Observer, Runtime
from reporter.ledger import Ledger
from reporter.mail import destination
from reporter.settings import Settings

_cache: tuple[int, Runtime] | None = None


def build(settings: Settings) -> Runtime:
    """A Runtime for SETTINGS; raises ConfigError if the config is invalid."""
    config = config_mod.load(settings.config_path, settings.environ, settings.templates_dir)
    destination(settings.smtp_url, settings.outbox)  # refuse a malformed REPORTER_SMTP_URL now, not on every send
    observers: list[Observer] = [LogObserver(as_json=settings.log_json)]
    if settings.metrics_port is not None:
        from reporter.metrics import PrometheusObserver

        observers.append(PrometheusObserver())
    return Runtime(
        settings=settings,
        config=config,
        ledger=Ledger.from_url(settings.database_url),
        limiter=ratelimit.for_broker(settings.broker_url),
        observers=observers,
    )


def runtime() -> Runtime:
    """This process's Runtime, built on first use."""
    global _cache
    if _cache is None or _cache[0] != os.getpid():
        _cache = (os.getpid(), build(Settings.from_env()))
    return _cache[1]


def reset() -> None:
    """Forget this process's Runtime (after a fork, or in tests)."""
    global _cache
    _cache = None
