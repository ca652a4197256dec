"""The per-process Runtime: settings, config, ledger, limiter and observers, built once per process.

Worker children get their own after the fork (database connections must not cross a fork), but keep
the configuration the parent ran: a child forked while schedules.yaml holds a broken edit still runs
the last good version (live.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from reporter import live as live_mod
from reporter import ratelimit
from reporter.config import Config
from reporter.ledger import Ledger
from reporter.mail import Transport, destination, transport
from reporter.observers import LogObserver, Observers
from reporter.ratelimit import Limiter
from reporter.render import Renderer
from reporter.settings import Settings


@dataclass
class Runtime:
    """What a process needs to send: settings, config, ledger, renderer, rate limiter, transport."""

    settings: Settings
    config: Config
    ledger: Ledger
    limiter: Limiter
    transport_factory: Callable[[], Transport] | None = None
    observers: Observers = field(default_factory=Observers)
    live: live_mod.Live | None = None
    """Follows edits of schedules.yaml (live.py); None: this runtime keeps the config it was built with."""

    def follow(self, version: str | None = None) -> Config:
        """Apply an edited configuration if the files hold a valid one; with VERSION (what a task was
        dispatched under), make sure the config is that version or a newer one. ConfigError if it cannot be had."""
        if self.live is not None:
            self.live.refresh()
            self.live.at_least(version)
        return self.config

    def use(self, config: Config) -> None:
        """Run CONFIG from now on; what was built from the previous one is built again on first use."""
        renderer = self.__dict__.pop("renderer", None)
        self.__dict__.pop("stale_after", None)
        self.config = config
        if renderer is not None:
            renderer.datasources.dispose()

    @cached_property
    def renderer(self) -> Renderer:
        return Renderer(self.config)

    def transport(self) -> Transport:
        if self.transport_factory is not None:
            return self.transport_factory()
        return transport(self.settings.smtp_url, self.settings.outbox)

    def time_limits(self, name: str) -> tuple[float, float]:
        """(soft, hard) seconds for one send of report NAME: the config's, plus the time its
        recipients wait for the rate limit, so a report is not cut off by its own limit."""
        report = self.config.reports[name]
        # One message per To address (or one for all), and one more when Cc/Bcc must go on their own.
        messages = (1 if report.group else len(report.recipients)) + (1 if report.cc or report.bcc else 0)
        waiting = messages / self.config.rate_of(report)
        d = self.config.defaults
        return d.soft_time_limit + waiting, d.time_limit + waiting

    @cached_property
    def stale_after(self) -> float:
        """Seconds after which another execution's claim is taken to be dead: longer than any send
        task may live (its hard limit) plus REPORTER_CLAIM_MARGIN, so the claim of a task that is still running is never taken."""
        hard = max((self.time_limits(name)[1] for name in self.config.reports), default=self.config.defaults.time_limit)
        return hard + self.settings.claim_margin


_cache: tuple[int, Runtime] | None = None
_inherited: Config | None = None


def build(settings: Settings, config: Config | None = None) -> Runtime:
    """A Runtime for SETTINGS that follows edits of the config; raises ConfigError if the config
    (CONFIG, or the files when None) is invalid."""
    inherited = config is not None
    config = config or live_mod.load_checked(settings)
    destination(settings.smtp_url, settings.outbox)  # refuse a malformed REPORTER_SMTP_URL now, not on every send
    observers = Observers([LogObserver(as_json=settings.log_json)])
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
        on_state=lambda version, problems: rt.observers.configured(version, problems),
        loaded=not inherited,
    )
    rt.observers.configured(config.version, 0)
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
