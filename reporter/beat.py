"""Celery beat fed from the YAML crontab (the `beat:` section of schedules.yaml).

The scheduler does not run a loop of its own: it subclasses Celery's and only decides what to send.
Each dispatcher entry is sent with the instant it was due and the end of the window it covers, and
when beat starts it sends one dispatch for "now", so a slot that fell due while beat was down (or
before its first tick) is caught up.
"""

from __future__ import annotations

import copy
import logging
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from celery import beat, schedules

from reporter import defaults
from reporter.config import Config
from reporter.schedule import isoformat, latest_fire, next_fire

log = logging.getLogger(__name__)

DISPATCH_TASK = "email_reports.schedule_hourly"


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


class CronSchedule(schedules.BaseSchedule):
    """A Celery schedule from a cron string evaluated in ZONE by croniter, like every report's."""

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


def dispatcher_cron(config: Config) -> tuple[str, tzinfo] | None:
    """The cron (and zone) of the first beat entry that runs the dispatcher."""
    for entry in config.beat.values():
        if entry.task == DISPATCH_TASK:
            return entry.cron, ZoneInfo(entry.timezone or config.timezone)
    return None


class Scheduler(beat.Scheduler):
    """Celery's in-memory scheduler plus the YAML entries; the ledger keeps what must persist."""

    _started = False

    def setup_schedule(self) -> None:
        from reporter.runtime import runtime

        super().setup_schedule()
        self.merge_inplace(entries(runtime().config))
        for name, entry in self.schedule.items():
            log.info("beat entry %s: %s %r", name, entry.task, entry.schedule)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if not self._started:
            self._started = True
            log.info("beat started: dispatching once now to catch up on missed slots")
            self.app.send_task(DISPATCH_TASK, kwargs={}, queue=defaults.QUEUE_SCHEDULED)
        return float(super().tick(*args, **kwargs))

    def apply_async(self, entry: Any, producer: Any = None, advance: bool = True, **kwargs: Any) -> Any:
        if entry.task == DISPATCH_TASK and isinstance(entry.schedule, CronSchedule):
            # Tell the dispatcher which instant it stands for, so a late start covers the right window.
            sched = entry.schedule
            fired = latest_fire(sched.cron, sched.zone, datetime.now(UTC))
            entry = copy.copy(entry)
            entry.kwargs = {
                **entry.kwargs,
                "scheduled_for": isoformat(fired),
                "window_end": isoformat(next_fire(sched.cron, sched.zone, fired)),
            }
        return super().apply_async(entry, producer, advance, **kwargs)
