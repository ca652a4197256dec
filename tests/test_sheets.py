"""reporter.sheets: CSV that is safe to open in a spreadsheet (and, below, XLSX)."""

from __future__ import annotations

import csv
import email
import email.policy
import io
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import openpyxl
import pytest

from reporter.config import Config
from reporter.data import Table
from reporter.mail import build
from reporter.render import Renderer
from reporter.sheets import UTF8_BOM, neutralise, to_csv, to_xlsx
from tests.conftest import Project
from tests.test_render import SLOT, custom_project, function_report, renderers, unique_module

__all__ = ["renderers"]  # the fixture, imported for the tests below


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('=HYPERLINK("http://x","y")', '\'=HYPERLINK("http://x","y")'),
        ("=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0"),
        ("@SUM(1)", "'@SUM(1)"),
        ("+1+1", "'+1+1"),
        ("-2+3", "'-2+3"),
        ("\t=1+1", "'\t=1+1"),
        ("\r=1+1", "'\r=1+1"),
        ("  =1+1", "'  =1+1"),  # some spreadsheets trim leading spaces before parsing
        ("-", "'-"),
        ("--", "'--"),
        # plain numbers written as text stay numbers
        ("-2", "-2"),
        ("+1.5", "+1.5"),
        ("-3e4", "-3e4"),
        ("-12%", "-12%"),
        ("-1,234.50", "-1,234.50"),
        # ordinary text is untouched
        ("Atlantis", "Atlantis"),
        ("a=b", "a=b"),
        ("", ""),
        ("Zürich – Café", "Zürich – Café"),
    ],
)
def test_neutralise(value: str, expected: str) -> None:
    assert neutralise(value) == expected


def read_csv(data: bytes) -> list[list[str]]:
    assert data.startswith(UTF8_BOM)
    return list(csv.reader(io.StringIO(data[len(UTF8_BOM) :].decode("utf-8"), newline="")))


def test_csv_neutralises_text_cells_and_keeps_numbers_numeric() -> None:
    table = Table(
        ("product", "amount", "note"),
        (
            ('=HYPERLINK("http://x","y")', -2, "@SUM(1)"),
            ("+1+1", -2.5, "-2+3"),
            ("Zürich", Decimal("-7.25"), "=cmd|' /C calc'!A0"),
            ("plain", 0, None),
        ),
    )
    assert read_csv(to_csv(table)) == [
        ["product", "amount", "note"],
        ['\'=HYPERLINK("http://x","y")', "-2", "'@SUM(1)"],
        ["'+1+1", "-2.5", "'-2+3"],
        ["Zürich", "-7.25", "'=cmd|' /C calc'!A0"],
        ["plain", "0", ""],
    ]


def test_csv_header_is_neutralised_too() -> None:
    assert read_csv(to_csv(Table(("=1+1", "ok"), ()))) == [["'=1+1", "ok"]]


def test_csv_without_bom_is_plain_utf8() -> None:
    data = to_csv(Table(("city",), (("Zürich",),)), bom=False)
    assert data == "city\r\nZürich\r\n".encode()


# --------------------------------------------------------------------------- XLSX


def open_xlsx(data: bytes) -> Any:
    assert data.startswith(b"PK")  # a zip, as every .xlsx
    return openpyxl.load_workbook(io.BytesIO(data)).active


def test_xlsx_has_typed_cells_a_frozen_header_and_widths() -> None:
    table = Table(
        ("id", "day", "at", "product", "quantity", "amount", "paid"),
        (
            (1, date(2026, 11, 20), datetime(2026, 11, 20, 6, 30, tzinfo=UTC), "Espresso machine", 2, Decimal("698.50"), True),
            (2, date(2026, 11, 21), datetime(2026, 11, 20, 23, 15, tzinfo=UTC), "Cups (6)", 1, 27.0, False),
            (3, None, None, '=HYPERLINK("http://x","y")', -2, -2.5, None),
        ),
    )
    sheet = open_xlsx(to_xlsx(table, ZoneInfo("Europe/Berlin"), "sales-daily"))
    assert sheet.title == "sales-daily"
    assert [c.value for c in sheet[1]] == ["id", "day", "at", "product", "quantity", "amount", "paid"]
    assert all(c.font.b for c in sheet[1])
    assert sheet.freeze_panes == "A2"
    assert sheet.auto_filter.ref == "A1:G4"
    first, second, third = sheet[2], sheet[3], sheet[4]
    assert [c.value for c in first] == [1, datetime(2026, 11, 20), datetime(2026, 11, 20, 7, 30), "Espresso machine", 2, 698.5, True]
    assert second[2].value == datetime(2026, 11, 21, 0, 15)  # the report's zone: past midnight in Berlin
    assert [c.data_type for c in first] == ["n", "d", "d", "s", "n", "n", "b"]
    assert first[1].number_format == "yyyy-mm-dd" and first[2].number_format == "yyyy-mm-dd hh:mm:ss"
    assert first[5].number_format == "#,##0.00" and first[4].number_format == "General"
    # Data that looks like a formula stays text; a negative number stays a number.
    assert third[3].value == '=HYPERLINK("http://x","y")' and third[3].data_type == "s"
    assert [third[4].value, third[5].value] == [-2, -2.5]
    assert third[1].value is None and third[6].value is None
    widths = {letter: sheet.column_dimensions[letter].width for letter in "ABCDEFG"}
    assert widths["D"] > widths["A"] and widths["D"] >= len('=HYPERLINK("http://x","y")')


def test_xlsx_of_an_empty_table_still_opens() -> None:
    sheet = open_xlsx(to_xlsx(Table(("a", "b"), ()), UTC, "r:[x]"))
    assert sheet.title == "r--x-"  # [ ] : * ? / \\ are not allowed in a sheet name
    assert [c.value for c in sheet[1]] == ["a", "b"]


def test_an_xlsx_report_arrives_as_a_spreadsheet_attachment(
    make_project: Callable[..., Project], renderers: Callable[[Config], Renderer]
) -> None:
    module = unique_module()
    config = custom_project(
        make_project,
        {"sheet": function_report(f"{module}:rows", formats=["html", "xlsx"])},
        {},
        {module: "def rows(slot, report):\n    return [{'region': '@SUM(1)', 'amount': 1234.5}, {'region': 'Mu', 'amount': -7}]\n"},
    )
    rendered = renderers(config).render("sheet", SLOT)
    assert rendered.csv is None and rendered.pdf is None
    msg = email.message_from_bytes(
        build(rendered, "r@example.com", ["a@example.com"], [], "<x@example.com>", True).as_bytes(), policy=email.policy.default
    )
    [part] = msg.iter_attachments()  # type: ignore[attr-defined]
    assert part.get_filename() == "sheet-2026-07-01_0700.xlsx"
    assert part.get_content_type() == "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    sheet = open_xlsx(part.get_payload(decode=True))
    assert [[c.value for c in row] for row in sheet.iter_rows()] == [["region", "amount"], ["@SUM(1)", 1234.5], ["Mu", -7]]
    assert sheet["A2"].data_type == "s"
