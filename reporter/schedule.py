"""Cron arithmetic: pure functions of (cron, zone, instants). Every instant returned is aware UTC.

Fire times are exactly cronie's. A cron is evaluated on the wall clock of the report's own zone, so
"0 7 * * 1-5" in Europe/Berlin is 07:00 Berlin time in summer and in winter; slots are stored and
compared in UTC. Where the wall clock jumps, cronie's rule (its main loop in cron.c) applies:

- clocks go back: a fixed-time job runs once, in the first pass; a wildcard job (minute or hour field
  starts with '*') runs in both passes;
- clocks go forward: a fixed-time job whose time was skipped runs once, at the jump; a wildcard job's
  skipped times are skipped.

cronie's two rarer cases are kept too: a forward jump of 4 minutes or less runs every skipped job at
the jump, and a jump of 3 hours or more (either way) is a clock reset: nothing skipped runs, and every
job runs in both passes of a repeated interval.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, tzinfo

from reporter.cron import Cron, CronError, parse

MAX_SLOTS = 100_000
"""Guard against a window that would yield an absurd number of slots."""

SMALL_JUMP = timedelta(minutes=4)
"""cronie runs every job of a forward jump this short at the jump (its 'small' wake-up: up to 5 minutes late)."""

CLOCK_RESET = timedelta(minutes=180)
"""cronie treats a forward jump of this much or more as a reset: skipped times are skipped for every job."""

CLOCK_RESET_BACK = timedelta(minutes=182)
"""... and a backward jump of this much or more: every job runs again in the repeated interval."""

_HOUR = timedelta(hours=1)
_DAY = timedelta(days=1)


def cron_problem(expr: str) -> str | None:
    """Why EXPR is not a cron that cronie accepts (5 fields or an @hourly-style shortcut), or None."""
    try:
        parse(expr)
    except CronError as exc:
        return str(exc)
    return None


def _local(at: datetime, zone: tzinfo) -> datetime:
    if at.tzinfo is None:
        raise ValueError(f"naive datetime {at!r}: pass an aware datetime")
    return at.astimezone(zone)


def _offsets(wall: datetime, zone: tzinfo) -> tuple[timedelta, timedelta]:
    """The UTC offsets of the first and second reading of a naive wall time (equal unless at a change)."""
    return _offset(wall.replace(tzinfo=zone)), _offset(wall.replace(tzinfo=zone, fold=1))


def _offset(local: datetime) -> timedelta:
    offset = local.utcoffset()
    assert offset is not None, f"{local!r} has no UTC offset"
    return offset


def _utc(naive_utc: datetime) -> datetime:
    return naive_utc.replace(tzinfo=UTC)


def _jump_instant(wall: datetime, before: timedelta, after: timedelta, zone: tzinfo) -> datetime:
    """The instant the clock jumped over WALL: the first instant on offset AFTER, found by bisection."""
    low, high = wall - after, wall - before  # low is still on BEFORE; high is already on AFTER
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        if _offset(_utc(middle).astimezone(zone)) == after:
            high = middle
        else:
            low = middle
    return _utc(high).replace(microsecond=0)


def _instants(cron: Cron, wall: datetime, zone: tzinfo) -> list[datetime]:
    """The instants at which cronie runs CRON for one matching wall time (0, 1 or 2 of them)."""
    first, second = _offsets(wall, zone)
    if first == second:
        return [_utc(wall - first)]
    if first > second:  # clocks went back: WALL happens twice, first on the larger offset
        if cron.wildcard or first - second >= CLOCK_RESET_BACK:
            return [_utc(wall - first), _utc(wall - second)]
        return [_utc(wall - first)]
    jump = second - first  # clocks went forward over WALL
    if jump >= CLOCK_RESET or (cron.wildcard and jump > SMALL_JUMP):
        return []
    return [_jump_instant(wall, first, second, zone)]


def _matching_hours(cron: Cron, begin: datetime) -> Iterator[datetime]:
    """Naive wall times of each matching hour on each matching day, from BEGIN (an hour) on."""
    day: date = begin.date()
    while True:
        if day.month not in cron.months:
            day = (day.replace(day=1) + timedelta(days=32)).replace(day=1)
            continue
        if cron.matches_day(day):
            for hour in cron.hours:
                if day > begin.date() or hour >= begin.hour:
                    yield datetime(day.year, day.month, day.day, hour)
        day += _DAY


def _fires(cron: Cron, zone: tzinfo, begin: datetime) -> Iterator[datetime]:
    """Every fire instant of matching wall times from BEGIN on, ascending and once each.

    Wall order is not instant order in a repeated interval, so instants wait in a heap until no later
    wall time can produce an earlier instant: any instant of a wall time W or later is at or after W
    read on the larger of its two offsets.
    """
    pending: list[datetime] = []
    last: datetime | None = None
    for hour in _matching_hours(cron, begin):
        floor = _utc(hour - max(_offsets(hour, zone)))
        while pending and pending[0] < floor:
            fire = heapq.heappop(pending)
            if fire != last:
                last = fire
                yield fire
        for minute in cron.minutes:
            for fire in _instants(cron, hour.replace(minute=minute), zone):
                heapq.heappush(pending, fire)


def _begin(at: datetime, zone: tzinfo) -> datetime:
    """The wall hour to start generating from so that no fire after AT is missed.

    A fire after AT has an earlier wall time than AT only if the clock goes back in between, by at
    most the offset's drop over the next day (sampled hourly: offsets never change twice in an hour).
    """
    local = _local(at, zone)
    offset = _offset(local)
    lowest = min(_offset((at + i * _HOUR).astimezone(zone)) for i in range(1, 26))
    wall = local.replace(tzinfo=None) - max(timedelta(0), offset - lowest)
    return wall.replace(minute=0, second=0, microsecond=0)


def _fires_after(expr: str, zone: tzinfo, after: datetime, *, inclusive: bool = False) -> Iterator[datetime]:
    # A fire exactly at a forward jump comes from wall times before it: start from just before AFTER.
    begin = _begin(after - timedelta(microseconds=1) if inclusive else after, zone)
    for fire in _fires(parse(expr), zone, begin):
        if fire > after or (inclusive and fire == after):
            yield fire


def iter_fires(expr: str, zone: tzinfo, after: datetime) -> Iterator[datetime]:
    """Fire times strictly after AFTER, in UTC, forever: cronie's, DST changes included (see module doc)."""
    return _fires_after(expr, zone, after)


def next_fire(expr: str, zone: tzinfo, after: datetime) -> datetime:
    """The first fire time strictly after AFTER."""
    return next(iter_fires(expr, zone, after))


def next_fires(expr: str, zone: tzinfo, after: datetime, n: int) -> list[datetime]:
    """The next N fire times strictly after AFTER."""
    it = iter_fires(expr, zone, after)
    return [next(it) for _ in range(n)]


_LOOK_BACK = (_HOUR, _DAY, timedelta(days=32), timedelta(days=367), timedelta(days=366 * 29), timedelta(days=366 * 401))
"""How far latest_fire looks back, widening: any cron that parses fires within 400 years."""


def latest_fire(expr: str, zone: tzinfo, at: datetime) -> datetime:
    """The last fire time at or before AT (the same instants iter_fires yields)."""
    for back in _LOOK_BACK:
        latest: datetime | None = None
        for fire in _fires_after(expr, zone, at - back):
            if fire > at:
                break
            latest = fire
        if latest is not None:
            return latest
    raise ValueError(f"cron {expr!r} has no fire time before {at}")


def slots_between(expr: str, zone: tzinfo, start: datetime, end: datetime) -> list[datetime]:
    """Fire times in the half-open window [START, END)."""
    slots: list[datetime] = []
    for fire in _fires_after(expr, zone, start, inclusive=True):
        if fire >= end:
            break
        slots.append(fire)
        if len(slots) > MAX_SLOTS:
            raise ValueError(f"more than {MAX_SLOTS} slots of {expr!r} between {start} and {end}")
    return slots


_QUIET: dict[tuple[str, tzinfo], tuple[datetime, datetime]] = {}
"""(cron, zone) -> (FROM, FIRE): the cron does not fire in [FROM, FIRE), and fires at FIRE."""

_QUIET_MAX = 100_000
"""Entries kept at most (one per distinct cron and zone in use; a config has far fewer)."""


def slots_in(expr: str, zone: tzinfo, start: datetime, end: datetime) -> list[datetime]:
    """`slots_between`, remembering each (cron, zone)'s next fire: a dispatcher that asks about the
    same yearly or daily cron every minute computes its next fire once, not on every dispatch.

    Fire times are a pure function of (cron, zone), so the memo never goes stale: an edited config
    with another cron or zone asks under another key.
    """
    key = (expr, zone)
    quiet = _QUIET.get(key)
    if quiet is not None and quiet[0] <= start and end <= quiet[1]:
        return []
    slots = slots_between(expr, zone, start, end)
    if len(_QUIET) >= _QUIET_MAX:
        _QUIET.clear()
    if slots:
        _QUIET[key] = (start, slots[0])
    else:
        # The first fire at or after END (next_fire is strictly after its argument).
        _QUIET[key] = (start, next_fire(expr, zone, end - timedelta(microseconds=1)))
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
        words = str(get_description(expr, options))
    except Exception:  # noqa: BLE001 - words are a courtesy; the cron itself was validated
        return expr
    return _day_rule_in_words(expr, words)


def _day_rule_in_words(expr: str, words: str) -> str:
    """cron_descriptor always says 'or' between the two day fields; cronie says 'and' after a '*'."""
    fields = expr.split()
    if len(fields) != 5 or fields[2] == "*" or fields[4] == "*":
        return words  # at most one day field restricts the days: nothing to explain
    if fields[2].startswith("*") or fields[4].startswith("*"):
        return words.replace(", or on ", ", and only on ") if ", or on " in words else f"{words} (both day fields must match)"
    return words if ", or " in words else f"{words} (either day field may match)"


def parse_instant(text: str, zone: tzinfo) -> datetime:
    """An ISO timestamp to aware UTC; a naive one is read in ZONE. ValueError if unreadable."""
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=zone)
    return value.astimezone(UTC)


def isoformat(at: datetime) -> str:
    """Canonical UTC text of an instant: '2026-11-21T07:00:00Z'. Used in task arguments and keys."""
    return at.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
