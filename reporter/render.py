"""Render a report slot once: subject, HTML and text bodies, PDF (WeasyPrint) and CSV.

Templates run in Jinja2's sandbox with StrictUndefined: a typo in a name is an error that names the
template, line and name, never an empty cell. HTML templates autoescape; subject and text do not.
Limits keep a huge result from making a huge email: the body and PDF show the first `max_rows`
rows, an attachment over `max_attachment_bytes` is left out, and the email says so in a note.
"""

from __future__ import annotations

import html as html_lib
import logging
import re
import threading
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import SandboxedEnvironment
from markupsafe import Markup

from reporter import charts as charts_mod
from reporter import htmlmail
from reporter.charts import RenderedChart
from reporter.config import Config, Report, template_key
from reporter.data import Datasources, Table
from reporter.errors import INTERRUPTS, RenderError
from reporter.sheets import XLSX_MIME, to_csv, to_xlsx
from reporter.summary import Footer, footer, summarise, text_table

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
    local_slot: datetime | None = None
    """The slot in the report's own timezone: attachments are named after it, as the reader's day."""
    xlsx: bytes | None = None
    charts: tuple[RenderedChart, ...] = ()
    """Each chart as SVG (already in the PDF) and PNG (for the email, by Content-ID)."""

    def attachments(self) -> list[tuple[str, str, bytes]]:
        """(filename, mime type, content) of each attachment."""
        stem = f"{self.report}-{(self.local_slot or self.slot).strftime('%Y-%m-%d_%H%M')}"
        out = []
        if self.pdf is not None:
            out.append((f"{stem}.pdf", "application/pdf", self.pdf))
        if self.csv is not None:
            out.append((f"{stem}.csv", "text/csv", self.csv))
        if self.xlsx is not None:
            out.append((f"{stem}.xlsx", XLSX_MIME, self.xlsx))
        return out


class SnapshotLoader(jinja2.BaseLoader):
    """Templates as they were read with a config (see `Config.templates`), named by their path in FOLDER."""

    def __init__(self, folder: Path, templates: Mapping[str, str]) -> None:
        self.folder = folder
        self.templates = templates

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Callable[[], bool]]:
        key = template_key(template)
        if key is None or key not in self.templates:
            raise jinja2.TemplateNotFound(template)
        # The file's path, so that errors name it; the text never changes for this config.
        return self.templates[key], str(self.folder / key), lambda: True

    def list_templates(self) -> list[str]:
        return sorted(self.templates)


def environments(templates_dir: Path, templates: Mapping[str, str]) -> tuple[SandboxedEnvironment, SandboxedEnvironment]:
    """The HTML (autoescaping) and text Jinja environments over TEMPLATES (read from TEMPLATES_DIR) and reporter's own."""
    loader = jinja2.ChoiceLoader([SnapshotLoader(templates_dir, templates), jinja2.FileSystemLoader(str(BUILTIN_TEMPLATES))])
    common: dict[str, Any] = {"loader": loader, "undefined": jinja2.StrictUndefined, "trim_blocks": True, "lstrip_blocks": True}
    html_env = SandboxedEnvironment(autoescape=jinja2.select_autoescape(["html", "htm", "xml"], default_for_string=True), **common)
    text_env = SandboxedEnvironment(autoescape=False, keep_trailing_newline=True, **common)
    for env in (html_env, text_env):
        env.filters["number"] = _number
        env.globals["text_table"] = text_table
    return html_env, text_env


class Renderer:
    """Jinja environments for one config; reuse it across slots in a process."""

    def __init__(self, config: Config, datasources: Datasources | None = None) -> None:
        self.config = config
        self.datasources = datasources or Datasources(config)
        self.html_env, self.text_env = environments(config.templates_dir, config.templates)
        self._uses: dict[tuple[int, str, str], bool] = {}

    def context(
        self, name: str, slot_utc: datetime, table: Table, shown: Table | None = None, notes: list[str] | None = None
    ) -> dict[str, Any]:
        """What every template sees: SHOWN is the part of TABLE the body may show (all of it by default)."""
        report = self.config.reports[name]
        slot = slot_utc.astimezone(self.config.zone(report))
        shown = table if shown is None else shown
        every = table.dicts()  # for totals and groups: the body may show only the first rows
        return {
            "report": self.meta(name),
            "slot": slot,
            "slot_utc": slot_utc,
            "columns": list(table.columns),
            "rows": every if shown is table else shown.dicts(),
            "all_rows": every,
            "row_count": len(table.rows),
            "rows_shown": len(shown.rows),
            "notes": list(notes or ()),
            "summary": summarise(table),
            "footer": footer(self.config, name, slot_utc),
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

    def render(self, name: str, slot_utc: datetime, reader: Mapping[str, Any] | None = None) -> Rendered:
        """Fetch the data and render every part of report NAME for SLOT_UTC (a burst report's: READER's slice)."""
        return self.render_table(name, slot_utc, self.fetch(name, slot_utc, reader), reader=reader)

    def fetch(self, name: str, slot_utc: datetime, reader: Mapping[str, Any] | None = None) -> Table:
        """The data of report NAME for SLOT_UTC (its query or function, run with the slot in the report's zone;
        a burst report's with READER's parameters bound)."""
        report = self.config.reports[name]
        slot_local = slot_utc.astimezone(self.config.zone(report))
        return self.datasources.fetch(name, report, slot_local, self.meta(name), reader)

    def render_table(
        self,
        name: str,
        slot_utc: datetime,
        table: Table,
        extra: Mapping[str, Any] | None = None,
        spec: Report | None = None,
        reader: Mapping[str, Any] | None = None,
    ) -> Rendered:
        """Render every part of report NAME from TABLE, within the report's row and size limits. EXTRA is
        merged into what the templates see (an alert's `alert` and `value`); SPEC renders a variant of
        the report (an alert's recovered email, with its own subject and templates); READER is a burst
        reader's address and parameters, which the templates see as `reader`."""
        report = spec or self.config.reports[name]
        max_rows, max_bytes = self.config.max_rows_of(report), self.config.attachment_cap_of(report)
        notes: list[str] = []
        data = self._csv(table, self.config.csv_bom_of(report)) if "csv" in report.formats else None
        if data is not None and len(data) > max_bytes:
            notes.append(_too_big("CSV", len(data), max_bytes))
            data = None
        sheet = self._xlsx(table, name) if "xlsx" in report.formats else None
        if sheet is not None and len(sheet) > max_bytes:
            notes.append(_too_big("XLSX", len(sheet), max_bytes))
            sheet = None
        # Where a reader finds every row: the first full attachment.
        full = "CSV" if data is not None else ("XLSX" if sheet is not None else None)
        shown = table
        if len(table.rows) > max_rows:
            shown = Table(table.columns, table.rows[:max_rows])
            all_in_csv = f"; the attached {full} has all of them." if full else "."
            notes.insert(0, f"Showing the first {max_rows:,} of {len(table.rows):,} rows{all_in_csv}")
        ctx = self.context(name, slot_utc, table, shown, notes)
        ctx.update(extra or {})
        if reader is not None:
            ctx["reader"] = dict(reader)  # a burst reader's address and parameters
        # Charts are drawn once, over every row, before any template places them.
        drawn = {key: charts_mod.render(name, key, chart, ctx["all_rows"]) for key, chart in report.charts.items()}
        ctx["charts"] = drawn
        subject = one_line(self._render_string(self.text_env, report.subject, ctx, name, "subject"))
        ctx["subject"] = subject
        html, text = self._bodies(report, ctx)
        pdf = None
        if "pdf" in report.formats:
            pdf = self.pdf(charts_mod.for_pdf(html, name, list(drawn.values())))
            if len(pdf) > max_bytes:
                notes.append(_too_big("PDF", len(pdf), max_bytes))
                pdf = None
                html, text = self._bodies(report, {**ctx, "notes": list(notes)})
        html = htmlmail.for_email(html)
        if htmlmail.size(html) > htmlmail.MAX_BODY_BYTES and shown.rows:
            rows_note = len(shown.rows) < len(table.rows)
            more_in = full or ("PDF" if pdf is not None else None)
            # Rows dominate the size: start the search near the share of rows that fits.
            most = min(len(shown.rows) - 1, int(len(shown.rows) * htmlmail.MAX_BODY_BYTES / htmlmail.size(html) * 1.5))
            html, text, notes = self._fit_body(report, ctx, table, notes[1:] if rows_note else notes, most, more_in)
        local = slot_utc.astimezone(self.config.zone(report))
        return Rendered(name, slot_utc, subject, html, text, pdf, data, len(table.rows), tuple(notes), local, sheet, tuple(drawn.values()))

    def _fit_body(
        self, report: Report, ctx: dict[str, Any], table: Table, other_notes: list[str], most: int, more_in: str | None
    ) -> tuple[str, str, list[str]]:
        """The bodies with as many rows (up to MOST) as keep the HTML under MAX_BODY_BYTES, so no client
        clips it, and a note saying how many more rows the attachment has. A binary search: log2(MOST) renders."""
        total = len(table.rows)

        def attempt(n: int) -> tuple[str, str, list[str]]:
            where = f"; the other {total - n:,} are in the attached {more_in}." if more_in else f"; {total - n:,} more are not shown."
            notes = [f"This email shows the first {n:,} of {total:,} rows{where}", *other_notes]
            html, text = self._bodies(report, {**ctx, "rows": ctx["all_rows"][:n], "rows_shown": n, "notes": notes})
            return htmlmail.for_email(html), text, notes

        low, high = 0, most
        best = None
        while low <= high:
            middle = (low + high) // 2
            found = attempt(middle)
            if htmlmail.size(found[0]) <= htmlmail.MAX_BODY_BYTES:
                best, low = found, middle + 1
            else:
                high = middle - 1
        return best or attempt(0)

    def _bodies(self, report: Report, ctx: dict[str, Any]) -> tuple[str, str]:
        """HTML and text bodies; notes and footer are added to any template that does not show them itself."""
        text_template = report.text_template or "default.txt"
        drawn: dict[str, RenderedChart] = ctx.get("charts", {})
        name = ctx["report"]["name"]
        html = self._render_file(self.html_env, report.template, {**ctx, "chart": _chart_function("html", name, drawn)})
        text = self._render_file(self.text_env, text_template, {**ctx, "chart": _chart_function("text", name, drawn)})
        notes = ctx["notes"]
        if notes and not self._uses_name(self.html_env, report.template, "notes"):
            html = _html_with_notes(html, notes)
        if notes and not self._uses_name(self.text_env, text_template, "notes"):
            text = "\n".join(notes) + "\n\n" + text
        end: Footer = ctx["footer"]
        if not self._uses_name(self.html_env, report.template, "footer"):
            html = _html_with_footer(html, end.html())
        # Charts the template did not place go at the end, above the footer.
        html = charts_mod.with_unplaced(html, name, list(drawn.values()), end.html())
        if not self._uses_name(self.text_env, text_template, "footer"):
            text = text.rstrip("\n") + "\n\n" + end.text()
        return html, text

    def _csv(self, table: Table, bom: bool) -> bytes:
        try:
            return to_csv(table, bom)
        except INTERRUPTS:
            raise
        except Exception as exc:  # noqa: BLE001 - a data value whose str() fails must not crash a worker
            raise RenderError(f"CSV: a value could not be written: {type(exc).__name__}: {exc}") from None

    def _xlsx(self, table: Table, name: str) -> bytes:
        try:
            return to_xlsx(table, self.config.zone(self.config.reports[name]), name)
        except INTERRUPTS:
            raise
        except Exception as exc:  # noqa: BLE001 - as for CSV: a value that cannot be written must not crash a worker
            raise RenderError(f"XLSX: a value could not be written: {type(exc).__name__}: {exc}") from None

    def _uses_name(self, env: SandboxedEnvironment, template: str, name: str) -> bool:
        """Whether TEMPLATE (or one it extends, includes or imports) uses the variable NAME."""
        key = (id(env), template, name)
        if key not in self._uses:
            self._uses[key] = False  # guards against a template that includes itself
            try:
                source, _, _ = env.loader.get_source(env, template)  # type: ignore[union-attr]
                ast = env.parse(source)
            except jinja2.TemplateError:
                return False
            refs = [r for r in jinja2.meta.find_referenced_templates(ast) if r is not None]
            used = name in jinja2.meta.find_undeclared_variables(ast) or any(self._uses_name(env, r, name) for r in refs)
            self._uses[key] = used
        return self._uses[key]

    def pdf(self, html: str) -> bytes:
        """HTML -> PDF with 'Page N of M' footers; ResourceFetcher decides what it may load."""
        # Both import WeasyPrint (about 2 s): on the first PDF, not in `reporter validate`, beat or a
        # config load (checks.py imports this module for TemplateCheck).
        import weasyprint

        from reporter.fetch import ResourceFetcher

        fetcher = ResourceFetcher(self.config.templates_dir, self.config.defaults.pdf_allowed_hosts)
        try:
            with _FONTS.lock:
                fonts = _FONTS.take()
                page_css = weasyprint.CSS(filename=str(BUILTIN_TEMPLATES / "page.css"), url_fetcher=fetcher, font_config=fonts)
                document = weasyprint.HTML(string=html, base_url=str(self.config.templates_dir.resolve()) + "/", url_fetcher=fetcher)
                pdf: bytes | None = document.write_pdf(stylesheets=[page_css], font_config=fonts)
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


class TemplateCheck:
    """Syntax checks of templates before any run. Each distinct string and file is parsed once, so a
    config with many reports on one template costs one parse."""

    def __init__(self, templates_dir: Path, templates: Mapping[str, str]) -> None:
        self.templates_dir = templates_dir
        self.html_env, self.text_env = environments(templates_dir, templates)
        self._strings: dict[str, str | None] = {}
        self._files: dict[tuple[bool, str, tuple[str, ...]], list[tuple[str, int | None, str]]] = {}

    def string(self, source: str) -> str | None:
        """Why SOURCE (a subject) is not a valid template, or None."""
        if source not in self._strings:
            try:
                self.text_env.parse(source)
                self._strings[source] = None
            except jinja2.TemplateSyntaxError as exc:
                self._strings[source] = f"template syntax error: {exc.message}"
        return self._strings[source]

    def file(self, template: str, html: bool, charts: tuple[str, ...] = ()) -> list[tuple[str, int | None, str]]:
        """(file, line, message) of each syntax error in TEMPLATE and the templates it extends, includes or
        imports, and of each `chart('name')` naming a chart that is not in CHARTS (the report's)."""
        key = (html, template, charts)
        if key not in self._files:
            self._files[key] = self._file(self.html_env if html else self.text_env, template, None, set(), charts)
        return self._files[key]

    def _file(
        self, env: SandboxedEnvironment, template: str, used_by: str | None, seen: set[str], charts: tuple[str, ...]
    ) -> list[tuple[str, int | None, str]]:
        if template in seen:
            return []
        seen.add(template)
        try:
            source, filename, _ = env.loader.get_source(env, template)  # type: ignore[union-attr]
        except jinja2.TemplateNotFound as exc:
            if used_by is None:
                return []  # the report's own template missing is reported by the config check
            return [(str(self.templates_dir), None, f"template {exc.name!r} (used by {used_by}) not found")]
        try:
            ast = env.parse(source, template, filename)
        except jinja2.TemplateSyntaxError as exc:
            return [(filename or template, exc.lineno, f"template syntax error: {exc.message}")]
        out: list[tuple[str, int | None, str]] = []
        for call in ast.find_all(jinja2.nodes.Call):
            named = call.args[0] if call.args else None
            if isinstance(call.node, jinja2.nodes.Name) and call.node.name == "chart" and isinstance(named, jinja2.nodes.Const):
                if named.value not in charts:
                    known = ", ".join(charts) or "none; declare them under the report's charts:"
                    out.append(
                        (filename or template, call.lineno, f"chart({named.value!r}): no such chart (this report's charts: {known})")
                    )
        for ref in jinja2.meta.find_referenced_templates(ast):
            if ref is not None:
                out.extend(self._file(env, ref, template, seen, charts))
        return out


FONT_CONFIG_USES = 200
"""PDFs rendered with one WeasyPrint FontConfiguration before a new one is made."""


class _SharedFonts:
    """One WeasyPrint FontConfiguration for many PDFs.

    WeasyPrint makes a new one per document when given none, and each leaves about 220 KiB behind in
    fontconfig and Pango that no garbage collection frees: a worker grew by that much per PDF, for
    good. Shared, the growth stops. It is renewed every FONT_CONFIG_USES renders, so that fonts a
    template adds with @font-face (kept by the configuration) cannot pile up either; the lock keeps
    a threaded pool from using one configuration in two renders at once.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._fonts: Any = None
        self._uses = 0

    def take(self) -> Any:
        """The configuration for the next PDF; call with the lock held."""
        from weasyprint.text.fonts import FontConfiguration

        if self._fonts is None or self._uses >= FONT_CONFIG_USES:
            self._fonts, self._uses = FontConfiguration(), 0
        self._uses += 1
        return self._fonts


_FONTS = _SharedFonts()


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


def _chart_function(kind: str, report: str, drawn: dict[str, RenderedChart]) -> Any:
    """`chart('name')` for templates: the chart's image in HTML, its title in text."""

    def chart(name: str) -> Any:
        if name not in drawn:
            raise ValueError(f"no chart named {name!r}; this report's charts: {', '.join(drawn) or 'none (add them under charts:)'}")
        shown = charts_mod.placeholder(kind, report, drawn[name])
        return Markup(shown) if kind == "html" else shown

    return chart


BODY_END_RE = re.compile(r"</body\s*>", re.IGNORECASE)


def _html_with_footer(html: str, block: str) -> str:
    """HTML with the footer BLOCK at the end of the body."""
    found = list(BODY_END_RE.finditer(html))
    return html[: found[-1].start()] + block + html[found[-1].start() :] if found else html + block


def _html_with_notes(html: str, notes: list[str]) -> str:
    """HTML with NOTES in a box at the top of the body, for templates that do not show them."""
    block = f'<div class="reporter-notes" style="{NOTES_STYLE}">' + "".join(f"<p>{html_lib.escape(n)}</p>" for n in notes) + "</div>"
    match = BODY_RE.search(html)
    return html[: match.end()] + block + html[match.end() :] if match else block + html
