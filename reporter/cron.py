"""Cron expressions read the way cronie reads a crontab line, with a specific reason for every refusal.

A parsed `Cron` holds the sets of minutes, hours, days, months and weekdays it matches, plus the two
flags cronie derives from the raw text: whether the job is a wildcard job (its minute or hour field
starts with `*`) and whether both day fields must match (either of them starts with `*`).
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import date
from functools import lru_cache

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
"""cronie's @-shortcuts and the five fields each stands for."""

FIELD_NAMES = "minute hour day-of-month month day-of-week"

MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")


_QUARTZ = re.compile(r"\?|L|LW|\d+[LW]|\w+#\d+", re.IGNORECASE)
"""Quartz and croniter extensions (last day, nearest weekday, nth weekday) that cronie does not read."""


class CronError(ValueError):
    """A cron that cronie would refuse (or that can never fire); the message says what to change."""


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()
    name_hint: str = ""


_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day-of-month", 1, 31),
    _Field("month", 1, 12, MONTHS, "is not a month name (use JAN-DEC or 1-12)"),
    _Field("day-of-week", 0, 7, DAYS, "is not a day name (use SUN-SAT or 0-7)"),
)


@dataclass(frozen=True)
class Cron:
    """One cron expression as sets of matching values (weekday 0 = Sunday) and cronie's two flags."""

    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    wildcard: bool
    """cronie's MIN_STAR|HR_STAR: the minute or hour field starts with '*'."""
    both_days: bool
    """cronie's DOM_STAR|DOW_STAR: day-of-month or day-of-week starts with '*', so both must match."""

    def matches_day(self, day: date) -> bool:
        """True if the cron runs on this calendar day (month, day-of-month and day-of-week fields)."""
        if day.month not in self.months:
            return False
        in_days, in_weekdays = day.day in self.days, (day.weekday() + 1) % 7 in self.weekdays
        return (in_days and in_weekdays) if self.both_days else (in_days or in_weekdays)


@lru_cache(maxsize=512)
def parse(expr: str) -> Cron:
    """EXPR as cronie reads it. CronError with a specific reason if cronie would refuse it."""
    if not isinstance(expr, str) or not expr.strip():
        raise CronError("cron is empty")
    text = expr.strip()
    if text.startswith("@"):
        if text == "@reboot":
            raise CronError("@reboot is not a schedule")
        if text not in ALIASES:
            raise CronError(f"invalid cron {expr!r}; unknown shortcut {text!r} (use {', '.join(ALIASES)} or 5 fields)")
        text = ALIASES[text]
    parts = text.split()
    if len(parts) != len(_FIELDS):
        raise CronError(f"cron {expr!r} has {len(parts)} fields; expected 5 ({FIELD_NAMES})")
    try:
        minutes, hours, days, months, weekdays = (_field(part, spec) for part, spec in zip(parts, _FIELDS, strict=True))
    except CronError as exc:
        raise CronError(f"invalid cron {expr!r}; {exc}") from None
    cron = Cron(
        minutes=tuple(sorted(minutes)),
        hours=tuple(sorted(hours)),
        days=frozenset(days),
        months=frozenset(months),
        weekdays=frozenset(d % 7 for d in weekdays),  # 7 is Sunday too
        wildcard=parts[0].startswith("*") or parts[1].startswith("*"),
        both_days=parts[2].startswith("*") or parts[4].startswith("*"),
    )
    if (never := _never_fires(cron, parts)) is not None:
        raise CronError(f"invalid cron {expr!r}; {never}")
    return cron


def _field(text: str, spec: _Field) -> set[int]:
    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise CronError(f"empty item in the {spec.name} field {text!r}; separate values with single commas")
        values |= _item(item, spec)
    return values


def _item(item: str, spec: _Field) -> set[int]:
    """One comma-separated item: '*', 'N', 'N-M', each optionally '/STEP' (cronie refuses 'N/STEP')."""
    span, slash, step_text = item.partition("/")
    if span == "*":
        low, high = spec.low, spec.high
    elif re.fullmatch(r"-[0-9]+", span):
        raise CronError(f"{spec.name} {span} is out of range {spec.low}-{spec.high}")
    elif "-" in span:
        first, _, last = span.partition("-")
        if not first or not last or "-" in last:
            raise CronError(f"{item!r} in the {spec.name} field is not a range; write FIRST-LAST, e.g. {spec.low}-{spec.high}")
        low, high = _value(first, spec), _value(last, spec)
        if low > high:
            raise CronError(
                f"range {span!r} in the {spec.name} field runs backwards; cron ranges run upward "
                f"(to wrap around, write two ranges: {first}-{spec.high},{spec.low}-{last})"
            )
    else:
        low = high = _value(span, spec)
        if slash:
            raise CronError(
                f"{item!r} in the {spec.name} field: a step needs a range; write {span}-{spec.high}/{step_text} or */{step_text}"
            )
    if not slash:
        return {low} if low == high else set(range(low, high + 1))
    if not (step_text.isascii() and step_text.isdigit()):
        raise CronError(f"step {step_text!r} in the {spec.name} field ({item!r}) is not a number; write e.g. */15")
    step = int(step_text)
    if step == 0:
        raise CronError(f"step 0 in the {spec.name} field ({item!r}); a step must be 1 or more")
    return set(range(low, high + 1, step))


def _value(token: str, spec: _Field) -> int:
    """A number or (month, day-of-week) a three-letter name, as cronie's get_number reads it."""
    if token.isascii() and token.isdigit():
        number = int(token)
        if not spec.low <= number <= spec.high:
            raise CronError(f"{spec.name} {number} is out of range {spec.low}-{spec.high}")
        return number
    if token.upper() in spec.names:
        return spec.names.index(token.upper()) + (1 if spec.name == "month" else 0)
    if _QUARTZ.fullmatch(token):
        raise CronError(f"{token!r} in the {spec.name} field: cron (cronie) has no ?, L, W or # syntax")
    if token.isalpha() and token.isascii():
        if spec.names:
            raise CronError(f"{token!r} in the {spec.name} field {spec.name_hint}")
        raise CronError(f"{token!r} in the {spec.name} field is not a number (use {spec.low}-{spec.high})")
    raise CronError(
        f"{token!r} in the {spec.name} field is not a number (use {spec.low}-{spec.high}, ranges such as 1-5 or steps such as */15)"
    )


def _never_fires(cron: Cron, parts: list[str]) -> str | None:
    """Why no date ever matches the day fields, or None. Over 400 years every (month, day, weekday) occurs."""
    if not cron.both_days:
        return None  # either field may match, and every week has each weekday
    for month in cron.months:
        length = calendar.monthrange(2000, month)[1]  # 2000 is a leap year: February has 29 days
        if any(day <= length for day in cron.days):
            return None
    return f"it never fires: day-of-month {parts[2]!r} never occurs in month {parts[3]!r}"
