"""Celery beat fed from the YAML crontab (the `beat:` section of schedules.yaml).

The scheduler does not run a loop of its own: it subclasses Celery's and only decides what to send.
Each dispatcher entry is sent with the instant it was due and the end of the window it covers, and
when beat starts it sends one dispatch for "now", so a slot that fell due while beat was down (or
before its first tick) is caught up.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from celery import beat, schedules

from reporter import defaults
from reporter.config import Config
from reporter.lock import Lease, RedisLock
from reporter.schedule import isoformat, latest_fire, next_fire, period
from reporter.settings import Settings, is_redis_url, mask_url, redis_client_url

log = logging.getLogger(__name__)


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class CronSchedule(schedules.BaseSchedule):
    """A Celery schedule from a cron string evaluated in ZONE by reporter.schedule, like every report's."""

    def __init__(self, cron: str, zone: tzinfo, app: Any = None) -> None:
        super().__init__(app=app)
        self.cron = cron
        self.zone = zone

    def now(self) -> datetime:
        return datetime.now(UTC)

    def remaining_estimate(self, last_run_at: datetime) -> Any:
        return next_fire(self.cron, self.zone, _aware(last_run_at)) - self.now()

    def is_due(self, last_run_at: datetime) -> schedules.schedstate:
        now = self.now()
        due_at = next_fire(self.cron, self.zone, _aware(last_run_at))
        if due_at <= now:
            return schedules.schedstate(True, (next_fire(self.cron, self.zone, now) - now).total_seconds())
        return schedules.schedstate(False, (due_at - now).total_seconds())

    def __repr__(self) -> str:
        return f"<cron {self.cron!r} {self.zone}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CronSchedule) and (self.cron, str(self.zone)) == (other.cron, str(other.zone))

    def __hash__(self) -> int:
        return hash((self.cron, str(self.zone)))

    def __reduce__(self) -> Any:
        return (self.__class__, (self.cron, self.zone))


def entries(config: Config) -> dict[str, dict[str, Any]]:
    """Celery beat_schedule entries for the config's `beat:` section."""
    return {
        name: {
            "task": entry.task,
            "schedule": CronSchedule(entry.cron, ZoneInfo(entry.timezone or config.timezone)),
            "options": {"queue": defaults.QUEUE_SCHEDULED},
        }
        for name, entry in config.beat.items()
    }


def builtin_entries(config: Config, sweep_interval: int = defaults.SWEEP_INTERVAL) -> dict[str, dict[str, Any]]:
    """Entries every deployment needs whether or not the YAML names them: the sweep, every
    SWEEP_INTERVAL seconds (REPORTER_SWEEP_INTERVAL; 60 runs it on the minute, as a cron)."""
    every: Any = (
        CronSchedule("* * * * *", ZoneInfo("UTC")) if sweep_interval == 60 else schedules.schedule(timedelta(seconds=sweep_interval))
    )
    return {
        defaults.TASK_SWEEP: {
            "task": defaults.TASK_SWEEP,
            "schedule": every,
            # A sweep not started before the next one is due is dropped: the next one does its work.
            "options": {"queue": defaults.QUEUE_SCHEDULED, "expires": max(1, sweep_interval * 55 // 60)},
        }
    }


def dispatcher_cron(config: Config) -> tuple[str, tzinfo] | None:
    """The cron (and zone) of the first beat entry that runs the dispatcher."""
    for entry in config.beat.values():
        if entry.task == defaults.TASK_DISPATCH:
            return entry.cron, ZoneInfo(entry.timezone or config.timezone)
    return None


def window_of(cron: str, zone: tzinfo, start: datetime) -> tuple[datetime, datetime]:
    """The window a dispatch at START covers: from START to the next fire of its CRON."""
    return start, next_fire(cron, zone, start)


def dispatch_window(config: Config, start: datetime) -> tuple[datetime, datetime]:
    """The window a dispatch at START covers under CONFIG: to its beat entry's next fire, or
    defaults.DISPATCH_WINDOW when no beat entry runs the dispatcher (called by hand)."""
    found = dispatcher_cron(config)
    if found is None:
        return start, start + timedelta(seconds=defaults.DISPATCH_WINDOW)
    return window_of(found[0], found[1], start)


def fired_window(cron: str, zone: tzinfo, now: datetime) -> tuple[datetime, datetime]:
    """The window of the dispatcher entry with CRON that is due at NOW: from its latest fire (the
    instant it stands for, even when beat sends it late) to the next."""
    return window_of(cron, zone, latest_fire(cron, zone, now))


def longest_eta(config: Config, now: datetime) -> int:
    """Seconds ahead the dispatcher may enqueue a send (its window's length, at least a minute), for
    Redis' visibility_timeout."""
    found = dispatcher_cron(config)
    if found is None:
        return defaults.DISPATCH_WINDOW
    return int(max(period(found[0], found[1], now).total_seconds(), 60))


class Leader:
    """Beat's leadership: the lease taken, renewed on every tick, and a heartbeat written while leading.

    The lease is a RedisLock with a Redis broker and a LedgerLease (a row in the ledger database) with
    any other; without a lease at all this beat always leads."""

    def __init__(self, lock: Lease | None, tick_key: str = defaults.BEAT_TICK_KEY, where: str = "Redis") -> None:
        self.lock = lock
        self.tick_key = tick_key
        self.where = where
        """Where the lease is kept, for the log."""
        self.leading = False
        self._standby_logged = False
        self._unreachable_logged = False

    def tick(self, state: Mapping[str, Any] | None = None) -> tuple[bool, bool]:
        """Keep or take the leadership: (this beat may send now, it has just become the leader). STATE
        goes into the heartbeat (what `reporter status` shows)."""
        if self.lock is None:
            became = not self.leading
            self.leading = True
            return True, became
        became = False
        try:
            if self.leading and not self.lock.renew():
                log.error("beat lost the leader lock (another beat holds it now); standing by")
                self.leading = False
            if not self.leading:
                if not self.lock.acquire():
                    if not self._standby_logged:
                        log.info("beat standing by: %s leads", (self.lock.holder() or {}).get("id", "another beat"))
                        self._standby_logged = True
                    self._unreachable_logged = False
                    return False, False
                self.leading, self._standby_logged, became = True, False, True
            self._unreachable_logged = False
            beat_ = {"id": self.lock.owner, "at": datetime.now(UTC).isoformat(), **(state or {})}
            self.lock.heartbeat(self.tick_key, json.dumps(beat_))
            return True, became
        except self.lock.unreachable as exc:
            # Without the lease's store we cannot know we still lead: send nothing until it answers again.
            if self.leading:
                log.error("beat cannot reach %s to renew its lock (%s); pausing", self.where, _first_line(exc))
            elif not self._unreachable_logged:
                log.warning("beat standing by: %s does not answer (%s); it takes the lead once it does", self.where, _first_line(exc))
            self._unreachable_logged = True
            self.leading = False
            return False, False

    def resign(self) -> None:
        """Give the lock up, if this beat holds it (on the way out)."""
        if self.lock is not None and self.leading:
            self.leading = False  # Celery may close a scheduler twice on the way out
            try:
                self.lock.release()
                log.info("beat released the leader lock")
            except self.lock.unreachable:
                pass


def _first_line(exc: BaseException) -> str:
    """The first line of a driver's error (SQLAlchemy's carry the SQL and a link below it)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def leader_lease(broker: str, database_url: str, timeout: float) -> tuple[Lease, str]:
    """The lease beat leads by under BROKER, and where it is kept: in Redis for a Redis broker (as
    before), in the ledger database at DATABASE_URL for any other (RabbitMQ has no lease of its own)."""
    if is_redis_url(broker):
        import redis

        client = redis.Redis.from_url(redis_client_url(broker), socket_timeout=5, socket_connect_timeout=5)
        return RedisLock(client, defaults.BEAT_LEADER_KEY, timeout), "Redis"
    from reporter.lease import LedgerLease

    return LedgerLease(defaults.BEAT_LEADER_KEY, timeout, url=database_url), f"the ledger database {mask_url(database_url)}"


class Scheduler(beat.Scheduler):
    """Celery's in-memory scheduler plus the YAML entries, led by one beat at a time.

    A beat sends nothing until it holds the leader lease (in Redis, or in the ledger database when the
    broker is not Redis); it renews the lock on every tick
    and writes a heartbeat. A second beat waits as a standby and takes over once the leader's lease
    runs out (it died, even by SIGKILL), starting with a dispatch that catches up what was missed.

    Beat needs only the configuration files and the broker: the ledger is used to record the
    configuration version it dispatches under (so workers can adopt it), and while the ledger database
    does not answer, beat says so once and tries again on later ticks.
    """

    _leader: Leader
    _live: Any = None
    _ledger: Any = None
    _recorded: str | None = None
    _unrecorded: str | None = None

    def setup_schedule(self) -> None:
        from reporter.app import beat_config, start_checks
        from reporter.live import Live

        super().setup_schedule()
        # Celery builds the scheduler before it sends beat_init: the start-up checks run here first.
        config = start_checks(self.app, beat_config(self.app))
        self._live = Live(self._settings(), config, ledger=None)
        self._merge(config)
        self.lock_timeout = config.defaults.beat_lock_timeout
        # Renew well within the lease, and tick often enough to notice a lost lock quickly.
        self.max_interval: float = min(float(self.max_interval), self.lock_timeout / 3)
        lock, where = leader_lease(str(self.app.conf.broker_url or ""), self._settings().database_url, self.lock_timeout)
        log.info("beat leader lease %s is kept in %s", defaults.BEAT_LEADER_KEY, where)
        self._leader = Leader(lock, where=where)

    def _settings(self) -> Settings:
        """The settings of the app (reporter.app.App) this beat runs."""
        settings: Settings = self.app.settings
        return settings

    @property
    def config(self) -> Config:
        """The configuration this beat runs."""
        return self._live.config  # type: ignore[no-any-return]

    def _merge(self, config: Config) -> None:
        """Make the schedule the YAML crontab of CONFIG (entries it no longer has are dropped)."""
        self.merge_inplace({**builtin_entries(config, self._settings().sweep_interval), **entries(config)})
        self._heap = None
        for name, entry in self.schedule.items():
            log.info("beat entry %s: %s %r", name, entry.task, entry.schedule)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        self._follow()
        leading = self._lead()
        self._record()
        if not leading:
            return float(min(self.max_interval, self.lock_timeout / 3))
        return float(min(float(super().tick(*args, **kwargs)), self.max_interval))

    def _follow(self) -> None:
        """Apply an edited schedules.yaml: the crontab, and a dispatch for reports the current window lacks."""
        from reporter.live import newly_due

        old = self.config
        if not self._live.refresh():
            return
        new = self.config
        if entries(old) != entries(new):
            self._merge(new)
        added = newly_due(old, new)
        if added and dispatcher_cron(new) and self._leader.leading:
            # The dispatcher covered this window before these reports existed: cover the rest of it for
            # them now, so each is sent from its next slot rather than from the next window.
            start, end = dispatch_window(new, datetime.now(UTC))
            kwargs = {"scheduled_for": isoformat(start), "window_end": isoformat(end)}
            log.info("beat: dispatching %s for the rest of this window (%s to %s)", ", ".join(added), *kwargs.values())
            self.app.send_task(
                defaults.TASK_DISPATCH, kwargs={**kwargs, "reports": added, "config": new.version}, queue=defaults.QUEUE_SCHEDULED
            )

    def _record(self) -> None:
        """Store the configuration version beat runs in the ledger, once; while the ledger database does
        not answer, say so once per version and try again next tick (beat schedules on meanwhile)."""
        from reporter.ledger import Ledger
        from reporter.live import content

        config = self.config
        if config.version == self._recorded:
            return
        url = self._settings().database_url
        try:
            if self._ledger is None:
                self._ledger = Ledger.from_url(url)
            self._ledger.remember_config(config.version, content(config))
        except Exception as exc:  # noqa: BLE001 - whatever the database driver raises, beat keeps scheduling
            if self._unrecorded != config.version:
                first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                log.error(
                    "beat: the ledger database %s does not answer (%s); scheduling goes on, and configuration %s is "
                    "recorded there once it answers (workers need it to adopt this version)",
                    mask_url(url),
                    first,
                    config.version,
                )
                self._unrecorded = config.version
            return
        if self._unrecorded is not None:
            log.info("beat: the ledger database answers again; configuration %s recorded", config.version)
        self._recorded, self._unrecorded = config.version, None

    def _lead(self) -> bool:
        """Keep or take the leadership; True if this beat may send now."""
        leading, became = self._leader.tick(self._config_state())
        if became:
            self._become_leader()
        return leading

    def _config_state(self) -> dict[str, Any]:
        """What `reporter status` shows of the configuration beat runs."""
        live = self._live
        return {
            "config": live.config.version,
            "config_since": live.since.isoformat(timespec="seconds"),
            "config_problems": [str(p) for p in live.problems],
        }

    def _become_leader(self) -> None:
        lock = self._leader.lock
        log.info("beat leads%s: dispatching once now to catch up on missed slots", f" as {lock.owner}" if lock else "")
        now = self.app.now()
        for entry in self.schedule.values():
            entry.last_run_at = now  # the catch-up dispatch covers the time this beat was not leading
        self._heap = None
        self.app.send_task(defaults.TASK_DISPATCH, kwargs={"config": self.config.version}, queue=defaults.QUEUE_SCHEDULED)

    def close(self) -> None:
        leader = getattr(self, "_leader", None)
        if leader is not None:
            leader.resign()
        super().close()

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        if entry.task == defaults.TASK_DISPATCH and isinstance(entry.schedule, CronSchedule):
            # Tell the dispatcher which instant it stands for, so a late start covers the right window.
            start, end = fired_window(entry.schedule.cron, entry.schedule.zone, datetime.now(UTC))
            entry = copy.copy(entry)
            entry.kwargs = {**entry.kwargs, "scheduled_for": isoformat(start), "window_end": isoformat(end), "config": self.config.version}
        return super().apply_async(entry, producer, advance, **kwargs)
