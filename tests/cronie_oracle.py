"""An independent oracle for cron fire times: cronie's main loop, simulated one minute at a time.

This is a transliteration of cronie's `cron.c` (the `while (TRUE)` loop and `find_jobs`) for one job,
with its own small field parser, so it shares no code with reporter.cron or reporter.schedule and none
with croniter. It is slow (one step per real minute) and only meant for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

_SHORTCUTS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_MONTHS = tuple("jan feb mar apr may jun jul aug sep oct nov dec".split())
_DAYS = tuple("sun mon tue wed thu fri sat".split())
_MINUTE = timedelta(minutes=1)
_EPOCH = datetime(1970, 1, 1)


def _number(text: str, names: tuple[str, ...], first: int) -> int:
    return int(text) if text.isdigit() else names.index(text.lower()) + first


def _bits(field: str, low: int, high: int, names: tuple[str, ...] = (), first: int = 0) -> set[int]:
    bits: set[int] = set()
    for item in field.split(","):
        span, _, step = item.partition("/")
        if span == "*":
            a, b = low, high
        elif "-" in span:
            a, b = (_number(x, names, first) for x in span.split("-"))
        else:
            a = b = _number(span, names, first)
        bits.update(range(a, b + 1, int(step) if step else 1))
    return bits


@dataclass
class Job:
    """One crontab entry as cronie's `entry` struct holds it: bit sets and the *_STAR flags."""

    minute: set[int]
    hour: set[int]
    dom: set[int]
    month: set[int]
    dow: set[int]
    min_star: bool
    hr_star: bool
    dom_star: bool
    dow_star: bool

    @classmethod
    def parse(cls, cron: str) -> Job:
        text = _SHORTCUTS.get(cron.strip(), cron)
        f = text.split()
        dow = _bits(f[4], 0, 7, _DAYS)
        if 0 in dow or 7 in dow:
            dow |= {0, 7}
        return cls(
            _bits(f[0], 0, 59),
            _bits(f[1], 0, 23),
            _bits(f[2], 1, 31),
            _bits(f[3], 1, 12, _MONTHS, 1),
            dow,
            f[0][0] == "*",
            f[1][0] == "*",
            f[2][0] == "*",
            f[4][0] == "*",
        )

    def matches(self, wall_minute: int) -> bool:
        """find_jobs' test for one job, on a wall-clock minute number (minutes since 1970 in local time)."""
        tm = _EPOCH + wall_minute * _MINUTE
        days_ok = (
            (tm.isoweekday() % 7 in self.dow and tm.day in self.dom)
            if self.dom_star or self.dow_star
            else (tm.isoweekday() % 7 in self.dow or tm.day in self.dom)
        )
        return tm.minute in self.minute and tm.hour in self.hour and tm.month in self.month and days_ok

    @property
    def wild(self) -> bool:
        return self.min_star or self.hr_star


def _clock(at: datetime, zone: tzinfo) -> int:
    """cronie's clockTime: the wall clock of ZONE at AT, in whole minutes since 1970."""
    local = at.astimezone(zone)
    offset = local.utcoffset()
    assert offset is not None
    return int((at.timestamp() + offset.total_seconds()) // 60)


def cronie_fires(cron: str, zone: tzinfo, start: datetime, end: datetime) -> list[datetime]:
    """The minutes in [START, END) (UTC, whole minutes) in which cronie would start CRON's job.

    cronie starts at START - 1 minute (it runs nothing for the minute it starts in), so START should be
    well away from a clock change.
    """
    job = Job.parse(cron)
    at = start.replace(second=0, microsecond=0)
    virtual_time = time_running = _clock(at - _MINUTE, zone)
    fires: list[datetime] = []
    while at < end:
        clock_time = _clock(at, zone)
        if clock_time == time_running:  # cron_sleep until the wall minute changes
            at += _MINUTE
            continue
        time_running = clock_time
        diff = time_running - virtual_time
        runs = False
        if diff == 1:
            virtual_time = time_running
            runs = job.matches(virtual_time)
        elif diff > 3 * 60 or diff < -3 * 60:  # "large": clock jumped; run everything now
            virtual_time = time_running
            runs = job.matches(time_running)
        elif diff > 5:  # "medium": DST began; wildcard jobs now, fixed-time jobs for every minute missed
            runs = job.wild and job.matches(time_running)
            while virtual_time < time_running:
                virtual_time += 1
                runs |= not job.wild and job.matches(virtual_time)
        elif diff > 0:  # "small": woke up late; everything for every minute missed
            while virtual_time < time_running:
                virtual_time += 1
                runs |= job.matches(virtual_time)
        else:  # "negative": DST ended; wildcard jobs only until the clock catches up
            runs = job.wild and job.matches(time_running)
        if runs:
            fires.append(at)
        at += _MINUTE
    return fires
