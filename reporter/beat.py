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
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from celery import beat, schedules
from redis.exceptions import RedisError

from reporter import defaults
from reporter.config import Config
from reporter.lock import RedisLock
from reporter.schedule import isoformat, latest_fire, next_fire
from reporter.settings import is_redis_url, redis_client_url

log = logging.getLogger(__name__)

DISPATCH_TASK = "email_reports.schedule_hourly"
SWEEP_TASK = "email_reports.sweep"


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


def builtin_entries(config: Config) -> dict[str, dict[str, Any]]:
    """Entries every deployment needs whether or not the YAML names them."""
    return {
        SWEEP_TASK: {
            "task": SWEEP_TASK,
            "schedule": CronSchedule("* * * * *", ZoneInfo("UTC")),
            "options": {"queue": defaults.QUEUE_SCHEDULED, "expires": 55},
        }
    }


def dispatcher_cron(config: Config) -> tuple[str, tzinfo] | None:
    """The cron (and zone) of the first beat entry that runs the dispatcher."""
    for entry in config.beat.values():
        if entry.task == DISPATCH_TASK:
            return entry.cron, ZoneInfo(entry.timezone or config.timezone)
    return None


class Scheduler(beat.Scheduler):
    """Celery's in-memory scheduler plus the YAML entries, led by one beat at a time.

    A beat sends nothing until it holds the leader lock in Redis; it renews the lock on every tick
    and writes a heartbeat. A second beat waits as a standby and takes over once the leader's lease
    runs out (it died, even by SIGKILL), starting with a dispatch that catches up what was missed.
    """

    _lock: RedisLock | None = None
    _leading = False
    _standby_logged = False

    def setup_schedule(self) -> None:
        from reporter.runtime import runtime

        super().setup_schedule()
        config = runtime().config
        self._merge(config)
        self.lock_timeout = config.defaults.beat_lock_timeout
        # Renew well within the lease, and tick often enough to notice a lost lock quickly.
        self.max_interval: float = min(float(self.max_interval), self.lock_timeout / 3)
        broker = str(self.app.conf.broker_url or "")
        if is_redis_url(broker):
            import redis

            client = redis.Redis.from_url(redis_client_url(broker), socket_timeout=5, socket_connect_timeout=5)
            self._lock = RedisLock(client, defaults.BEAT_LEADER_KEY, self.lock_timeout)
        else:
            log.warning("broker is not Redis: no leader lock, so run exactly one beat yourself")

    def _merge(self, config: Config) -> None:
        """Make the schedule the YAML crontab of CONFIG (entries it no longer has are dropped)."""
        self.merge_inplace({**builtin_entries(config), **entries(config)})
        self._heap = None
        for name, entry in self.schedule.items():
            log.info("beat entry %s: %s %r", name, entry.task, entry.schedule)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        self._follow()
        if not self._lead():
            return float(min(self.max_interval, self.lock_timeout / 3))
        return float(min(float(super().tick(*args, **kwargs)), self.max_interval))

    def _follow(self) -> None:
        """Apply an edited schedules.yaml: the crontab, and a dispatch for reports the current window lacks."""
        from reporter.live import newly_due
        from reporter.runtime import runtime

        rt = runtime()
        old = rt.config
        if not rt.live or not rt.live.refresh():
            return
        new = rt.config
        if entries(old) != entries(new):
            self._merge(new)
        added = newly_due(old, new)
        found = dispatcher_cron(new)
        if added and found and self._leading:
            # The dispatcher covered this window before these reports existed: cover the rest of it for
            # them now, so each is sent from its next slot rather than from the next window.
            now = datetime.now(UTC)
            kwargs = {"scheduled_for": isoformat(now), "window_end": isoformat(next_fire(found[0], found[1], now))}
            log.info("beat: dispatching %s for the rest of this window (%s to %s)", ", ".join(added), *kwargs.values())
            self.app.send_task(DISPATCH_TASK, kwargs={**kwargs, "reports": added, "config": new.version}, queue=defaults.QUEUE_SCHEDULED)

    def _lead(self) -> bool:
        """Keep or take the leadership; True if this beat may send now."""
        if self._lock is None:
            if not self._leading:
                self._become_leader()
            return True
        try:
            if self._leading and not self._lock.renew():
                log.error("beat lost the leader lock (another beat holds it now); standing by")
                self._leading = False
            if not self._leading:
                if not self._lock.acquire():
                    if not self._standby_logged:
                        log.info("beat standing by: %s leads", (self._lock.holder() or {}).get("id", "another beat"))
                        self._standby_logged = True
                    return False
                self._become_leader()
            self._lock.client.set(
                defaults.BEAT_TICK_KEY, json.dumps({"id": self._lock.owner, "at": datetime.now(UTC).isoformat(), **self._config_state()})
            )
            return True
        except RedisError as exc:
            # Without Redis we cannot know we still lead: send nothing until it answers again.
            if self._leading:
                log.error("beat cannot reach Redis to renew its lock (%s); pausing", exc)
            self._leading = False
            return False

    def _config_state(self) -> dict[str, Any]:
        """What `reporter status` shows of the configuration beat runs."""
        from reporter.runtime import runtime

        live = runtime().live
        if live is None:
            return {}
        return {
            "config": live.config.version,
            "config_since": live.since.isoformat(timespec="seconds"),
            "config_problems": [str(p) for p in live.problems],
        }

    def _become_leader(self) -> None:
        self._leading, self._standby_logged = True, False
        log.info("beat leads%s: dispatching once now to catch up on missed slots", f" as {self._lock.owner}" if self._lock else "")
        now = self.app.now()
        for entry in self.schedule.values():
            entry.last_run_at = now  # the catch-up dispatch covers the time this beat was not leading
        self._heap = None
        from reporter.runtime import runtime

        self.app.send_task(DISPATCH_TASK, kwargs={"config": runtime().config.version}, queue=defaults.QUEUE_SCHEDULED)

    def close(self) -> None:
        if self._lock is not None and self._leading:
            self._leading = False  # Celery may close a scheduler twice on the way out
            try:
                self._lock.release()
                log.info("beat released the leader lock")
            except RedisError:
                pass
        super().close()

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        if entry.task == DISPATCH_TASK and isinstance(entry.schedule, CronSchedule):
            # Tell the dispatcher which instant it stands for, so a late start covers the right window.
            sched = entry.schedule
            fired = latest_fire(sched.cron, sched.zone, datetime.now(UTC))
            entry = copy.copy(entry)
            from reporter.runtime import runtime

            entry.kwargs = {
                **entry.kwargs,
                "scheduled_for": isoformat(fired),
                "window_end": isoformat(next_fire(sched.cron, sched.zone, fired)),
                "config": runtime().config.version,
            }
        return super().apply_async(entry, producer, advance, **kwargs)
