"""Tabular attachments a spreadsheet opens: CSV (safe to open) and XLSX (typed cells, by xlsxwriter).

Both defend against formula injection (OWASP "CSV injection"): a data value such as
`=HYPERLINK("http://x","y")` must arrive as text, never as a live formula. Numbers stay numbers:
a plain negative number such as -2.5 is data, not a formula, and is left alone.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from datetime import date, datetime, tzinfo
from decimal import Decimal
from typing import Any

from reporter.data import Table

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
"""Characters that make a spreadsheet read a cell as a formula (OWASP's list)."""

PLAIN_NUMBER_RE = re.compile(r"[+-]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?%?")
"""A value a spreadsheet reads as a number, not a formula: -2, +1.5, -3e4, -12%."""

UTF8_BOM = b"\xef\xbb\xbf"


def neutralise(value: str) -> str:
    """VALUE as a spreadsheet will show it as text: a leading quote if it could start a formula.

    The check looks past leading spaces too, since some spreadsheets trim them before parsing.
    A plain number (`-2`, `+1.5`) is left as it is, so a column of signed numbers stays numeric.
    """
    if not value.lstrip(" ").startswith(FORMULA_START):
        return value
    if PLAIN_NUMBER_RE.fullmatch(value.strip()):
        return value
    return "'" + value


def csv_cell(value: Any) -> Any:
    """One value as the csv module should write it: numbers as they are, text neutralised."""
    if value is None:
        return ""
    if isinstance(value, (bool, int, float, Decimal)):
        return value
    return neutralise(str(value))


def to_csv(table: Table, bom: bool = True) -> bytes:
    """The table as RFC 4180 CSV with a header row, UTF-8 (with a BOM unless BOM is false).

    The BOM is what makes Excel read the file as UTF-8 instead of the system's code page.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([csv_cell(c) for c in table.columns])
    writer.writerows([csv_cell(v) for v in row] for row in table.rows)
    data = out.getvalue().encode("utf-8")
    return UTF8_BOM + data if bom else data


XLSX_MIME = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
MAX_COLUMN_WIDTH = 60
WORKBOOK_OPTIONS = {"in_memory": True, "strings_to_formulas": False, "strings_to_urls": False, "strings_to_numbers": False}
"""Belt and braces: text cells are written with write_string anyway, which never interprets them."""
DATE_FORMAT = "yyyy-mm-dd"
DATETIME_FORMAT = "yyyy-mm-dd hh:mm:ss"


def to_xlsx(table: Table, zone: tzinfo, title: str) -> bytes:
    """The table as an Excel workbook: typed cells, a bold header row that stays in view, column widths.

    Text is always written as text (never parsed into a formula, a number or a link), so data such
    as `=HYPERLINK(...)` is shown, not run. Aware datetimes are written in ZONE (the report's), as
    Excel keeps no timezone.
    """
    import xlsxwriter  # imported on first use: `reporter validate` and CSV-only reports never need it

    out = io.BytesIO()
    book = xlsxwriter.Workbook(out, WORKBOOK_OPTIONS)
    sheet = book.add_worksheet(_sheet_name(title))
    header = book.add_format({"bold": True, "bg_color": "#F3F3F3", "bottom": 1})
    date_format = book.add_format({"num_format": DATE_FORMAT})
    datetime_format = book.add_format({"num_format": DATETIME_FORMAT})
    number_formats: dict[int, Any] = {}
    for column, values in enumerate(zip(*table.rows, strict=True) if table.rows else [() for _ in table.columns]):
        decimals = _decimals(values)
        if decimals:
            number_formats[column] = book.add_format({"num_format": "#,##0." + "0" * decimals})
    widths = [len(str(c)) for c in table.columns]
    for column, name in enumerate(table.columns):
        sheet.write_string(0, column, str(name), header)
    for row_number, row in enumerate(table.rows, start=1):
        for column, value in enumerate(row):
            shown = _write_cell(sheet, row_number, column, value, zone, number_formats.get(column), date_format, datetime_format)
            widths[column] = max(widths[column], len(shown))
    for column, width in enumerate(widths):
        sheet.set_column(column, column, min(width + 2, MAX_COLUMN_WIDTH))
    sheet.freeze_panes(1, 0)
    if table.columns:
        sheet.autofilter(0, 0, max(len(table.rows), 1), len(table.columns) - 1)
    book.close()
    return out.getvalue()


def _write_cell(sheet: Any, row: int, column: int, value: Any, zone: tzinfo, number: Any, date_format: Any, datetime_format: Any) -> str:
    """Write VALUE with the cell type it has; return the text a reader sees, for the column width."""
    if value is None:
        return ""
    if isinstance(value, bool):
        sheet.write_boolean(row, column, value)
        return "FALSE"
    if isinstance(value, (int, float, Decimal)):
        number_value = float(value)
        if math.isfinite(number_value):
            sheet.write_number(row, column, number_value, number)
            return f"{number_value:,.2f}" if number is not None else str(value)
        sheet.write_string(row, column, str(value))  # inf and NaN have no Excel number
        return str(value)
    if isinstance(value, datetime):
        local = value.astimezone(zone).replace(tzinfo=None) if value.tzinfo is not None else value
        sheet.write_datetime(row, column, local, datetime_format)
        return "yyyy-mm-dd hh:mm:ss"
    if isinstance(value, date):
        sheet.write_datetime(row, column, datetime(value.year, value.month, value.day), date_format)
        return "yyyy-mm-dd"
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).hex()
    else:
        text = str(value)
    sheet.write_string(row, column, text[:32767])  # Excel's limit per cell
    return max(text.splitlines() or [""], key=len)


def _decimals(values: Sequence[Any]) -> int:
    """2 for a column with fractional numbers (shown with thousands separators), else 0 (as stored)."""
    fractional = any(isinstance(v, (float, Decimal)) and not isinstance(v, bool) and v == v and v % 1 for v in values)
    return 2 if fractional else 0


def _sheet_name(title: str) -> str:
    """A valid sheet name: at most 31 characters, none of []:*?/\\."""
    cleaned = re.sub(r"[\[\]:*?/\\]", "-", title).strip("'") or "Report"
    return cleaned[:31]
