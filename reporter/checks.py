"""Everything `reporter validate` checks, in one pass; every command loads its config through here.

reporter.config reads the file (schema, crons, references between fields). This adds what needs
more than the file: templates compiled (subject, body, text, query parameters), data functions
imported and checked callable, datasource drivers importable. These run on the raw data of every
report whose own field can be read, so a schema error elsewhere never hides a template error.

`load_checked` has no side effects beyond reading files and importing the data functions' modules
(and the database drivers), so a long-running process may call it on every change of the file.
`connect_problems` (for `validate --connect`) is the one that opens connections.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reporter import defaults
from reporter.config import Config, Datasource, Draft, read
from reporter.errors import ConfigError, DeliveryError, Problem
from reporter.settings import Settings, mask_url

FUNCTION_RE = re.compile(r"^[\w.]+:[\w.]+$")

_PRINT = r"""\{\{(?:[^{}'"\\]|'[^'{}\\]*'|"[^"{}\\]*")*\}\}"""
"""A `{{ ... }}` with no brace or backslash inside it, save the closing pair; its strings hold none either."""
_SIMPLE_TEMPLATE_RE = re.compile(rf"[^{{}}]*(?:{_PRINT}[^{{}}]*)*")
_PRINT_RE = re.compile(f"({_PRINT})")


def load_checked(path: Path, environ: Mapping[str, str], templates_dir: Path) -> Config:
    """The Config in PATH if everything passes; else ConfigError listing every problem, sorted by line."""
    return checked(read(path, environ, templates_dir))


def checked(draft: Draft) -> Config:
    """DRAFT's Config if everything passes; else ConfigError listing every problem, sorted by line."""
    problems = [*draft.problems, *content_problems(draft)]
    if problems or draft.config is None:
        # The config file's problems by line, then those in template files, file by file.
        raise ConfigError(sorted(dict.fromkeys(problems), key=lambda p: (p.file != draft.file, p.file, p.line or 0, p.field)))
    return draft.config


def content_problems(draft: Draft) -> list[Problem]:
    """Templates, query parameters, data functions and datasource drivers of DRAFT, field by field."""
    if draft.data is None:
        return []
    from reporter.data import params_problem
    from reporter.render import TemplateCheck

    templates = TemplateCheck(draft.templates_dir, draft.templates)
    functions = _Cached(lambda spec: _function_problem(spec, Path(draft.file).parent))
    reader_functions = _Cached(lambda spec: _function_problem(spec, Path(draft.file).parent, reader=True))
    drivers = _Cached(_driver_problem)
    # Compiling a parameter costs about a millisecond, and most reports share the same few ("{{ slot.date() }}").
    params_check = _Cached(params_problem)
    # Subjects differ in their text ("Sales {{ slot.date() }} for region 5") far more than in their tags.
    shapes = _Cached(templates.string)

    def subject_problem(subject: str) -> str | None:
        shape = template_shape(subject)
        if shape is None or shapes(shape) is not None:
            return templates.string(subject)  # its own message (the same, but said of its own text)
        return None

    out: list[Problem] = []

    def bad(loc: tuple[str | int, ...], message: str, file: str | None = None, line: int | None = None) -> None:
        field = ".".join(str(part) for part in loc)
        out.append(Problem(file or draft.file, line if file else draft.line_of(*loc), field, message))

    for name, source in _mapping(draft.data, "datasources"):
        url = source.get("url")
        if isinstance(url, str) and url.strip() and (why := drivers(url)):
            bad(("datasources", name, "url"), why)

    for name, report in _mapping(draft.data, "reports"):
        loc = ("reports", name)
        subject = report.get("subject")
        if isinstance(subject, str) and (why := subject_problem(subject)):
            bad((*loc, "subject"), why)
        for key, html in (("template", True), ("text_template", False)):
            template = report.get(key)
            if isinstance(template, str):
                charts = report.get("charts")
                declared = tuple(str(c) for c in charts) if isinstance(charts, dict) else ()
                for file, line, why in templates.file(template, html=html, charts=declared):
                    bad((*loc, key), why, file, line)
        recovered = report.get("recovered")
        if isinstance(recovered, dict):  # an alert's recovered email may have its own subject and templates
            if isinstance(recovered.get("subject"), str) and (why := subject_problem(recovered["subject"])):
                bad((*loc, "recovered", "subject"), why)
            for key, html in (("template", True), ("text_template", False)):
                if isinstance(template := recovered.get(key), str):
                    charts = report.get("charts")
                    declared = tuple(str(c) for c in charts) if isinstance(charts, dict) else ()
                    for file, line, why in templates.file(template, html=html, charts=declared):
                        bad((*loc, "recovered", key), why, file, line)
        burst = report.get("burst") if isinstance(report.get("burst"), dict) else None
        for where, holder in (((*loc,), report), ((*loc, "burst"), burst or {})):
            query = holder.get("query")
            params = query.get("params") if isinstance(query, dict) else None
            if isinstance(params, dict):
                for key, value in params.items():
                    if isinstance(value, str) and (why := params_check(value)):
                        bad((*where, "query", "params", key), why)
            function = holder.get("function")
            # A burst report's own data function is called with each reader's row as reader=.
            check = reader_functions if burst is not None and holder is report else functions
            if isinstance(function, str) and FUNCTION_RE.match(function) and (why := check(function)):
                bad((*where, "function"), why)
    return out


def template_shape(text: str) -> str | None:
    """TEXT with its plain text between `{{ ... }}` tags replaced by 'x', when that cannot change whether
    it parses; None for any other template.

    Jinja lexes text without a brace as data, whatever it holds, and the parser never looks into data.
    So when the only braces are those of `{{ ... }}` tags (none in their strings, no backslash to
    escape a quote), TEXT and its shape give the same tokens but for the data, and parse alike.
    """
    if _SIMPLE_TEMPLATE_RE.fullmatch(text) is None:
        return None
    parts = _PRINT_RE.split(text)
    return "".join(part if i % 2 or not part else "x" for i, part in enumerate(parts))


def _mapping(data: dict[str, Any], key: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The (name, entry) pairs of section KEY whose entry is a mapping: the ones whose fields can be read."""
    section = data.get(key)
    if isinstance(section, dict):
        for name, entry in section.items():
            if isinstance(entry, dict):
                yield str(name), entry


class _Cached:
    """A check run once per distinct value: twenty reports on one function import it once."""

    def __init__(self, check: Callable[[str], str | None]) -> None:
        self._check = check
        self._seen: dict[str, str | None] = {}

    def __call__(self, value: str) -> str | None:
        if value not in self._seen:
            self._seen[value] = self._check(value)
        return self._seen[value]


def _function_problem(spec: str, folder: Path, reader: bool = False) -> str | None:
    from reporter.data import import_function

    try:
        import_function(spec, folder, reader=reader)
    except ValueError as exc:
        return str(exc)
    return None


def _driver_problem(url: str) -> str | None:
    """Why URL's SQLAlchemy dialect or database driver cannot be loaded; None if it can."""
    import sqlalchemy as sa
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = sa.make_url(url)
    except (ArgumentError, ValueError):
        return None  # reporter.config says the URL is malformed
    try:
        dialect: Any = parsed.get_dialect()
        dialect.import_dbapi()
    except NoSuchModuleError:
        return f"no SQLAlchemy dialect {parsed.drivername!r}; check the part before '://' (for example 'postgresql+psycopg')"
    except ImportError as exc:
        return f"the database driver for {parsed.drivername!r} is not installed ({exc}); install it, or name another driver in the URL"
    return None


# --------------------------------------------------------------------------- --connect


@dataclass(frozen=True)
class Reach:
    """What `validate --connect` found for one outside service: what, where (no password), why not.

    SKIPPED says why nothing was opened (no SMTP server set, a SQLite file still to be made).
    """

    what: str
    where: str
    problem: str | None = None
    skipped: str = ""
    detail: str = ""

    def __str__(self) -> str:
        if self.problem:
            verdict = f"does not answer: {self.problem}"
        elif self.skipped:
            verdict = f"not opened: {self.skipped}"
        else:
            verdict = "answers" + (f" ({self.detail})" if self.detail else "")
        return f"{self.what} ({self.where}): {verdict}"


def connect_problems(config: Config, settings: Settings, timeout: float = defaults.CONNECT_CHECK_TIMEOUT) -> list[Reach]:
    """Open each datasource (SELECT 1) and the SMTP server (EHLO, STARTTLS, AUTH, QUIT): one Reach each."""
    out = [_open_datasource(name, source, config, timeout) for name, source in sorted(config.datasources.items())]
    out.append(_open_smtp(settings, timeout))
    return out


def _open_datasource(name: str, source: Datasource, config: Config, timeout: float) -> Reach:
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    from reporter.data import db_error

    where = mask_url(source.url)
    url = sa.make_url(source.url)
    backend = url.get_backend_name()
    if backend == "sqlite" and url.database not in (None, "", ":memory:") and not str(url.database).startswith("file:"):
        # Connecting would create an empty file; say what is there instead.
        if not Path(str(url.database)).exists():
            seed = config.seed_path(source)
            if seed is not None:
                return Reach(f"datasource {name}", where, skipped=f"the file is made from {seed} on first use")
            return Reach(f"datasource {name}", where, f"the database file {url.database} does not exist")
    connect_args: dict[str, Any] = {"connect_timeout": max(1, int(timeout))} if backend in ("postgresql", "mysql", "mariadb") else {}
    try:
        engine = sa.create_engine(url, poolclass=NullPool, connect_args=connect_args)
    except (sa.exc.ArgumentError, ImportError) as exc:
        return Reach(f"datasource {name}", where, db_error(exc, source.url))
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - drivers raise their own kinds too; every one means "does not answer"
        return Reach(f"datasource {name}", where, db_error(exc, source.url))
    finally:
        engine.dispose()
    return Reach(f"datasource {name}", where)


def _open_smtp(settings: Settings, timeout: float) -> Reach:
    from reporter.mail import SmtpSettings, SmtpTransport

    if not settings.smtp_url:
        return Reach("mail", f"Maildir {settings.outbox.resolve()}", skipped="no SMTP server set (REPORTER_SMTP_URL); mail goes to files")
    smtp = SmtpSettings.from_url(settings.smtp_url)
    smtp = dataclasses.replace(smtp, timeout=min(smtp.timeout, timeout))
    transport = SmtpTransport(smtp)
    try:
        transport.probe()
    except DeliveryError as exc:
        return Reach("mail", transport.describe(), str(exc))
    return Reach("mail", transport.describe(), detail=f"logged in as {smtp.user!r}" if smtp.user else "")
