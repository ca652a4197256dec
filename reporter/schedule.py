"""Cron arithmetic: pure functions of (cron, zone, instants). Every instant returned is aware UTC.

Crons are evaluated in the report's own zone, so "0 7 * * 1-5" in Europe/Berlin is 07:00 Berlin time
in summer and in winter; slots are stored and compared in UTC.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, tzinfo

from croniter import croniter
from croniter.croniter import CroniterError

MAX_SLOTS = 100_000
"""Guard against a window that would yield an absurd number of slots."""


def cron_problem(expr: str) -> str | None:
    """Why EXPR is not a usable 5-field cron (or @hourly-style alias), or None if it is."""
    if not isinstance(expr, str) or not expr.strip():
        return "cron is empty"
    fields = expr.split()
    if not expr.startswith("@") and len(fields) != 5:
        return f"cron {expr!r} has {len(fields)} fields; expected 5 (minute hour day-of-month month day-of-week)"
    if expr.strip() == "@reboot":
        return "@reboot is not a schedule"
    try:
        if not croniter.is_valid(expr):
            return f"invalid cron {expr!r}"
        croniter(expr, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except (CroniterError, ValueError, KeyError) as exc:
        return f"invalid cron {expr!r}: {exc}"
    return None


def _local(at: datetime, zone: tzinfo) -> datetime:
    if at.tzinfo is None:
        raise ValueError(f"naive datetime {at!r}: pass an aware datetime")
    return at.astimezone(zone)


def _repeated_hour(local: datetime, zone: tzinfo) -> bool:
    """True for the second pass through a wall-clock time that a DST fall-back repeats."""
    naive = local.replace(tzinfo=None)
    first, second = naive.replace(fold=0, tzinfo=zone), naive.replace(fold=1, tzinfo=zone)
    return first.utcoffset() != second.utcoffset() and local.utcoffset() == second.utcoffset()


def iter_fires(expr: str, zone: tzinfo, after: datetime) -> Iterator[datetime]:
    """Fire times strictly after AFTER, in UTC, forever.

    Like cron itself on a DST fall-back: a job with a fixed hour runs once, in the first pass through
    the repeated hour; a job whose hour field is a wildcard or a step runs in both passes.
    """
    fixed_hour = not expr.startswith("@") and not expr.split()[1].startswith("*")
    if expr.strip() in ("@daily", "@midnight", "@weekly", "@monthly", "@yearly", "@annually"):
        fixed_hour = True
    it = croniter(expr, _local(after, zone))
    while True:
        local = it.get_next(datetime)
        fire = local.astimezone(UTC)
        if fixed_hour and _repeated_hour(local, zone):
            continue
        if fire > after:
            yield fire


def next_fire(expr: str, zone: tzinfo, after: datetime) -> datetime:
    """The first fire time strictly after AFTER."""
    return next(iter_fires(expr, zone, after))


def next_fires(expr: str, zone: tzinfo, after: datetime, n: int) -> list[datetime]:
    """The next N fire times strictly after AFTER."""
    it = iter_fires(expr, zone, after)
    return [next(it) for _ in range(n)]


def latest_fire(expr: str, zone: tzinfo, at: datetime) -> datetime:
    """The last fire time at or before AT."""
    it = croniter(expr, _local(at + timedelta(seconds=1), zone))
    while True:
        fire: datetime = it.get_prev(datetime).astimezone(UTC)
        if fire <= at:
            return fire


def slots_between(expr: str, zone: tzinfo, start: datetime, end: datetime) -> list[datetime]:
    """Fire times in the half-open window [START, END)."""
    slots: list[datetime] = []
    for fire in iter_fires(expr, zone, start - timedelta(seconds=1)):
        if fire >= end:
            break
        if fire >= start:
            slots.append(fire)
        if len(slots) > MAX_SLOTS:
            raise ValueError(f"more than {MAX_SLOTS} slots of {expr!r} between {start} and {end}")
    return slots


def window(expr: str, zone: tzinfo, fired_at: datetime) -> tuple[datetime, datetime]:
    """The window a dispatcher fired at FIRED_AT covers: up to its own next fire time."""
    return fired_at, next_fire(expr, zone, fired_at)


def period(expr: str, zone: tzinfo, around: datetime) -> timedelta:
    """The gap between two consecutive fires after AROUND (an estimate of the cron's period)."""
    first, second = next_fires(expr, zone, around, 2)
    return second - first


def describe(expr: str) -> str:
    """The cron in words, e.g. 'At 07:00, Monday through Friday'."""
    try:
        from cron_descriptor import Options, get_description

        options = Options()
        options.use_24hour_time_format = True
        return str(get_description(expr, options))
    except Exception:  # noqa: BLE001 - words are a courtesy; the cron itself was validated
        return expr


def parse_instant(text: str, zone: tzinfo) -> datetime:
    """An ISO timestamp to aware UTC; a naive one is read in ZONE. ValueError if unreadable."""
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=zone)
    return value.astimezone(UTC)


def isoformat(at: datetime) -> str:
    """Canonical UTC text of an instant: '2026-11-21T07:00:00Z'. Used in task arguments and keys."""
    return at.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
