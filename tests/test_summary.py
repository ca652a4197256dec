"""reporter.summary: numbers as a reader reads them, the same summary in HTML and text, the footer."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from reporter.data import Table
from reporter.render import Rendered
from reporter.summary import Footer, decimals_for, format_number, summarise, text_table


@pytest.mark.parametrize(
    ("values", "decimals"),
    [
        ([1396.0, 349.0], 0),
        ([1, 2, 3], 0),
        ([12.5, 3.0], 2),
        ([Decimal("9.95"), Decimal("14.90")], 2),
        ([0.125, 1.0], 3),
        ([1 / 3], 4),
        (["n/a", None, 2.5], 2),
    ],
)
def test_decimals_for(values: list[Any], decimals: int) -> None:
    assert decimals_for(values) == decimals


@pytest.mark.parametrize(
    ("value", "decimals", "grouped", "text"),
    [(1396.0, 0, True, "1,396"), (1234.5, 2, True, "1,234.50"), (2760, 0, False, "2760"), (None, 2, True, ""), ("x", 2, True, "x")],
)
def test_format_number(value: Any, decimals: int, grouped: bool, text: str) -> None:
    assert format_number(value, decimals, grouped) == text


def test_text_table_right_aligns_and_formats_numbers_per_column() -> None:
    rows = [{"id": 2760, "product": "Espresso machine", "amount": 1396.0}, {"id": 2761, "product": "Cups", "amount": 12.5}]
    assert text_table(["id", "product", "amount"], rows) == (
        "  id  product             amount\n"
        "----  ----------------  --------\n"
        "2760  Espresso machine  1,396.00\n"
        "2761  Cups                 12.50"
    )


def test_summary_totals_amounts_over_all_rows_but_not_identifiers() -> None:
    table = Table(("id", "region", "quantity", "amount"), ((1, "N", 2, 10.5), (2, "S", 3, 0.25), (3, "S", None, 1000.0)))
    summary = summarise(table)
    assert summary.row_count == 3
    assert summary.totals == {"quantity": "5", "amount": "1,010.75"}
    assert str(summary) == "3 rows; totals: quantity 5, amount 1,010.75."
    assert str(summarise(Table(("region",), (("N",),)))) == "1 row."


def test_footer_lines() -> None:
    end = Footer("sales-daily", "Orders by region", ("data@example.com",), "At 07:00 (0 7 * * *, Europe/Berlin)", None)
    assert end.text() == (
        "-- \nThis is the scheduled report sales-daily: Orders by region.\nSchedule: At 07:00 (0 7 * * *, Europe/Berlin).\n"
        "Owners: data@example.com (write to them to change or stop this report).\n"
    )
    assert "<br>" in end.html() and "&lt;" not in end.html()


def test_attachments_are_named_in_the_reports_zone_even_across_midnight() -> None:
    slot = datetime(2026, 11, 19, 23, 30, tzinfo=UTC)  # 00:30 on the 20th in Berlin
    rendered = Rendered("r", slot, "s", "<p>", "t", b"%PDF", b"a\r\n", 1, (), slot.astimezone(ZoneInfo("Europe/Berlin")))
    assert [name for name, _, _ in rendered.attachments()] == ["r-2026-11-20_0030.pdf", "r-2026-11-20_0030.csv"]
