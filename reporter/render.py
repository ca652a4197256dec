"""Render a report slot once: subject, HTML and text bodies, PDF (WeasyPrint) and CSV.

Templates run in Jinja2's sandbox with StrictUndefined: a typo in a name is an error that names the
template and line, never an empty cell. HTML templates autoescape; subject and text do not.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import jinja2
import jinja2.meta
from jinja2.sandbox import SandboxedEnvironment
from weasyprint.urls import URLFetcher

from reporter.config import Config
from reporter.data import Datasources, Table
from reporter.errors import INTERRUPTS, Problem, RenderError

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

    def context(self, name: str, slot_utc: datetime, table: Table) -> dict[str, Any]:
        """What every template sees."""
        report = self.config.reports[name]
        slot = slot_utc.astimezone(self.config.zone(report))
        return {
            "report": self.meta(name),
            "slot": slot,
            "slot_utc": slot_utc,
            "columns": list(table.columns),
            "rows": table.dicts(),
            "row_count": len(table.rows),
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
        report = self.config.reports[name]
        ctx = self.context(name, slot_utc, table)
        subject = " ".join(self._render_string(self.text_env, report.subject, ctx, f"reports.{name}.subject").split())
        html = self._render_file(self.html_env, report.template, ctx)
        text = self._render_file(self.text_env, report.text_template or "default.txt", ctx)
        pdf = self.pdf(html) if "pdf" in report.formats else None
        data = to_csv(table) if "csv" in report.formats else None
        return Rendered(name, slot_utc, subject, html, text, pdf, data, len(table.rows))

    def pdf(self, html: str) -> bytes:
        """HTML -> PDF with 'Page N of M' footers. Only files under the templates folder are fetched."""
        import weasyprint  # heavy; imported on first PDF, not by `reporter validate`

        fetcher = TemplatesOnlyFetcher(self.config.templates_dir)
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
        except jinja2.TemplateSyntaxError as exc:
            raise RenderError(f"template {exc.filename or template}:{exc.lineno}: {exc.message}") from None
        except jinja2.TemplateNotFound as exc:
            raise RenderError(f"template {exc.name!r} not found in {self.config.templates_dir}") from None
        except jinja2.UndefinedError as exc:
            raise RenderError(f"template {template}:{_template_line(exc, template)}: {exc.message}") from None
        except jinja2.TemplateError as exc:
            raise RenderError(f"template {template}: {exc}") from None

    def _render_string(self, env: SandboxedEnvironment, source: str, ctx: dict[str, Any], where: str) -> str:
        try:
            return env.from_string(source).render(ctx)
        except jinja2.TemplateError as exc:
            raise RenderError(f"{where}: {getattr(exc, 'message', None) or exc}") from None

    def problems(self) -> list[Problem]:
        """Template syntax errors in every report's subject and template files, found before any run."""
        out: list[Problem] = []
        file = str(self.config.source)
        for name, report in self.config.reports.items():
            try:
                self.text_env.parse(report.subject)
            except jinja2.TemplateSyntaxError as exc:
                out.append(Problem(file, None, f"reports.{name}.subject", f"template syntax error: {exc.message}"))
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


def _template_line(exc: BaseException, template: str) -> str:
    tb = exc.__traceback__
    line = "?"
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(template):
            line = str(tb.tb_lineno)
        tb = tb.tb_next
    return line


class TemplatesOnlyFetcher(URLFetcher):  # type: ignore[misc]
    """WeasyPrint URL fetcher: data: URLs and files under ROOT only; anything else is refused.

    A refused resource is logged and left out; the PDF still renders.
    """

    def __init__(self, root: Path) -> None:
        super().__init__(allowed_protocols={"file", "data"}, allow_redirects=False, fail_on_errors=False)
        self.root = root.resolve()

    def fetch(self, url: str, headers: Any = None) -> Any:
        scheme = url.split(":", 1)[0].lower()
        if scheme == "file":
            path = Path(unquote(urlsplit(url).path)).resolve()
            if not path.is_relative_to(self.root):
                log.warning("refused to fetch %s: outside the templates folder", url)
                raise ValueError(f"refused: {url} is outside the templates folder")
        elif scheme != "data":
            log.warning("refused to fetch %s: only files under the templates folder and data: URLs", url)
            raise ValueError(f"refused: {url}")
        return super().fetch(url, headers)
