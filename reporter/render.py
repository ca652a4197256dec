"""Render a report slot once: subject, HTML and text bodies, PDF (WeasyPrint) and CSV.

Templates run in Jinja2's sandbox with StrictUndefined: a typo in a name is an error that names the
template, line and name, never an empty cell. HTML templates autoescape; subject and text do not.
Limits keep a huge result from making a huge email: the body and PDF show the first `max_rows`
rows, an attachment over `max_attachment_bytes` is left out, and the email says so in a note.
"""

from __future__ import annotations

import csv
import html as html_lib
import io
import logging
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import SandboxedEnvironment

from reporter.config import Config, Report
from reporter.data import Datasources, Table
from reporter.errors import INTERRUPTS, Problem, RenderError
from reporter.fetch import ResourceFetcher

log = logging.getLogger(__name__)


class _DropHarfBuzzNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "HarfBuzz-Subset" not in record.getMessage()


# WeasyPrint and fontTools narrate every render at INFO (dozens of lines per PDF); keep their warnings
# about the document (bad CSS, refused resources) and drop the rest.
logging.getLogger("fontTools").setLevel(logging.WARNING)
logging.getLogger("weasyprint.progress").setLevel(logging.WARNING)
logging.getLogger("weasyprint").addFilter(_DropHarfBuzzNotice())

BUILTIN_TEMPLATES = Path(__file__).parent / "builtin"
"""Templates reporter ships itself: the default plain-text body and the PDF page style."""


@dataclass(frozen=True)
class Rendered:
    """Everything a report slot's emails are made of; rendered once, sent to every recipient."""

    report: str
    slot: datetime
    subject: str
    html: str
    text: str
    pdf: bytes | None
    csv: bytes | None
    row_count: int
    notes: tuple[str, ...] = ()
    """What the reader should know: rows left out of the body, attachments left out of the email."""

    def attachments(self) -> list[tuple[str, str, bytes]]:
        """(filename, mime type, content) of each attachment."""
        stem = f"{self.report}-{self.slot.strftime('%Y-%m-%d_%H%M')}"
        out = []
        if self.pdf is not None:
            out.append((f"{stem}.pdf", "application/pdf", self.pdf))
        if self.csv is not None:
            out.append((f"{stem}.csv", "text/csv", self.csv))
        return out


class Renderer:
    """Jinja environments for one config; reuse it across slots in a process."""

    def __init__(self, config: Config, datasources: Datasources | None = None) -> None:
        self.config = config
        self.datasources = datasources or Datasources(config)
        loader = jinja2.ChoiceLoader([jinja2.FileSystemLoader(str(config.templates_dir)), jinja2.FileSystemLoader(str(BUILTIN_TEMPLATES))])
        common: dict[str, Any] = {"loader": loader, "undefined": jinja2.StrictUndefined, "trim_blocks": True, "lstrip_blocks": True}
        self.html_env = SandboxedEnvironment(autoescape=jinja2.select_autoescape(["html", "htm", "xml"], default_for_string=True), **common)
        self.text_env = SandboxedEnvironment(autoescape=False, keep_trailing_newline=True, **common)
        for env in (self.html_env, self.text_env):
            env.filters["number"] = _number
            env.globals["text_table"] = text_table
        self._shows_notes: dict[tuple[int, str], bool] = {}

    def context(
        self, name: str, slot_utc: datetime, table: Table, shown: Table | None = None, notes: list[str] | None = None
    ) -> dict[str, Any]:
        """What every template sees: SHOWN is the part of TABLE the body may show (all of it by default)."""
        report = self.config.reports[name]
        slot = slot_utc.astimezone(self.config.zone(report))
        shown = table if shown is None else shown
        return {
            "report": self.meta(name),
            "slot": slot,
            "slot_utc": slot_utc,
            "columns": list(table.columns),
            "rows": shown.dicts(),
            "row_count": len(table.rows),
            "rows_shown": len(shown.rows),
            "notes": list(notes or ()),
            "generated_at": datetime.now(UTC).astimezone(slot.tzinfo),
        }

    def meta(self, name: str) -> dict[str, Any]:
        report = self.config.reports[name]
        return {
            "name": name,
            "description": report.description or "",
            "schedule": report.schedule,
            "timezone": str(self.config.zone(report)),
            "formats": list(report.formats),
        }

    def render(self, name: str, slot_utc: datetime) -> Rendered:
        """Fetch the data and render every part of report NAME for SLOT_UTC."""
        report = self.config.reports[name]
        slot_local = slot_utc.astimezone(self.config.zone(report))
        table = self.datasources.fetch(name, report, slot_local, self.meta(name))
        return self.render_table(name, slot_utc, table)

    def render_table(self, name: str, slot_utc: datetime, table: Table) -> Rendered:
        """Render every part of report NAME from TABLE, within the report's row and size limits."""
        report = self.config.reports[name]
        max_rows, max_bytes = self.config.max_rows_of(report), self.config.attachment_cap_of(report)
        notes: list[str] = []
        data = self._csv(table) if "csv" in report.formats else None
        if data is not None and len(data) > max_bytes:
            notes.append(_too_big("CSV", len(data), max_bytes))
            data = None
        shown = table
        if len(table.rows) > max_rows:
            shown = Table(table.columns, table.rows[:max_rows])
            all_in_csv = "; the attached CSV has all of them." if data is not None else "."
            notes.insert(0, f"Showing the first {max_rows:,} of {len(table.rows):,} rows{all_in_csv}")
        ctx = self.context(name, slot_utc, table, shown, notes)
        subject = one_line(self._render_string(self.text_env, report.subject, ctx, name, "subject"))
        html, text = self._bodies(report, ctx)
        pdf = None
        if "pdf" in report.formats:
            pdf = self.pdf(html)
            if len(pdf) > max_bytes:
                notes.append(_too_big("PDF", len(pdf), max_bytes))
                pdf = None
                html, text = self._bodies(report, {**ctx, "notes": list(notes)})
        return Rendered(name, slot_utc, subject, html, text, pdf, data, len(table.rows), tuple(notes))

    def _bodies(self, report: Report, ctx: dict[str, Any]) -> tuple[str, str]:
        """HTML and text bodies; the notes are added to any template that does not show them itself."""
        text_template = report.text_template or "default.txt"
        html = self._render_file(self.html_env, report.template, ctx)
        text = self._render_file(self.text_env, text_template, ctx)
        notes = ctx["notes"]
        if notes and not self._shows_notes_in(self.html_env, report.template):
            html = _html_with_notes(html, notes)
        if notes and not self._shows_notes_in(self.text_env, text_template):
            text = "\n".join(notes) + "\n\n" + text
        return html, text

    def _csv(self, table: Table) -> bytes:
        try:
            return to_csv(table)
        except INTERRUPTS:
            raise
        except Exception as exc:  # noqa: BLE001 - a data value whose str() fails must not crash a worker
            raise RenderError(f"CSV: a value could not be written: {type(exc).__name__}: {exc}") from None

    def _shows_notes_in(self, env: SandboxedEnvironment, template: str) -> bool:
        """Whether TEMPLATE (or one it extends, includes or imports) uses the name `notes`."""
        key = (id(env), template)
        if key not in self._shows_notes:
            self._shows_notes[key] = False  # guards against a template that includes itself
            try:
                source, _, _ = env.loader.get_source(env, template)  # type: ignore[union-attr]
                ast = env.parse(source)
            except jinja2.TemplateError:
                return False
            refs = [r for r in jinja2.meta.find_referenced_templates(ast) if r is not None]
            used = "notes" in jinja2.meta.find_undeclared_variables(ast) or any(self._shows_notes_in(env, r) for r in refs)
            self._shows_notes[key] = used
        return self._shows_notes[key]

    def pdf(self, html: str) -> bytes:
        """HTML -> PDF with 'Page N of M' footers; ResourceFetcher decides what it may load."""
        import weasyprint  # heavy; imported on first PDF, not by `reporter validate`

        fetcher = ResourceFetcher(self.config.templates_dir, self.config.defaults.pdf_allowed_hosts)
        try:
            page_css = weasyprint.CSS(filename=str(BUILTIN_TEMPLATES / "page.css"), url_fetcher=fetcher)
            document = weasyprint.HTML(string=html, base_url=str(self.config.templates_dir.resolve()) + "/", url_fetcher=fetcher)
            pdf: bytes | None = document.write_pdf(stylesheets=[page_css])
        except INTERRUPTS:
            raise
        except Exception as exc:  # noqa: BLE001 - WeasyPrint raises many kinds; all mean "no PDF"
            raise RenderError(f"PDF rendering failed: {type(exc).__name__}: {exc}") from None
        assert pdf is not None
        return pdf

    def _render_file(self, env: SandboxedEnvironment, template: str, ctx: dict[str, Any]) -> str:
        try:
            return env.get_template(template).render(ctx)
        except INTERRUPTS:
            raise
        except jinja2.TemplateSyntaxError as exc:
            raise RenderError(f"template {self._shown(exc.filename or template)}:{exc.lineno}: {exc.message}") from None
        except jinja2.TemplateNotFound as exc:
            raise RenderError(f"template {exc.name!r} not found in {self.config.templates_dir}") from None
        except Exception as exc:  # noqa: BLE001 - anything a template does wrong is the template's error, not a crash
            file, line = _template_frame(exc)
            where = self._shown(file) if file else template
            used_by = f" (used by {template})" if file and where != template else ""
            raise RenderError(f"template {where}:{line}{used_by}: {_describe(exc)}") from None

    def _render_string(self, env: SandboxedEnvironment, source: str, ctx: dict[str, Any], report: str, key: str) -> str:
        """Render a template held in the config (the subject), naming its file, line and field on error."""
        try:
            return env.from_string(source).render(ctx)
        except INTERRUPTS:
            raise
        except Exception as exc:  # noqa: BLE001 - as in _render_file
            line = self.config.line_of("reports", report, key)
            where = f"{self.config.source}:{line}" if line else str(self.config.source)
            raise RenderError(f"{where}: reports.{report}.{key}: {_describe(exc)}") from None

    def _shown(self, filename: str) -> str:
        """A template's file name as the user knows it: relative to the templates folder."""
        path = Path(filename)
        for root in (self.config.templates_dir, BUILTIN_TEMPLATES):
            if path.is_relative_to(root):
                return str(path.relative_to(root))
            if path.is_absolute() and path.resolve().is_relative_to(root.resolve()):
                return str(path.resolve().relative_to(root.resolve()))
        return filename

    def problems(self) -> list[Problem]:
        """Template syntax errors in every report's subject and template files, found before any run."""
        out: list[Problem] = []
        file = str(self.config.source)
        for name, report in self.config.reports.items():
            try:
                self.text_env.parse(report.subject)
            except jinja2.TemplateSyntaxError as exc:
                line = self.config.line_of("reports", name, "subject")
                out.append(Problem(file, line, f"reports.{name}.subject", f"template syntax error: {exc.message}"))
            for key, env, template in (
                ("template", self.html_env, report.template),
                ("text_template", self.text_env, report.text_template),
            ):
                if template is not None:
                    out.extend(self._template_problems(env, template, f"reports.{name}.{key}", set()))
        return list(dict.fromkeys(out))

    def _template_problems(self, env: SandboxedEnvironment, template: str, field: str, seen: set[str]) -> list[Problem]:
        """Syntax errors in TEMPLATE and in every template it extends, includes or imports."""
        if template in seen:
            return []
        seen.add(template)
        try:
            source, filename, _ = env.loader.get_source(env, template)  # type: ignore[union-attr]
        except jinja2.TemplateNotFound as exc:
            if exc.name == template and len(seen) == 1:
                return []  # the report's own template missing is reported by the config check
            return [Problem(str(self.config.templates_dir), None, field, f"template {exc.name!r} (used by {template}) not found")]
        try:
            ast = env.parse(source, template, filename)
        except jinja2.TemplateSyntaxError as exc:
            return [Problem(filename or template, exc.lineno, field, f"template syntax error: {exc.message}")]
        out: list[Problem] = []
        for ref in jinja2.meta.find_referenced_templates(ast):
            if ref is not None:
                out.extend(self._template_problems(env, ref, field, seen))
        return out


def to_csv(table: Table) -> bytes:
    """The table as RFC 4180 CSV with a header row, UTF-8."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(table.columns)
    writer.writerows(table.rows)
    return out.getvalue().encode("utf-8")


def text_table(columns: list[str], rows: list[dict[str, Any]], max_width: int = 40) -> str:
    """Rows as an aligned plain-text table, for the text part of the email."""

    def cell(value: Any) -> str:
        text = "" if value is None else " ".join(str(value).split())
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]

    def line(cells: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in body)])


def _number(value: Any, digits: int = 0) -> str:
    """1234567.891 -> '1,234,568' (or with DIGITS decimals)."""
    try:
        return f"{float(value):,.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def one_line(text: str) -> str:
    """TEXT as one header-safe line: control characters and line breaks become spaces, runs collapse."""
    return " ".join("".join(" " if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in text).split())


def _template_frame(exc: BaseException) -> tuple[str | None, int | str]:
    """(template file, line) where EXC was raised: Jinja puts template frames in the traceback."""
    found: tuple[str | None, int | str] = (None, "?")
    tb = exc.__traceback__
    while tb is not None:
        if "__jinja_exception__" in tb.tb_frame.f_globals:  # a frame Jinja made to point into the template
            filename = tb.tb_frame.f_code.co_filename
            found = (None if filename == "<template>" else filename, tb.tb_lineno)
        tb = tb.tb_next
    return found


def _describe(exc: BaseException) -> str:
    """A template error in words: Jinja's message, or the Python error a template expression raised."""
    if isinstance(exc, jinja2.TemplateError):
        return str(getattr(exc, "message", None) or exc)
    return f"{type(exc).__name__}: {exc}"


def _too_big(what: str, size: int, limit: int) -> str:
    return (
        f"The {what} attachment ({_megabytes(size)}) was left out: it is larger than the {_megabytes(limit)} limit (max_attachment_bytes)."
    )


def _megabytes(size: int) -> str:
    return f"{size / 1_000_000:.1f} MB" if size >= 100_000 else f"{size:,} bytes"


BODY_RE = re.compile(r"<body\b[^>]*>", re.IGNORECASE)
NOTES_STYLE = "margin:0 0 12px;padding:6px 10px;border:1px solid #d9b44a;background:#fff8e1;font:13px sans-serif"


def _html_with_notes(html: str, notes: list[str]) -> str:
    """HTML with NOTES in a box at the top of the body, for templates that do not show them."""
    block = f'<div class="reporter-notes" style="{NOTES_STYLE}">' + "".join(f"<p>{html_lib.escape(n)}</p>" for n in notes) + "</div>"
    match = BODY_RE.search(html)
    return html[: match.end()] + block + html[match.end() :] if match else block + html
