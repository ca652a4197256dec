"""cronie's DST rule, table by table, and agreement with an independent cronie oracle at every change.

The rule (README, "Time zones and DST"): a job is a wildcard job when its minute or hour field starts
with '*', otherwise a fixed-time job.

- clocks go back: fixed-time jobs run once, in the first pass; wildcard jobs run in both passes;
- clocks go forward: a fixed-time job whose time was skipped runs once, right after the jump; a
  wildcard job's skipped times are skipped;
- day-of-month and day-of-week: if either field starts with '*', both must match; otherwise either.

The changes used below (UTC instant of the change; local wall clock just before -> just after):

- Europe/Berlin: 2026-03-29 and 2027-03-28 01:00Z (02:00 -> 03:00); 2026-10-25 and 2027-10-31 01:00Z
  (03:00 -> 02:00, 02:00-02:59 twice);
- America/New_York: 2026-03-08 and 2027-03-14 07:00Z (02:00 -> 03:00); 2026-11-01 and 2027-11-07 06:00Z
  (02:00 -> 01:00, 01:00-01:59 twice);
- Australia/Lord_Howe (30-minute shift): 2026-10-04 and 2027-10-03 02:00 -> 02:30 local; 2026-04-05 and
  2027-04-04 02:00 -> 01:30 local (01:30-01:59 twice);
- America/Havana (changes at midnight): 2026-03-08 and 2027-03-14 00:00 -> 01:00 local; 2026-11-01 and
  2027-11-07 01:00 -> 00:00 local (00:00-00:59 twice).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, tzinfo
from functools import cache
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reporter.schedule import iter_fires, latest_fire, next_fire, next_fires, slots_between, window
from tests.cronie_oracle import cronie_fires

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")
HAVANA = ZoneInfo("America/Havana")

SECOND = timedelta(seconds=1)


def instant(text: str) -> datetime:
    """'2026-03-29T03:00+02:00' (or a naive text read as UTC) -> aware UTC."""
    value = datetime.fromisoformat(text)
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)


# --------------------------------------------------------------------------- the DST rule, per zone and change

# id, zone, the change (UTC), cron, every fire within 3 hours either side of the change (local wall time).
DST_RULE = [
    ("berlin-2026-spring-fixed", BERLIN, "2026-03-29T01:00", "30 2 * * *", ["2026-03-29T03:00+02:00"]),
    ("berlin-2026-spring-wildcard", BERLIN, "2026-03-29T01:00", "0 */2 * * *", ["2026-03-29T00:00+01:00", "2026-03-29T04:00+02:00"]),
    ("berlin-2026-fall-fixed", BERLIN, "2026-10-25T01:00", "30 2 * * *", ["2026-10-25T02:30+02:00"]),
    (
        "berlin-2026-fall-wildcard",
        BERLIN,
        "2026-10-25T01:00",
        "0 */2 * * *",
        ["2026-10-25T00:00+02:00", "2026-10-25T02:00+02:00", "2026-10-25T02:00+01:00", "2026-10-25T04:00+01:00"],
    ),
    ("berlin-2027-spring-fixed", BERLIN, "2027-03-28T01:00", "30 2 * * *", ["2027-03-28T03:00+02:00"]),
    ("berlin-2027-spring-wildcard", BERLIN, "2027-03-28T01:00", "0 */2 * * *", ["2027-03-28T00:00+01:00", "2027-03-28T04:00+02:00"]),
    ("berlin-2027-fall-fixed", BERLIN, "2027-10-31T01:00", "30 2 * * *", ["2027-10-31T02:30+02:00"]),
    (
        "berlin-2027-fall-wildcard",
        BERLIN,
        "2027-10-31T01:00",
        "0 */2 * * *",
        ["2027-10-31T00:00+02:00", "2027-10-31T02:00+02:00", "2027-10-31T02:00+01:00", "2027-10-31T04:00+01:00"],
    ),
    ("new-york-2026-spring-fixed", NEW_YORK, "2026-03-08T07:00", "30 2 * * *", ["2026-03-08T03:00-04:00"]),
    ("new-york-2026-spring-wildcard", NEW_YORK, "2026-03-08T07:00", "0 */2 * * *", ["2026-03-08T00:00-05:00", "2026-03-08T04:00-04:00"]),
    ("new-york-2026-fall-fixed", NEW_YORK, "2026-11-01T06:00", "30 1 * * *", ["2026-11-01T01:30-04:00"]),
    (
        "new-york-2026-fall-wildcard",
        NEW_YORK,
        "2026-11-01T06:00",
        "*/30 1 * * *",
        ["2026-11-01T01:00-04:00", "2026-11-01T01:30-04:00", "2026-11-01T01:00-05:00", "2026-11-01T01:30-05:00"],
    ),
    ("new-york-2027-spring-fixed", NEW_YORK, "2027-03-14T07:00", "30 2 * * *", ["2027-03-14T03:00-04:00"]),
    ("new-york-2027-spring-wildcard", NEW_YORK, "2027-03-14T07:00", "0 */2 * * *", ["2027-03-14T00:00-05:00", "2027-03-14T04:00-04:00"]),
    ("new-york-2027-fall-fixed", NEW_YORK, "2027-11-07T06:00", "30 1 * * *", ["2027-11-07T01:30-04:00"]),
    (
        "new-york-2027-fall-wildcard",
        NEW_YORK,
        "2027-11-07T06:00",
        "*/30 1 * * *",
        ["2027-11-07T01:00-04:00", "2027-11-07T01:30-04:00", "2027-11-07T01:00-05:00", "2027-11-07T01:30-05:00"],
    ),
    ("lord-howe-2026-spring-fixed", LORD_HOWE, "2026-10-03T15:30", "15 2 * * *", ["2026-10-04T02:30+11:00"]),
    ("lord-howe-2026-spring-wildcard", LORD_HOWE, "2026-10-03T15:30", "0 */2 * * *", ["2026-10-04T00:00+10:30", "2026-10-04T04:00+11:00"]),
    ("lord-howe-2026-spring-wildcard-minutes", LORD_HOWE, "2026-10-03T15:30", "*/20 2 * * *", ["2026-10-04T02:40+11:00"]),
    ("lord-howe-2026-fall-fixed", LORD_HOWE, "2026-04-04T15:00", "45 1 * * *", ["2026-04-05T01:45+11:00"]),
    (
        "lord-howe-2026-fall-wildcard",
        LORD_HOWE,
        "2026-04-04T15:00",
        "*/20 1 * * *",
        ["2026-04-05T01:00+11:00", "2026-04-05T01:20+11:00", "2026-04-05T01:40+11:00", "2026-04-05T01:40+10:30"],
    ),
    ("lord-howe-2027-spring-fixed", LORD_HOWE, "2027-10-02T15:30", "15 2 * * *", ["2027-10-03T02:30+11:00"]),
    ("lord-howe-2027-spring-wildcard", LORD_HOWE, "2027-10-02T15:30", "0 */2 * * *", ["2027-10-03T00:00+10:30", "2027-10-03T04:00+11:00"]),
    ("lord-howe-2027-spring-wildcard-minutes", LORD_HOWE, "2027-10-02T15:30", "*/20 2 * * *", ["2027-10-03T02:40+11:00"]),
    ("lord-howe-2027-fall-fixed", LORD_HOWE, "2027-04-03T15:00", "45 1 * * *", ["2027-04-04T01:45+11:00"]),
    (
        "lord-howe-2027-fall-wildcard",
        LORD_HOWE,
        "2027-04-03T15:00",
        "*/20 1 * * *",
        ["2027-04-04T01:00+11:00", "2027-04-04T01:20+11:00", "2027-04-04T01:40+11:00", "2027-04-04T01:40+10:30"],
    ),
    ("havana-2026-spring-fixed", HAVANA, "2026-03-08T05:00", "30 0 * * *", ["2026-03-08T01:00-04:00"]),
    ("havana-2026-spring-wildcard", HAVANA, "2026-03-08T05:00", "0 */2 * * *", ["2026-03-07T22:00-05:00", "2026-03-08T02:00-04:00"]),
    ("havana-2026-fall-fixed", HAVANA, "2026-11-01T05:00", "30 0 * * *", ["2026-11-01T00:30-04:00"]),
    (
        "havana-2026-fall-wildcard",
        HAVANA,
        "2026-11-01T05:00",
        "0 */2 * * *",
        ["2026-10-31T22:00-04:00", "2026-11-01T00:00-04:00", "2026-11-01T00:00-05:00", "2026-11-01T02:00-05:00"],
    ),
    ("havana-2027-spring-fixed", HAVANA, "2027-03-14T05:00", "30 0 * * *", ["2027-03-14T01:00-04:00"]),
    ("havana-2027-spring-wildcard", HAVANA, "2027-03-14T05:00", "0 */2 * * *", ["2027-03-13T22:00-05:00", "2027-03-14T02:00-04:00"]),
    ("havana-2027-fall-fixed", HAVANA, "2027-11-07T05:00", "30 0 * * *", ["2027-11-07T00:30-04:00"]),
    (
        "havana-2027-fall-wildcard",
        HAVANA,
        "2027-11-07T05:00",
        "0 */2 * * *",
        ["2027-11-06T22:00-04:00", "2027-11-07T00:00-04:00", "2027-11-07T00:00-05:00", "2027-11-07T02:00-05:00"],
    ),
]


@pytest.mark.parametrize(("zone", "change", "cron", "expected"), [r[1:] for r in DST_RULE], ids=[r[0] for r in DST_RULE])
def test_dst_rule(zone: tzinfo, change: str, cron: str, expected: list[str]) -> None:
    at = instant(change)
    slots = slots_between(cron, zone, at - timedelta(hours=3), at + timedelta(hours=3))
    assert [s.astimezone(zone).isoformat(timespec="minutes") for s in slots] == expected
    assert slots == [instant(e) for e in expected]


# id, the change day (a Sunday, local), fires of "0 9 */2 * SUN" and of "0 9 1-31/2 * SUN" from Thursday to
# Wednesday around it. '*/2' starts with '*', so both day fields must match (odd days that are Sundays);
# '1-31/2' is the same set of days but does not start with '*', so either field may match.
DAY_FIELDS = [
    (BERLIN, "2026-03-29", ["2026-03-29"], ["2026-03-27", "2026-03-29", "2026-03-31", "2026-04-01"]),
    (BERLIN, "2026-10-25", ["2026-10-25"], ["2026-10-23", "2026-10-25", "2026-10-27"]),
    (BERLIN, "2027-03-28", [], ["2027-03-25", "2027-03-27", "2027-03-28", "2027-03-29", "2027-03-31"]),
    (BERLIN, "2027-10-31", ["2027-10-31"], ["2027-10-29", "2027-10-31", "2027-11-01", "2027-11-03"]),
    (NEW_YORK, "2026-03-08", [], ["2026-03-05", "2026-03-07", "2026-03-08", "2026-03-09", "2026-03-11"]),
    (NEW_YORK, "2026-11-01", ["2026-11-01"], ["2026-10-29", "2026-10-31", "2026-11-01", "2026-11-03"]),
    (NEW_YORK, "2027-03-14", [], ["2027-03-11", "2027-03-13", "2027-03-14", "2027-03-15", "2027-03-17"]),
    (NEW_YORK, "2027-11-07", ["2027-11-07"], ["2027-11-05", "2027-11-07", "2027-11-09"]),
    (LORD_HOWE, "2026-04-05", ["2026-04-05"], ["2026-04-03", "2026-04-05", "2026-04-07"]),
    (LORD_HOWE, "2026-10-04", [], ["2026-10-01", "2026-10-03", "2026-10-04", "2026-10-05", "2026-10-07"]),
    (LORD_HOWE, "2027-04-04", [], ["2027-04-01", "2027-04-03", "2027-04-04", "2027-04-05", "2027-04-07"]),
    (LORD_HOWE, "2027-10-03", ["2027-10-03"], ["2027-10-01", "2027-10-03", "2027-10-05"]),
    (HAVANA, "2026-03-08", [], ["2026-03-05", "2026-03-07", "2026-03-08", "2026-03-09", "2026-03-11"]),
    (HAVANA, "2026-11-01", ["2026-11-01"], ["2026-10-29", "2026-10-31", "2026-11-01", "2026-11-03"]),
    (HAVANA, "2027-03-14", [], ["2027-03-11", "2027-03-13", "2027-03-14", "2027-03-15", "2027-03-17"]),
    (HAVANA, "2027-11-07", ["2027-11-07"], ["2027-11-05", "2027-11-07", "2027-11-09"]),
]


@pytest.mark.parametrize(("zone", "sunday", "both", "either"), DAY_FIELDS, ids=[f"{r[0]}-{r[1]}" for r in DAY_FIELDS])
def test_day_fields_star_means_both_must_match(zone: ZoneInfo, sunday: str, both: list[str], either: list[str]) -> None:
    first = date.fromisoformat(sunday) - timedelta(days=3)
    start = datetime.combine(first, datetime.min.time(), tzinfo=zone).astimezone(UTC)
    end = datetime.combine(first + timedelta(days=7), datetime.min.time(), tzinfo=zone).astimezone(UTC)
    for cron, expected in (("0 9 */2 * SUN", both), ("0 9 1-31/2 * SUN", either)):
        slots = slots_between(cron, zone, start, end)
        assert [s.astimezone(zone).date().isoformat() for s in slots] == expected, cron
        assert {s.astimezone(zone).time().isoformat() for s in slots} <= {"09:00:00"}, cron


DAY_FIELD_CRONS = [
    # The example: odd days that are Mondays, not every odd day and every Monday.
    ("star-step-and-weekday", "0 9 */2 * MON", ["2026-01-05", "2026-01-19", "2026-02-09", "2026-02-23"]),
    ("list-and-weekday-either", "0 9 1,15 * MON", ["2026-01-01", "2026-01-05", "2026-01-12", "2026-01-15"]),
    ("star-weekday-only", "0 9 * * MON", ["2026-01-05", "2026-01-12", "2026-01-19", "2026-01-26"]),
    ("day-of-month-only", "0 9 1,15 * *", ["2026-01-01", "2026-01-15", "2026-02-01", "2026-02-15"]),
    ("star-day-and-weekday-range", "0 9 * * 1-5", ["2026-01-01", "2026-01-02", "2026-01-05", "2026-01-06"]),
    ("sunday-as-7", "0 9 */10 * 7", ["2026-01-11", "2026-02-01", "2026-03-01", "2026-05-31"]),
]


@pytest.mark.parametrize(("cron", "expected"), [r[1:] for r in DAY_FIELD_CRONS], ids=[r[0] for r in DAY_FIELD_CRONS])
def test_day_field_rule(cron: str, expected: list[str]) -> None:
    fires = next_fires(cron, UTC, instant("2026-01-01T00:00"), len(expected))
    assert [f.date().isoformat() for f in fires] == expected


# --------------------------------------------------------------------------- latest_fire in a repeated hour

REPEATED_HOUR = [
    # Issue 10, item 2: 02:45 CET on the fall-back day; the slot dispatched was 02:30 CEST, not 02:30 CET.
    ("berlin-fixed-second-pass", "30 2 * * *", BERLIN, "2026-10-25T02:45+01:00", "2026-10-25T02:30+02:00"),
    ("berlin-fixed-first-pass", "30 2 * * *", BERLIN, "2026-10-25T02:45+02:00", "2026-10-25T02:30+02:00"),
    ("berlin-wildcard-second-pass", "30 * * * *", BERLIN, "2026-10-25T02:45+01:00", "2026-10-25T02:30+01:00"),
    ("berlin-wildcard-second-pass-start", "30 * * * *", BERLIN, "2026-10-25T02:00+01:00", "2026-10-25T02:30+02:00"),
    ("new-york-fixed-second-pass", "30 1 * * *", NEW_YORK, "2026-11-01T01:59:59-05:00", "2026-11-01T01:30-04:00"),
    ("lord-howe-fixed-second-pass", "45 1 * * *", LORD_HOWE, "2026-04-05T01:50+10:30", "2026-04-05T01:45+11:00"),
    ("havana-fixed-second-pass", "30 0 * * *", HAVANA, "2026-11-01T00:45-05:00", "2026-11-01T00:30-04:00"),
    ("havana-wildcard-second-pass", "*/30 0 * * *", HAVANA, "2026-11-01T00:45-05:00", "2026-11-01T00:30-05:00"),
    # Spring forward: the skipped fixed time is the jump itself; nothing of a wildcard job in the gap.
    ("berlin-fixed-at-jump", "30 2 * * *", BERLIN, "2026-03-29T03:00+02:00", "2026-03-29T03:00+02:00"),
    ("berlin-fixed-just-before-jump", "30 2 * * *", BERLIN, "2026-03-29T01:59:59+01:00", "2026-03-28T02:30+01:00"),
    ("berlin-step-hours-after-jump", "0 */2 * * *", BERLIN, "2026-03-29T03:59:59+02:00", "2026-03-29T00:00+01:00"),
]


@pytest.mark.parametrize(("cron", "zone", "at", "expected"), [r[1:] for r in REPEATED_HOUR], ids=[r[0] for r in REPEATED_HOUR])
def test_latest_fire_around_changes(cron: str, zone: tzinfo, at: str, expected: str) -> None:
    assert latest_fire(cron, zone, instant(at)) == instant(expected)


# --------------------------------------------------------------------------- agreement with the cronie oracle

ZONES = [
    "Europe/Berlin",
    "Europe/London",
    "America/New_York",
    "America/St_Johns",
    "America/Havana",
    "America/Santiago",
    "Australia/Lord_Howe",
    "Australia/Adelaide",
    "Pacific/Chatham",
    "Pacific/Auckland",
    "Asia/Jerusalem",
    "Africa/Casablanca",
]
CRONS = [
    "0 */2 * * *",
    "30 2 * * *",
    "0 * * * *",
    "*/15 * * * *",
    "30 1 * * *",
    "15,45 0-3 * * *",
    "* 2 * * *",
    "0-59/20 2 * * *",
    "*/7 1-3 * * *",
    "30 0 * * *",
    "45 23 * * *",
    "0 0 * * SUN",
    "0 9 */2 * MON",
    "@hourly",
    "@daily",
]
AROUND = timedelta(hours=26)
"""How far either side of a change the oracle runs (it starts well away from any change)."""


@cache
def changes(name: str) -> tuple[datetime, ...]:
    """Every instant in 2026-2027 at which ZONE's UTC offset changes, to the second."""
    zone, found = ZoneInfo(name), []
    at, end = instant("2026-01-01T00:00"), instant("2028-01-01T00:00")
    before = at.astimezone(zone).utcoffset()
    while at < end:
        later = at + timedelta(hours=1)
        if (offset := later.astimezone(zone).utcoffset()) != before:
            low, high = at, later
            while high - low > SECOND:
                middle = low + (high - low) / 2
                low, high = (low, middle) if middle.astimezone(zone).utcoffset() == offset else (middle, high)
            found.append(high.replace(microsecond=0))
            before = offset
        at = later
    return tuple(found)


@cache
def oracle(cron: str, name: str, change: datetime) -> tuple[datetime, ...]:
    return tuple(cronie_fires(cron, ZoneInfo(name), change - AROUND, change + AROUND))


@pytest.mark.slow
def test_every_zone_has_four_changes_in_two_years() -> None:
    """The property tests below would be vacuous for a zone without changes."""
    assert {name: len(changes(name)) for name in ZONES} == {name: 4 for name in ZONES}


@pytest.mark.parametrize("name", ZONES)
@pytest.mark.slow
def test_agrees_with_cronie_around_every_change(name: str) -> None:
    """slots_between, iter_fires, next_fire(s), latest_fire and window give cronie's fires, to the second."""
    zone, checked = ZoneInfo(name), 0
    for change in changes(name):
        start, end = change - AROUND, change + AROUND
        for cron in CRONS:
            fires = list(oracle(cron, name, change))
            checked += len(fires)
            assert slots_between(cron, zone, start, end) == fires, (cron, name, change)
            it = iter_fires(cron, zone, start - SECOND)
            assert [next(it) for _ in fires] == fires, (cron, name, change)
            # Every instant where an answer changes, within 3 hours of the change, and the change itself.
            near = [f for f in fires if abs(f - change) <= timedelta(hours=3)]
            for t in [change - SECOND, change, change + SECOND] + [f + d for f in near for d in (-SECOND, timedelta(0), SECOND)]:
                before = [f for f in fires if f <= t]
                after = [f for f in fires if f > t]
                if before:
                    assert latest_fire(cron, zone, t) == before[-1], (cron, name, t)
                if after:
                    assert next_fire(cron, zone, t) == after[0], (cron, name, t)
                if len(after) >= 2:
                    assert next_fires(cron, zone, t, 2) == after[:2], (cron, name, t)
            for first, second in pairwise(near):
                assert window(cron, zone, first) == (first, second), (cron, name, first)
    assert checked > 1000, "the oracle found too few fires for this test to mean much"


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(ZONES),
    cron=st.sampled_from(CRONS),
    which=st.integers(0, 3),
    offset=st.integers(-3 * 3600 * 10**6, 3 * 3600 * 10**6),
    length=st.integers(0, 6 * 3600),
)
@pytest.mark.slow
def test_any_instant_near_a_change_agrees_with_cronie(name: str, cron: str, which: int, offset: int, length: int) -> None:
    """At any instant (to the microsecond) within 3 hours of a change: the same answers as the oracle."""
    zone, change = ZoneInfo(name), changes(name)[which]
    fires = oracle(cron, name, change)
    t = change + timedelta(microseconds=offset)
    end = t + timedelta(seconds=length)
    if earlier := [f for f in fires if f <= t]:
        assert latest_fire(cron, zone, t) == earlier[-1]
    if later := [f for f in fires if f > t]:
        assert next_fire(cron, zone, t) == later[0]
    assert slots_between(cron, zone, t, end) == [f for f in fires if t <= f < end]
