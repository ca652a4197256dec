"""The per-process Runtime: settings, config, ledger and limiter, built once per process.

Worker children get their own after the fork (database connections must not cross a fork), but keep
the configuration the parent ran: a child forked while schedules.yaml holds a broken edit still runs
the last good version (live.py).
"""

from __future__ import annotations

import os

from reporter import live as live_mod
from reporter import ratelimit
from reporter.config import Config
from reporter.deliver import LogObserver, Observer, Runtime
from reporter.ledger import Ledger
from reporter.mail import destination
from reporter.settings import Settings

_cache: tuple[int, Runtime] | None = None
_inherited: Config | None = None


def build(settings: Settings, config: Config | None = None) -> Runtime:
    """A Runtime for SETTINGS that follows edits of the config; raises ConfigError if the config
    (CONFIG, or the files when None) is invalid."""
    inherited = config is not None
    config = config or live_mod.load_checked(settings)
    destination(settings.smtp_url, settings.outbox)  # refuse a malformed REPORTER_SMTP_URL now, not on every send
    observers: list[Observer] = [LogObserver(as_json=settings.log_json)]
    if settings.metrics_port is not None:
        from reporter.metrics import PrometheusObserver

        observers.append(PrometheusObserver())
    ledger = Ledger.from_url(settings.database_url)
    rt = Runtime(settings=settings, config=config, ledger=ledger, limiter=ratelimit.for_broker(settings.broker_url), observers=observers)

    rt.live = live_mod.Live(
        settings,
        config,
        ledger,
        on_change=lambda _old, new: rt.use(new),
        on_state=lambda version, problems: rt.tell("configured", version, problems),
        loaded=not inherited,
    )
    rt.tell("configured", config.version, 0)
    return rt


def runtime() -> Runtime:
    """This process's Runtime, built on first use."""
    global _cache
    if _cache is None or _cache[0] != os.getpid():
        inherited = _inherited if _cache is None else _cache[1].config
        _cache = (os.getpid(), build(Settings.from_env(), inherited))
    return _cache[1]


def reset(keep_config: bool = False) -> None:
    """Forget this process's Runtime (in tests); after a fork, KEEP_CONFIG keeps the parent's config."""
    global _cache, _inherited
    _inherited = _cache[1].config if keep_config and _cache is not None else None
    _cache = None
