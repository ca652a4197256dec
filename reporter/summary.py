"""What a report says in words: numbers formatted for reading, a summary of the rows, and the footer.

Shared by the HTML and the plain-text part, so both carry the same summary and the same footer.
"""

from __future__ import annotations

import html as html_lib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from reporter.config import Config
from reporter.data import Table
from reporter.schedule import describe, next_fire

MAX_DECIMALS = 4


def is_number(value: Any) -> bool:
    """A number a reader adds up: int, float or Decimal, not a bool."""
    return isinstance(value, (int, float, Decimal)) and not isinstance(value, bool)


def is_identifier(column: str) -> bool:
    """Columns such as `id` or `order_id`: numbers, but labels, not amounts to group or add up."""
    name = column.strip().lower()
    return name in ("id", "#", "no", "nr") or name.endswith(("_id", " id"))


def numeric_columns(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[str]:
    """Columns whose values (ignoring empty ones) are all numbers, and at least one is there."""
    out = []
    for column in columns:
        values = [row.get(column) for row in rows if row.get(column) is not None]
        if values and all(is_number(v) for v in values):
            out.append(column)
    return out


def decimals_for(values: Sequence[Any]) -> int:
    """Decimals that show a column alike: 0 for whole numbers, else 2 to MAX_DECIMALS as the data needs."""
    needed = 0
    for value in values:
        if isinstance(value, int) or not is_number(value):
            continue
        text = format(Decimal(str(value)).normalize(), "f")
        needed = max(needed, len(text.partition(".")[2]))
    return 0 if needed == 0 else min(max(needed, 2), MAX_DECIMALS)


def format_number(value: Any, decimals: int = 0, grouped: bool = True) -> str:
    """1396.0 -> '1,396' ; (1234.5, 2) -> '1,234.50' ; a non-number as it is."""
    if not is_number(value):
        return "" if value is None else str(value)
    return f"{value:{',' if grouped else ''}.{decimals}f}"


def text_table(columns: list[str], rows: list[dict[str, Any]], max_width: int = 40) -> str:
    """Rows as an aligned plain-text table: numbers formatted alike per column and right-aligned."""
    numeric = set(numeric_columns(columns, rows))
    decimals = {c: decimals_for([r.get(c) for r in rows]) for c in numeric}

    def cell(column: str, value: Any) -> str:
        if column in numeric:
            return format_number(value, decimals[column], grouped=not is_identifier(column))
        text = "" if value is None else " ".join(str(value).split())
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    body = [[cell(c, row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]

    def line(cells: list[str]) -> str:
        return "  ".join(v.rjust(w) if c in numeric else v.ljust(w) for c, v, w in zip(columns, cells, widths, strict=True)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in body)])


@dataclass(frozen=True)
class Summary:
    """Row count and the totals of the amount columns, formatted: the same words in HTML and text."""

    row_count: int
    totals: dict[str, str]

    def __str__(self) -> str:
        rows = f"{self.row_count:,} row{'' if self.row_count == 1 else 's'}"
        if not self.totals:
            return f"{rows}."
        return f"{rows}; totals: " + ", ".join(f"{c} {v}" for c, v in self.totals.items()) + "."


def summarise(table: Table) -> Summary:
    """The summary of all of TABLE's rows (not only those shown)."""
    rows = table.dicts()
    totals = {}
    for column in numeric_columns(list(table.columns), rows):
        if is_identifier(column):
            continue
        values = [r[column] for r in rows if r.get(column) is not None]
        total = sum(Decimal(str(v)) for v in values)
        totals[column] = format_number(total, decimals_for(values))
    return Summary(len(rows), totals)


@dataclass(frozen=True)
class Footer:
    """What this report is, who owns it and when it runs next: under every email."""

    name: str
    description: str
    owners: tuple[str, ...]
    schedule: str
    """The cron in words, with the cron and zone, e.g. 'At 07:00, Monday through Friday (0 7 * * 1-5, Europe/Berlin)'."""
    next_run: datetime | None

    def lines(self) -> list[str]:
        """The footer as lines of plain text."""
        what = f"{self.name}: {self.description}" if self.description else self.name
        out = [f"This is the scheduled report {what}.", f"Schedule: {self.schedule}."]
        if self.next_run is not None:
            out.append(f"Next run: {self.next_run.strftime('%A %d %B %Y, %H:%M %Z')}.")
        if self.owners:
            out.append(f"Owners: {', '.join(self.owners)} (write to them to change or stop this report).")
        return out

    def text(self) -> str:
        return "-- \n" + "\n".join(self.lines()) + "\n"  # "-- " marks a signature: clients fold it away

    def html(self) -> str:
        style = "margin:24px 0 0;padding:8px 0 0;border-top:1px solid #dddddd;color:#666666;font:12px Helvetica,Arial,sans-serif"
        body = "<br>".join(html_lib.escape(line) for line in self.lines())
        return f'<div class="reporter-footer" style="{style}">{body}</div>'


def footer(config: Config, name: str, slot_utc: datetime) -> Footer:
    """The footer of report NAME's email for SLOT_UTC."""
    report = config.reports[name]
    zone = config.zone(report)
    try:
        upcoming: datetime | None = next_fire(report.schedule, zone, slot_utc).astimezone(zone)
    except (ValueError, StopIteration):
        upcoming = None
    schedule = f"{describe(report.schedule)} ({report.schedule}, {zone})"
    owners = tuple(o for o in report.owners)
    return Footer(name, report.description or "", owners, schedule, upcoming)
