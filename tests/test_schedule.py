"""Table tests for the pure cron arithmetic in reporter.schedule.

Every instant is aware UTC. Reference dates used below:

- 2026-01-09 is a Friday (winter: Berlin = UTC+1, New York = UTC-5);
- 2026-07-10 is a Friday (summer: Berlin = UTC+2, New York = UTC-4);
- Europe/Berlin springs forward on Sunday 2026-03-29 (02:00 CET -> 03:00 CEST, at 01:00 UTC)
  and falls back on Sunday 2026-10-25 (03:00 CEST -> 02:00 CET, at 01:00 UTC);
- America/New_York springs forward on Sunday 2026-03-08 (02:00 EST -> 03:00 EDT, at 07:00 UTC)
  and falls back on Sunday 2026-11-01 (02:00 EDT -> 01:00 EST, at 06:00 UTC).
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reporter.schedule import (
    cron_problem,
    describe,
    isoformat,
    latest_fire,
    next_fire,
    next_fires,
    parse_instant,
    slots_between,
    window,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def u(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, microsecond: int = 0) -> datetime:
    """An aware UTC datetime."""
    return datetime(year, month, day, hour, minute, second, microsecond, tzinfo=UTC)


def local_dates(slots: list[datetime], zone: tzinfo) -> Counter[date]:
    """How many slots fall on each local calendar day."""
    return Counter(s.astimezone(zone).date() for s in slots)


# --------------------------------------------------------------------------- slots_between

SLOTS = [
    # id, cron, zone, start, end, expected
    ("daily-start-is-inclusive", "0 7 * * *", UTC, u(2026, 1, 1, 7), u(2026, 1, 2, 7), [u(2026, 1, 1, 7)]),
    ("daily-end-is-exclusive", "0 7 * * *", UTC, u(2026, 1, 1, 6), u(2026, 1, 1, 7), []),
    ("daily-three-days", "0 7 * * *", UTC, u(2026, 1, 1), u(2026, 1, 4), [u(2026, 1, 1, 7), u(2026, 1, 2, 7), u(2026, 1, 3, 7)]),
    ("empty-window", "* * * * *", UTC, u(2026, 1, 1, 12), u(2026, 1, 1, 12), []),
    ("end-before-start", "* * * * *", UTC, u(2026, 1, 1, 12), u(2026, 1, 1, 11), []),
    # The shipped example: 07:00 Berlin on weekdays is 06:00 UTC in winter ...
    ("berlin-weekdays-winter", "0 7 * * 1-5", BERLIN, u(2026, 1, 9), u(2026, 1, 13), [u(2026, 1, 9, 6), u(2026, 1, 12, 6)]),
    # ... and 05:00 UTC in summer; Saturday and Sunday have no slot.
    ("berlin-weekdays-summer", "0 7 * * 1-5", BERLIN, u(2026, 7, 10), u(2026, 7, 14), [u(2026, 7, 10, 5), u(2026, 7, 13, 5)]),
    ("berlin-weekend-has-no-slot", "0 7 * * 1-5", BERLIN, u(2026, 1, 10), u(2026, 1, 12), []),
    # Friday before the spring change is still CET, Monday after is CEST.
    (
        "berlin-weekdays-across-spring-forward",
        "0 7 * * 1-5",
        BERLIN,
        u(2026, 3, 27),
        u(2026, 3, 31),
        [u(2026, 3, 27, 6), u(2026, 3, 30, 5)],
    ),
    ("berlin-weekdays-across-fall-back", "0 7 * * 1-5", BERLIN, u(2026, 10, 23), u(2026, 10, 27), [u(2026, 10, 23, 5), u(2026, 10, 26, 6)]),
    ("new-york-winter", "0 9 * * *", NEW_YORK, u(2026, 1, 9), u(2026, 1, 10), [u(2026, 1, 9, 14)]),
    ("new-york-summer", "0 9 * * *", NEW_YORK, u(2026, 7, 10), u(2026, 7, 11), [u(2026, 7, 10, 13)]),
    # The hourly dispatcher fired at 17:01 covers [17:01, 18:01).
    ("hourly-at-01-in-its-own-window", "1 * * * *", UTC, u(2026, 1, 1, 17, 1), u(2026, 1, 1, 18, 1), [u(2026, 1, 1, 17, 1)]),
    ("top-of-hour-in-hourly-window", "0 * * * *", UTC, u(2026, 1, 1, 17, 1), u(2026, 1, 1, 18, 1), [u(2026, 1, 1, 18)]),
    (
        "quarter-hours-in-hourly-window",
        "*/15 * * * *",
        UTC,
        u(2026, 1, 1, 17, 1),
        u(2026, 1, 1, 18, 1),
        [u(2026, 1, 1, 17, 15), u(2026, 1, 1, 17, 30), u(2026, 1, 1, 17, 45), u(2026, 1, 1, 18, 0)],
    ),
    ("minutely-one-minute", "* * * * *", UTC, u(2026, 1, 1, 17, 1), u(2026, 1, 1, 17, 2), [u(2026, 1, 1, 17, 1)]),
    (
        "minutely-five-minutes",
        "* * * * *",
        UTC,
        u(2026, 1, 1, 23, 58),
        u(2026, 1, 2, 0, 3),
        [u(2026, 1, 1, 23, 58), u(2026, 1, 1, 23, 59), u(2026, 1, 2, 0, 0), u(2026, 1, 2, 0, 1), u(2026, 1, 2, 0, 2)],
    ),
    ("minutely-start-mid-minute", "* * * * *", UTC, u(2026, 1, 1, 17, 1, 30), u(2026, 1, 1, 17, 3), [u(2026, 1, 1, 17, 2)]),
    ("start-one-second-after-fire", "0 7 * * *", UTC, u(2026, 1, 1, 7, 0, 1), u(2026, 1, 2, 6, 59, 59), []),
    ("alias-hourly", "@hourly", UTC, u(2026, 1, 1, 10), u(2026, 1, 1, 12), [u(2026, 1, 1, 10), u(2026, 1, 1, 11)]),
    ("leap-day-only", "0 0 29 2 *", UTC, u(2026, 1, 1), u(2029, 1, 1), [u(2028, 2, 29)]),
]


@pytest.mark.parametrize(("cron", "zone", "start", "end", "expected"), [c[1:] for c in SLOTS], ids=[c[0] for c in SLOTS])
def test_slots_between(cron: str, zone: tzinfo, start: datetime, end: datetime, expected: list[datetime]) -> None:
    slots = slots_between(cron, zone, start, end)
    assert slots == expected
    assert all(s.tzinfo is not None and s.utcoffset() == timedelta(0) for s in slots)


def test_slots_between_refuses_naive_datetimes() -> None:
    with pytest.raises(ValueError, match="naive"):
        slots_between("* * * * *", UTC, datetime(2026, 1, 1), datetime(2026, 1, 2))


# --------------------------------------------------------------------------- daylight saving time

# What the code does on a spring-forward day: a local time that does not exist (02:30) fires once,
# at the first instant after the gap (03:00 local daylight time), like Vixie cron runs skipped jobs
# right after the jump. It is never doubled and never dropped.
SPRING_FORWARD = [
    (
        "berlin-0230",
        "30 2 * * *",
        BERLIN,
        u(2026, 3, 27),
        u(2026, 3, 31),
        [u(2026, 3, 27, 1, 30), u(2026, 3, 28, 1, 30), u(2026, 3, 29, 1, 0), u(2026, 3, 30, 0, 30)],
    ),
    (
        "new-york-0230",
        "30 2 * * *",
        NEW_YORK,
        u(2026, 3, 6),
        u(2026, 3, 10),
        [u(2026, 3, 6, 7, 30), u(2026, 3, 7, 7, 30), u(2026, 3, 8, 7, 0), u(2026, 3, 9, 6, 30)],
    ),
]


@pytest.mark.parametrize(("cron", "zone", "start", "end", "expected"), [c[1:] for c in SPRING_FORWARD], ids=[c[0] for c in SPRING_FORWARD])
def test_spring_forward_nonexistent_time_fires_once(
    cron: str, zone: tzinfo, start: datetime, end: datetime, expected: list[datetime]
) -> None:
    slots = slots_between(cron, zone, start, end)
    assert slots == expected
    assert set(local_dates(slots, zone).values()) == {1}, "one slot per local day, none doubled on the change day"


# A daily job must run once per local day through both changes. On a fall-back day the local time
# 02:30 (Berlin) / 01:30 (New York) happens twice; a daily report is still sent once that day.
DAILY_THROUGH_DST = [
    ("berlin-spring-forward", "30 2 * * *", BERLIN, date(2026, 3, 26), 5),
    ("berlin-fall-back", "30 2 * * *", BERLIN, date(2026, 10, 22), 5),
    ("berlin-fall-back-0700", "0 7 * * *", BERLIN, date(2026, 10, 22), 5),
    ("new-york-spring-forward", "30 2 * * *", NEW_YORK, date(2026, 3, 5), 5),
    ("new-york-fall-back", "30 1 * * *", NEW_YORK, date(2026, 10, 29), 5),
]


@pytest.mark.parametrize(("cron", "zone", "first_day", "days"), [c[1:] for c in DAILY_THROUGH_DST], ids=[c[0] for c in DAILY_THROUGH_DST])
def test_daily_job_runs_once_per_local_day_through_dst(cron: str, zone: ZoneInfo, first_day: date, days: int) -> None:
    start = datetime.combine(first_day, datetime.min.time(), tzinfo=zone).astimezone(UTC)
    end = datetime.combine(first_day + timedelta(days=days), datetime.min.time(), tzinfo=zone).astimezone(UTC)
    slots = slots_between(cron, zone, start, end)
    per_day = local_dates(slots, zone)
    assert per_day == Counter({first_day + timedelta(days=i): 1 for i in range(days)}), slots


# Sub-daily crons follow real time: every real hour (half hour) exactly once, including the repeated
# hour of a fall-back day and excluding the hour that does not exist on a spring-forward day.
SUB_DAILY_THROUGH_DST = [
    ("berlin-hourly-spring", "0 * * * *", BERLIN, u(2026, 3, 28, 22), u(2026, 3, 29, 4), timedelta(hours=1)),
    ("berlin-hourly-fall", "0 * * * *", BERLIN, u(2026, 10, 24, 22), u(2026, 10, 25, 4), timedelta(hours=1)),
    ("berlin-half-hourly-fall", "*/30 * * * *", BERLIN, u(2026, 10, 24, 23), u(2026, 10, 25, 2), timedelta(minutes=30)),
    ("berlin-half-past-hourly-spring", "30 * * * *", BERLIN, u(2026, 3, 28, 22, 30), u(2026, 3, 29, 3, 30), timedelta(hours=1)),
    ("new-york-hourly-spring", "0 * * * *", NEW_YORK, u(2026, 3, 8, 4), u(2026, 3, 8, 10), timedelta(hours=1)),
    ("new-york-hourly-fall", "0 * * * *", NEW_YORK, u(2026, 11, 1, 3), u(2026, 11, 1, 9), timedelta(hours=1)),
]


@pytest.mark.parametrize(
    ("cron", "zone", "start", "end", "step"), [c[1:] for c in SUB_DAILY_THROUGH_DST], ids=[c[0] for c in SUB_DAILY_THROUGH_DST]
)
def test_sub_daily_cron_follows_real_time_through_dst(cron: str, zone: tzinfo, start: datetime, end: datetime, step: timedelta) -> None:
    slots = slots_between(cron, zone, start, end)
    expected = [start + i * step for i in range((end - start) // step)]
    assert slots == expected


# --------------------------------------------------------------------------- next_fire(s), latest_fire

NEXT = [
    ("strictly-after-a-fire", "0 7 * * *", UTC, u(2026, 1, 1, 7), u(2026, 1, 2, 7)),
    ("just-before-a-fire", "0 7 * * *", UTC, u(2026, 1, 1, 6, 59, 59), u(2026, 1, 1, 7)),
    ("hourly-at-01", "1 * * * *", UTC, u(2026, 1, 1, 17, 1), u(2026, 1, 1, 18, 1)),
    ("minutely", "* * * * *", UTC, u(2026, 1, 1, 17, 1), u(2026, 1, 1, 17, 2)),
    ("minutely-mid-minute", "* * * * *", UTC, u(2026, 1, 1, 17, 1, 30), u(2026, 1, 1, 17, 2)),
    ("berlin-friday-to-monday", "0 7 * * 1-5", BERLIN, u(2026, 1, 9, 6), u(2026, 1, 12, 6)),
    ("berlin-summer", "0 7 * * 1-5", BERLIN, u(2026, 7, 12), u(2026, 7, 13, 5)),
    ("year-end", "0 0 1 1 *", UTC, u(2026, 6, 1), u(2027, 1, 1)),
]


@pytest.mark.parametrize(("cron", "zone", "after", "expected"), [c[1:] for c in NEXT], ids=[c[0] for c in NEXT])
def test_next_fire(cron: str, zone: tzinfo, after: datetime, expected: datetime) -> None:
    assert next_fire(cron, zone, after) == expected


NEXT_N = [
    (
        "berlin-across-spring-forward",
        "0 7 * * 1-5",
        BERLIN,
        u(2026, 3, 26, 12),
        4,
        [u(2026, 3, 27, 6), u(2026, 3, 30, 5), u(2026, 3, 31, 5), u(2026, 4, 1, 5)],
    ),
    ("quarter-hours", "*/15 * * * *", UTC, u(2026, 1, 1, 23, 40), 3, [u(2026, 1, 1, 23, 45), u(2026, 1, 2), u(2026, 1, 2, 0, 15)]),
    ("none", "* * * * *", UTC, u(2026, 1, 1), 0, []),
]


@pytest.mark.parametrize(("cron", "zone", "after", "n", "expected"), [c[1:] for c in NEXT_N], ids=[c[0] for c in NEXT_N])
def test_next_fires(cron: str, zone: tzinfo, after: datetime, n: int, expected: list[datetime]) -> None:
    assert next_fires(cron, zone, after, n) == expected


def test_next_fire_refuses_naive_datetime() -> None:
    with pytest.raises(ValueError, match="naive"):
        next_fire("* * * * *", UTC, datetime(2026, 1, 1))


LATEST = [
    ("exactly-at-a-fire", "1 * * * *", UTC, u(2026, 1, 1, 17, 1), u(2026, 1, 1, 17, 1)),
    ("one-second-before", "1 * * * *", UTC, u(2026, 1, 1, 17, 0, 59), u(2026, 1, 1, 16, 1)),
    ("minutely-mid-minute", "* * * * *", UTC, u(2026, 1, 1, 17, 1, 30), u(2026, 1, 1, 17, 1)),
    ("berlin-sunday-to-friday", "0 7 * * 1-5", BERLIN, u(2026, 1, 11, 12), u(2026, 1, 9, 6)),
    ("berlin-spring-forward-day", "30 2 * * *", BERLIN, u(2026, 3, 29, 1, 15), u(2026, 3, 29, 1, 0)),
]


@pytest.mark.parametrize(("cron", "zone", "at", "expected"), [c[1:] for c in LATEST], ids=[c[0] for c in LATEST])
def test_latest_fire(cron: str, zone: tzinfo, at: datetime, expected: datetime) -> None:
    assert latest_fire(cron, zone, at) == expected


# --------------------------------------------------------------------------- window

WINDOWS = [
    ("hourly-dispatcher-at-1701", "1 * * * *", UTC, u(2026, 1, 1, 17, 1), (u(2026, 1, 1, 17, 1), u(2026, 1, 1, 18, 1))),
    ("minutely-dispatcher", "* * * * *", UTC, u(2026, 1, 1, 17, 1), (u(2026, 1, 1, 17, 1), u(2026, 1, 1, 17, 2))),
    ("quarter-hourly-dispatcher", "*/15 * * * *", UTC, u(2026, 1, 1, 3, 30), (u(2026, 1, 1, 3, 30), u(2026, 1, 1, 3, 45))),
    ("daily-dispatcher", "30 3 * * *", UTC, u(2026, 1, 1, 3, 30), (u(2026, 1, 1, 3, 30), u(2026, 1, 2, 3, 30))),
    # In Berlin the hourly window over the spring-forward jump is still one real hour.
    ("berlin-hourly-spring-forward", "1 * * * *", BERLIN, u(2026, 3, 29, 0, 1), (u(2026, 3, 29, 0, 1), u(2026, 3, 29, 1, 1))),
    ("berlin-hourly-fall-back", "1 * * * *", BERLIN, u(2026, 10, 25, 0, 1), (u(2026, 10, 25, 0, 1), u(2026, 10, 25, 1, 1))),
]


@pytest.mark.parametrize(("cron", "zone", "fired_at", "expected"), [c[1:] for c in WINDOWS], ids=[c[0] for c in WINDOWS])
def test_window(cron: str, zone: tzinfo, fired_at: datetime, expected: tuple[datetime, datetime]) -> None:
    assert window(cron, zone, fired_at) == expected


def test_consecutive_hourly_windows_cover_each_minutely_slot_exactly_once() -> None:
    """Dispatcher windows tile time: every slot of a report lands in exactly one window."""
    fired = u(2026, 1, 1, 17, 1)
    seen: list[datetime] = []
    for _ in range(3):
        start, end = window("1 * * * *", UTC, fired)
        seen += slots_between("* * * * *", UTC, start, end)
        fired = end
    assert seen == [u(2026, 1, 1, 17, 1) + timedelta(minutes=i) for i in range(180)]


CRONS = ["* * * * *", "*/15 * * * *", "1 * * * *", "30 2 * * *", "0 7 * * 1-5", "30 1 * * *", "0 0 1 * *"]
ZONES = [UTC, BERLIN, NEW_YORK]
# Instants around the 2026 DST changes of both zones, to the second.
instants = st.integers(min_value=int(u(2026, 3, 5).timestamp()), max_value=int(u(2026, 3, 5).timestamp()) + 3 * 24 * 3600) | st.integers(
    min_value=int(u(2026, 10, 22).timestamp()), max_value=int(u(2026, 11, 3).timestamp())
)


@settings(max_examples=150, deadline=None)
@given(cron=st.sampled_from(CRONS), zone=st.sampled_from(ZONES), a=instants, gap1=st.integers(0, 3 * 86400), gap2=st.integers(0, 3 * 86400))
@pytest.mark.slow
def test_adjacent_windows_partition_the_slots(cron: str, zone: tzinfo, a: int, gap1: int, gap2: int) -> None:
    """slots[a, b) + slots[b, c) == slots[a, c): no slot lost or repeated at a window boundary."""
    start = datetime.fromtimestamp(a, UTC)
    middle = start + timedelta(seconds=gap1)
    end = middle + timedelta(seconds=gap2)
    whole = slots_between(cron, zone, start, end)
    assert slots_between(cron, zone, start, middle) + slots_between(cron, zone, middle, end) == whole
    assert whole == sorted(set(whole))
    assert all(start <= s < end for s in whole)


# --------------------------------------------------------------------------- cron_problem

BAD_CRONS = [
    ("empty", "", "empty"),
    ("blank", "   ", "empty"),
    ("four-fields", "* * * *", "has 4 fields; expected 5"),
    ("six-fields", "0 * * * * *", "has 6 fields; expected 5"),
    ("one-word", "hourly", "has 1 fields; expected 5"),
    ("minute-60", "60 * * * *", "invalid cron '60 * * * *'"),
    ("minute-negative", "-1 * * * *", "invalid cron"),
    ("hour-24", "0 24 * * *", "invalid cron '0 24 * * *'"),
    ("day-0", "0 0 0 * *", "invalid cron"),
    ("day-32", "0 0 32 * *", "invalid cron"),
    ("month-13", "0 0 * 13 *", "invalid cron"),
    ("weekday-8", "0 0 * * 8", "invalid cron"),
    ("step-zero", "*/0 * * * *", "invalid cron"),
    ("garbage", "foo bar baz qux quux", "invalid cron 'foo bar baz qux quux'"),
    (
        "non-ascii-digit",
        "\u0663 * * * *",
        "invalid cron '\u0663 * * * *'; '\u0663' in the minute field is not a number (use 0-59, ranges such as 1-5 or steps such as */15)",
    ),
    ("never-fires", "0 0 31 4 *", "invalid cron"),
    ("unknown-alias", "@fortnightly", "invalid cron"),
    ("reboot", "@reboot", "@reboot is not a schedule"),
]


@pytest.mark.parametrize(("cron", "fragment"), [c[1:] for c in BAD_CRONS], ids=[c[0] for c in BAD_CRONS])
def test_cron_problem_on_bad_crons(cron: str, fragment: str) -> None:
    problem = cron_problem(cron)
    assert problem is not None
    assert fragment in problem


# The whole message, for every kind of mistake: it names the field, the value and what to write instead.
CRON_MESSAGES = [
    (
        "day-name-typo",
        "0 8 * * Mon-Fry",
        "invalid cron '0 8 * * Mon-Fry'; 'Fry' in the day-of-week field is not a day name (use SUN-SAT or 0-7)",
    ),
    (
        "month-name-typo",
        "0 0 1 Jnu *",
        "invalid cron '0 0 1 Jnu *'; 'Jnu' in the month field is not a month name (use JAN-DEC or 1-12)",
    ),
    (
        "full-day-name",
        "0 8 * * Monday",
        "invalid cron '0 8 * * Monday'; 'Monday' in the day-of-week field is not a day name (use SUN-SAT or 0-7)",
    ),
    ("name-in-hour-field", "0 mon * * *", "invalid cron '0 mon * * *'; 'mon' in the hour field is not a number (use 0-23)"),
    ("minute-61", "61 * * * *", "invalid cron '61 * * * *'; minute 61 is out of range 0-59"),
    ("minute-negative", "-1 * * * *", "invalid cron '-1 * * * *'; minute -1 is out of range 0-59"),
    ("hour-25-in-a-list", "0 8,25 * * *", "invalid cron '0 8,25 * * *'; hour 25 is out of range 0-23"),
    ("hour-24-ends-a-range", "0 9-24 * * *", "invalid cron '0 9-24 * * *'; hour 24 is out of range 0-23"),
    ("day-0", "0 0 0 * *", "invalid cron '0 0 0 * *'; day-of-month 0 is out of range 1-31"),
    ("month-13", "0 0 1 13 *", "invalid cron '0 0 1 13 *'; month 13 is out of range 1-12"),
    ("weekday-8", "0 0 * * 8", "invalid cron '0 0 * * 8'; day-of-week 8 is out of range 0-7"),
    ("step-zero", "*/0 * * * *", "invalid cron '*/0 * * * *'; step 0 in the minute field ('*/0'); a step must be 1 or more"),
    (
        "step-not-a-number",
        "*/x * * * *",
        "invalid cron '*/x * * * *'; step 'x' in the minute field ('*/x') is not a number; write e.g. */15",
    ),
    (
        "step-without-range",
        "5/10 * * * *",
        "invalid cron '5/10 * * * *'; '5/10' in the minute field: a step needs a range; write 5-59/10 or */10",
    ),
    (
        "reversed-range",
        "0 22-2 * * *",
        "invalid cron '0 22-2 * * *'; range '22-2' in the hour field runs backwards; cron ranges run upward "
        "(to wrap around, write two ranges: 22-23,0-2)",
    ),
    (
        "reversed-day-names",
        "0 0 * * fri-mon",
        "invalid cron '0 0 * * fri-mon'; range 'fri-mon' in the day-of-week field runs backwards; cron ranges run upward "
        "(to wrap around, write two ranges: fri-7,0-mon)",
    ),
    (
        "half-a-range",
        "0 9- * * *",
        "invalid cron '0 9- * * *'; '9-' in the hour field is not a range; write FIRST-LAST, e.g. 0-23",
    ),
    (
        "empty-list-item",
        "0,,30 * * * *",
        "invalid cron '0,,30 * * * *'; empty item in the minute field '0,,30'; separate values with single commas",
    ),
    ("quartz-last-day", "0 0 L * *", "invalid cron '0 0 L * *'; 'L' in the day-of-month field: cron (cronie) has no ?, L, W or # syntax"),
    (
        "quartz-question-mark",
        "0 0 ? * 1",
        "invalid cron '0 0 ? * 1'; '?' in the day-of-month field: cron (cronie) has no ?, L, W or # syntax",
    ),
    (
        "quartz-nth-weekday",
        "0 0 * * 1#2",
        "invalid cron '0 0 * * 1#2'; '1#2' in the day-of-week field: cron (cronie) has no ?, L, W or # syntax",
    ),
    (
        "punctuation",
        "0 9.5 * * *",
        "invalid cron '0 9.5 * * *'; '9.5' in the hour field is not a number (use 0-23, ranges such as 1-5 or steps such as */15)",
    ),
    ("never-fires", "0 0 31 4 *", "invalid cron '0 0 31 4 *'; it never fires: day-of-month '31' never occurs in month '4'"),
    (
        "never-fires-feb-30",
        "0 0 30,31 feb *",
        "invalid cron '0 0 30,31 feb *'; it never fires: day-of-month '30,31' never occurs in month 'feb'",
    ),
    (
        "unknown-shortcut",
        "@fortnightly",
        "invalid cron '@fortnightly'; unknown shortcut '@fortnightly' "
        "(use @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly or 5 fields)",
    ),
    (
        "shortcut-is-case-sensitive",
        "@Daily",
        "invalid cron '@Daily'; unknown shortcut '@Daily' "
        "(use @yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly or 5 fields)",
    ),
    ("six-fields", "0 0 * * * *", "cron '0 0 * * * *' has 6 fields; expected 5 (minute hour day-of-month month day-of-week)"),
    ("reboot", "@reboot", "@reboot is not a schedule"),
    ("empty", "", "cron is empty"),
]


@pytest.mark.parametrize(("cron", "message"), [c[1:] for c in CRON_MESSAGES], ids=[c[0] for c in CRON_MESSAGES])
def test_cron_problem_says_exactly_what_is_wrong(cron: str, message: str) -> None:
    assert cron_problem(cron) == message


@pytest.mark.parametrize(
    "cron",
    [
        "* * * * *",
        "1 * * * *",
        "30 3 * * *",
        "0 7 * * 1-5",
        "*/15 * * * *",
        "5,10-20/5 * * * *",
        "0 9 * * mon-fri",
        "0 0 1 jan *",
        "0 0 * * 7",
        "0 0 29 2 *",
        "@hourly",
        "@daily",
        "@weekly",
        "@monthly",
        " 0 7 * * 1-5 ",
        "0 9 */2 * MON",
        "0 0 29 2 mon",
        "*/100 * * * *",
        "0 0 * * 0-7",
        "0 0 * * sun-sat/2",
        "0\t7\t*\t*\t1-5",
        "007 07 01 01 *",
    ],
)
def test_cron_problem_on_good_crons(cron: str) -> None:
    assert cron_problem(cron) is None


# --------------------------------------------------------------------------- parse_instant, isoformat

PARSE = [
    ("utc-z", "2026-01-01T07:00:00Z", BERLIN, u(2026, 1, 1, 7)),
    ("explicit-offset", "2026-07-01T07:00:00+02:00", UTC, u(2026, 7, 1, 5)),
    ("naive-read-in-zone-winter", "2026-01-01T07:00", BERLIN, u(2026, 1, 1, 6)),
    ("naive-read-in-zone-summer", "2026-07-01T07:00", BERLIN, u(2026, 7, 1, 5)),
    ("naive-utc", "2026-07-01 07:00:00", UTC, u(2026, 7, 1, 7)),
    ("date-only", "2026-07-01", NEW_YORK, u(2026, 7, 1, 4)),
    ("surrounding-blanks", "  2026-01-01T07:00Z\n", UTC, u(2026, 1, 1, 7)),
    ("fractional-seconds", "2026-01-01T07:00:00.250Z", UTC, u(2026, 1, 1, 7, 0, 0, 250000)),
]


@pytest.mark.parametrize(("text", "zone", "expected"), [c[1:] for c in PARSE], ids=[c[0] for c in PARSE])
def test_parse_instant(text: str, zone: tzinfo, expected: datetime) -> None:
    value = parse_instant(text, zone)
    assert value == expected
    assert value.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["", "tomorrow", "2026-13-01", "2026-01-01T25:00", "07:00"])
def test_parse_instant_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_instant(text, UTC)


ISO = [
    ("utc", u(2026, 11, 21, 7), "2026-11-21T07:00:00Z"),
    ("drops-microseconds", u(2026, 1, 1, 7, 0, 0, 999999), "2026-01-01T07:00:00Z"),
    ("berlin-summer-to-utc", datetime(2026, 7, 1, 9, tzinfo=BERLIN), "2026-07-01T07:00:00Z"),
    ("new-york-winter-to-utc", datetime(2026, 1, 1, 23, 30, tzinfo=NEW_YORK), "2026-01-02T04:30:00Z"),
]


@pytest.mark.parametrize(("at", "expected"), [c[1:] for c in ISO], ids=[c[0] for c in ISO])
def test_isoformat(at: datetime, expected: str) -> None:
    assert isoformat(at) == expected


@pytest.mark.parametrize("at", [u(2026, 3, 29, 1), datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=BERLIN), u(1999, 12, 31, 23, 59, 59)])
def test_isoformat_round_trips_through_parse_instant(at: datetime) -> None:
    assert parse_instant(isoformat(at), BERLIN) == at.astimezone(UTC)


# --------------------------------------------------------------------------- describe

DESCRIBE = [
    ("weekdays", "0 7 * * 1-5", "At 07:00, Monday through Friday"),
    ("either-day-field", "0 9 1,15 * MON", "At 09:00, on day 1 and 15 of the month, or on Monday"),
    ("both-day-fields", "0 9 */2 * MON", "At 09:00, every 2 days, and only on Monday"),
    ("both-day-fields-range", "0 9 */2 * 1-5", "At 09:00, every 2 days, Monday through Friday (both day fields must match)"),
    ("either-day-field-range", "30 2 1 * 1-5", "At 02:30, on day 1 of the month, Monday through Friday (either day field may match)"),
]


@pytest.mark.parametrize(("cron", "words"), [c[1:] for c in DESCRIBE], ids=[c[0] for c in DESCRIBE])
def test_describe_says_how_the_day_fields_combine(cron: str, words: str) -> None:
    assert describe(cron) == words


def test_slots_in_remembers_a_quiet_cron_and_agrees_with_slots_between() -> None:
    from reporter import schedule

    berlin = ZoneInfo("Europe/Berlin")
    start = datetime(2026, 3, 28, 0, 1, tzinfo=UTC)  # the DST change in Berlin is the next night
    for expr in ("0 7 * * 1-5", "30 2 * * *", "33 3 29 2 *", "*/20 * * * *"):
        for hour in range(0, 72):
            a = start + timedelta(hours=hour)
            assert schedule.slots_in(expr, berlin, a, a + timedelta(hours=1)) == slots_between(expr, berlin, a, a + timedelta(hours=1))
    # A yearly cron: its next fire is remembered, so a window before it is answered without computing.
    schedule.slots_in("33 3 29 2 *", UTC, start, start + timedelta(hours=1))
    quiet_from, fire = schedule._QUIET[("33 3 29 2 *", UTC)]
    assert quiet_from == start and fire == datetime(2028, 2, 29, 3, 33, tzinfo=UTC)
