"""schedules.yaml -> a typed, immutable Config. Every problem is reported at once, with file and line.

Loading happens in three passes so one mistake never hides another:
1. YAML to plain data, remembering the line of every key and value (duplicate keys are errors);
2. ``${VAR}`` expansion from the environment;
3. the pydantic model, then checks across fields (datasources, templates, crons, time limits).

The YAML itself is read by reporter.yamldoc, with bounded effort. What needs more than the file
(templates compiled, data functions imported) is in reporter.checks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import gc
import hashlib
import ipaddress
import math
import re
import zoneinfo
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from email.utils import getaddresses
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import email_validator
from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from reporter import defaults as dflt
from reporter.alert import NAMES as ALERT_NAMES
from reporter.alert import expression_problem, names_used, parse_duration
from reporter.errors import ConfigError, Problem
from reporter.schedule import cron_problem
from reporter.yamldoc import Path_, read_yaml
from reporter.yamldoc import dotted as _dotted

KNOWN_TASKS = dflt.BEAT_TASKS
"""Task names a beat entry may name (email_reports.send needs a report and a slot, so it cannot be one)."""

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\$")
LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
HOST_RE = re.compile(rf"^(?:\*\.)?{LABEL}(?:\.{LABEL})*$")
PLAIN_ADDRESS_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+")
NAMED_ADDRESS_RE = re.compile(r"([A-Za-z0-9]+(?: [A-Za-z0-9]+)*) <([A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+)>")
"""'Ann Lee <ann@example.com>': a name of plain words, one space apart, which the header parser returns as written."""
CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""C0 and C1 control characters and the Unicode line and paragraph separators: never in an address."""
_ATOM = r"[A-Za-z0-9_%+-]+"
_FAST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
FAST_ADDRESS_RE = re.compile(rf"({_ATOM}(?:\.{_ATOM})*)@({_FAST_LABEL}(?:\.{_FAST_LABEL})*)")
"""A bare ASCII address email-validator accepts as written, its domain only lower-cased: see _fast_address."""

# email-validator refuses special-use domains (.local, localhost, .test, .internal's kin) because its
# usual input is a stranger's sign-up form. Ours is the operator's own config and command line, and
# company relays deliver to such domains every day: whether a mailbox exists is the mail server's call.
# Emptying this list is the library's documented switch for it (its README, "Test addresses").
email_validator.SPECIAL_USE_DOMAIN_NAMES.clear()


# --------------------------------------------------------------------------- the model


class _Model(BaseModel):
    # allow_inf_nan=False: `.inf` or `.nan` as a time limit, size or count is a mistake, never a setting.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _valid_cron(value: str) -> str:
    if (why := cron_problem(value)) is not None:
        raise ValueError(why)
    return value


def _byte_size(value: Any) -> Any:
    """10000000, '10 MB', '500kB' or '2 MiB' -> bytes; anything else is left for the type check."""
    if not isinstance(value, str):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|kB|KB|MB|GB|KiB|MiB|GiB)?\s*", value)
    if not match:
        raise ValueError(f"{value!r} is not a size; write bytes (10000000) or a size such as '10 MB' or '500 kB'")
    unit = {"B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[match.group(2) or "B"]
    size = float(match.group(1)) * unit
    if not math.isfinite(size):
        raise ValueError(f"{value!r} is too large to be a size")
    return int(size)


def _valid_zone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {value!r}; use an IANA name such as 'UTC' or 'Europe/Berlin'") from None
    return value


def _valid_address(value: str) -> str:
    return normalize_address(value)


def _valid_rate(value: str) -> str:
    parse_rate(value)
    return value


def _valid_task(value: str) -> str:
    if value not in KNOWN_TASKS:
        raise ValueError(f"unknown task {value!r}{_did_you_mean(value, KNOWN_TASKS)}; known: {', '.join(KNOWN_TASKS)}")
    return value


def _valid_function(value: str) -> str:
    if not re.match(r"^[\w.]+:[\w.]+$", value):
        raise ValueError("must be 'module:function', for example 'mypackage.reports:sales'")
    return value


def _valid_host(value: str) -> str:
    """A host name, '*.example.com' or an IP address -> lower case, ASCII (IDNA) form."""
    text = value.strip().lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(text.removeprefix("[").removesuffix("]")))
    except ValueError:
        pass
    wildcard = text.startswith("*.")
    try:
        host = ("*." if wildcard else "") + (text[2:] if wildcard else text).encode("idna").decode("ascii")
    except UnicodeError:
        host = ""
    if not HOST_RE.match(host):
        raise ValueError(
            f"{value!r} is not a host name; write the host only, such as 'cdn.example.com' or '*.example.com' (no scheme, port or path)"
        )
    return host


def _valid_unsubscribe_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname or any(c.isspace() or c in "<>," for c in value):
        raise ValueError(f"{value!r} is not an https:// URL; one-click unsubscribe (RFC 8058) needs https")
    return value


def _non_empty(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ValueError("is empty; list at least one address")
    return value


def _valid_expression(value: str) -> str:
    if (why := expression_problem(value)) is not None:
        raise ValueError(why)
    return value


def _duration(value: Any) -> float:
    return parse_duration(value)


Cron = Annotated[str, AfterValidator(_valid_cron)]
Zone = Annotated[str, AfterValidator(_valid_zone)]
Address = Annotated[str, AfterValidator(_valid_address)]
Rate = Annotated[str, AfterValidator(_valid_rate)]
Host = Annotated[str, AfterValidator(_valid_host)]
Rows = Annotated[int, Field(gt=0)]
Bytes = Annotated[int, Field(gt=0), BeforeValidator(_byte_size)]
Seconds = Annotated[float, Field(gt=0)]
HttpsUrl = Annotated[str, AfterValidator(_valid_unsubscribe_url)]
Expression = Annotated[str, AfterValidator(_valid_expression)]
Duration = Annotated[float, BeforeValidator(_duration)]
"""'30m', '24h', '2d', '1h30m' or a number of seconds, as seconds."""


class Defaults(_Model):
    sender: Address = dflt.SENDER
    rate_limit: Rate = dflt.RATE_LIMIT
    soft_time_limit: Annotated[float, Field(gt=0)] = dflt.SOFT_TIME_LIMIT
    time_limit: Annotated[float, Field(gt=0)] = dflt.TIME_LIMIT
    max_retries: Annotated[int, Field(ge=0)] = dflt.MAX_RETRIES
    catch_up_grace: Annotated[float, Field(ge=0)] = dflt.CATCH_UP_GRACE
    retention_days: Annotated[int, Field(gt=0)] = dflt.RETENTION_DAYS
    max_rows: Rows = dflt.MAX_ROWS
    """Rows shown in the HTML body, text part and PDF; the CSV has them all."""
    max_attachment_bytes: Bytes = dflt.MAX_ATTACHMENT_BYTES
    query_timeout: Seconds = dflt.QUERY_TIMEOUT
    csv_bom: bool = True
    unsubscribe_url: HttpsUrl | None = None
    """An https URL for one-click unsubscribe (List-Unsubscribe-Post); without one, mailto: the owners."""
    """Start CSV attachments with a UTF-8 byte order mark, so Excel reads them as UTF-8."""
    pdf_allowed_hosts: tuple[Host, ...] = ()
    """http(s) hosts a PDF may load images and stylesheets from (public addresses only)."""
    beat_lock_timeout: Annotated[float, Field(ge=5, le=600)] = dflt.BEAT_LOCK_TIMEOUT


class Datasource(_Model):
    url: str
    seed: str | None = None
    """SQL script run once when the database has no tables yet (demo and test data)."""


class BeatEntry(_Model):
    task: Annotated[str, AfterValidator(_valid_task)]
    cron: Cron
    timezone: Zone | None = None


class Query(_Model):
    datasource: str
    sql: str
    # A factory, not `= {}`: pydantic deep-copies a mutable default for every model, 10 us each.
    params: dict[str, Any] = Field(default_factory=dict)


Format = Literal["html", "pdf", "csv", "xlsx"]

D3_FORMAT_RE = re.compile(r"[^{}]?[<>=^]?[-+( ]?[$#]?0?\d*,?(?:\.\d+)?~?[%bcdeEfgGnoprsxX]?")


def _valid_d3_format(value: str) -> str:
    if not D3_FORMAT_RE.fullmatch(value):
        raise ValueError(f"{value!r} is not a d3 number format such as ',.2f' (1,234.50), '.0%' or '$,.0f'")
    return value


def _valid_axis_format(value: str) -> str:
    """A d3 number format, or a d3 time format such as '%d %b' for a time axis."""
    if "%" in value and re.fullmatch(r"(?:[^%]|%[-_0]?[a-zA-Z%])*", value) and not D3_FORMAT_RE.fullmatch(value):
        return value
    return _valid_d3_format(value)


def _no_outside_references(value: dict[str, Any]) -> dict[str, Any]:
    from reporter.charts import outside_references  # charts imports this module's Chart

    if "data" in value and value["data"] != {}:
        raise ValueError("must not have 'data': reporter puts the report's rows in")
    found = list(outside_references(value))
    if found:
        raise ValueError(f"would load from outside ({', '.join(found)}); a chart may only show the report's rows")
    return value


class Chart(_Model):
    """A chart over the report's rows: a simple declaration, or a whole Vega-Lite spec."""

    type: Literal["bar", "line", "area", "pie"] | None = None
    title: str | None = None
    x: str | None = None
    """The field along the x axis (for a pie: the field that names each slice)."""
    y: str | None = None
    """The number field (for a pie: the size of each slice)."""
    aggregate: Literal["sum", "mean", "median", "min", "max", "count", "none"] = "sum"
    """How rows with the same x (and series) become one value."""
    series: str | None = None
    """A field that splits the data into coloured series."""
    stack: bool = True
    """Bars and areas of several series: stacked (true) or side by side (false)."""
    x_type: Literal["nominal", "ordinal", "quantitative", "temporal"] | None = None
    x_title: str | None = None
    y_title: str | None = None
    series_title: str | None = None
    x_format: Annotated[str, AfterValidator(_valid_axis_format)] | None = None
    y_format: Annotated[str, AfterValidator(_valid_d3_format)] | None = None
    width: Annotated[int, Field(ge=50, le=2000)] = 520
    height: Annotated[int, Field(ge=50, le=2000)] = 220
    vega_lite: Annotated[dict[str, Any], AfterValidator(_no_outside_references)] | None = None
    """A whole Vega-Lite spec (without data) for anything the simple keys do not cover."""


class Recovered(_Model):
    """The email an alert sends once when its condition stops holding; unset keys are the report's own."""

    subject: str | None = None
    template: str | None = None
    text_template: str | None = None


def _recovered(value: Any) -> Any:
    """`recovered: true` is the report's own subject and templates; false is none; a mapping is left to Recovered."""
    if isinstance(value, bool):
        return {} if value else None
    if value is None or isinstance(value, dict):
        return value
    raise ValueError(f"must be true, false or a mapping with subject, template or text_template, not {value!r}")


class Burst(_Model):
    """A burst report's readers: a query or data function returning one row per reader."""

    query: Query | None = None
    function: Annotated[str, AfterValidator(_valid_function)] | None = None
    address: str = "address"
    """The column holding each reader's address; every other column is a parameter of the reader's slice."""


class Report(_Model):
    schedule: Cron
    timezone: Zone | None = None
    subject: str
    template: str
    text_template: str | None = None
    query: Query | None = None
    function: Annotated[str, AfterValidator(_valid_function)] | None = None
    formats: tuple[Format, ...] = ("html",)
    # Required unless the report has `burst:` (checked in _check, with the message pydantic would give).
    recipients: Annotated[tuple[Address, ...], AfterValidator(_non_empty)] = ()
    cc: tuple[Address, ...] = ()
    bcc: tuple[Address, ...] = ()
    owners: tuple[Address, ...] = ()
    group: bool = False
    """One email to all recipients instead of one each."""
    enabled: bool = True
    sender: Address | None = None
    rate_limit: Rate | None = None
    max_retries: Annotated[int, Field(ge=0)] | None = None
    max_rows: Rows | None = None
    max_attachment_bytes: Bytes | None = None
    query_timeout: Seconds | None = None
    description: str | None = None
    csv_bom: bool | None = None
    unsubscribe_url: HttpsUrl | None = None
    charts: dict[str, Chart] = Field(default_factory=dict)
    when: Expression | None = None
    """An alert: send a slot only where this expression over `rows` holds (reporter/alert.py)."""
    value: Expression | None = None
    """A scalar over `rows` that the condition and templates see as `value`, the next slot as `previous.value`."""
    notify: Literal["each", "change"] = "each"
    renotify_after: Duration | None = None
    recovered: Annotated[Recovered | None, BeforeValidator(_recovered)] = None
    """true (or a mapping with its own subject and templates): one email when the condition stops holding."""
    burst: Burst | None = None
    """One email per reader, each with its own parameters (reporter.burst)."""

    @field_validator("formats")
    @classmethod
    def _unique_formats(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("lists a format twice")
        return value


class Config(_Model):
    timezone: Zone = dflt.TIMEZONE
    defaults: Defaults = Defaults()
    datasources: dict[str, Datasource] = {}
    beat: dict[str, BeatEntry] = {}
    reports: dict[str, Report]

    _source: Path = PrivateAttr(default=Path(dflt.CONFIG_PATH))
    _templates_dir: Path = PrivateAttr(default=Path(dflt.TEMPLATES_DIRNAME))
    _lines: dict[Path_, int] = PrivateAttr(default_factory=dict)
    _templates: dict[str, str] = PrivateAttr(default_factory=dict)
    _version: str = PrivateAttr(default="")
    _text: str = PrivateAttr(default="")

    @property
    def text(self) -> str:
        """The text of the config file this config was parsed from."""
        return self._text

    @property
    def version(self) -> str:
        """The content hash of schedules.yaml and the templates this config was loaded with."""
        return self._version

    @property
    def templates(self) -> Mapping[str, str]:
        """The text templates as they were when this config was loaded (name relative to templates_dir -> text).

        Rendering uses these, not the files, so a template edited after a config was loaded never mixes
        with it: an edit takes effect as part of a new version, once that version has passed every check.
        """
        return self._templates

    @property
    def source(self) -> Path:
        """The file this config was read from."""
        return self._source

    @property
    def templates_dir(self) -> Path:
        """Where the reports' templates are looked up."""
        return self._templates_dir

    def line_of(self, *loc: str | int) -> int | None:
        """The line in the source file where the field at LOC (or its nearest parent) is written."""
        while loc and loc not in self._lines:
            loc = loc[:-1]
        return self._lines.get(loc)

    def report(self, name: str) -> Report:
        """The report called NAME, or a ConfigError that lists the known names."""
        try:
            return self.reports[name]
        except KeyError:
            known = ", ".join(sorted(self.reports)) or "none"
            hint = _did_you_mean(name, self.reports)
            raise ConfigError([Problem(str(self.source), None, "reports", f"no report named {name!r}{hint} (known: {known})")]) from None

    def zone(self, report: Report) -> zoneinfo.ZoneInfo:
        """The report's own timezone, else the config's."""
        return zoneinfo.ZoneInfo(report.timezone or self.timezone)

    def sender_of(self, report: Report) -> str:
        return report.sender or self.defaults.sender

    def rate_of(self, report: Report) -> float:
        """The report's send rate in emails per second."""
        return parse_rate(report.rate_limit or self.defaults.rate_limit)

    def retries_of(self, report: Report) -> int:
        return self.defaults.max_retries if report.max_retries is None else report.max_retries

    def max_rows_of(self, report: Report) -> int:
        return report.max_rows or self.defaults.max_rows

    def attachment_cap_of(self, report: Report) -> int:
        return report.max_attachment_bytes or self.defaults.max_attachment_bytes

    def unsubscribe_url_of(self, report: Report) -> str | None:
        return report.unsubscribe_url or self.defaults.unsubscribe_url

    def csv_bom_of(self, report: Report) -> bool:
        return self.defaults.csv_bom if report.csv_bom is None else report.csv_bom

    def query_timeout_of(self, report: Report) -> float:
        return report.query_timeout or self.defaults.query_timeout

    def seed_path(self, source: Datasource) -> Path | None:
        return None if source.seed is None else self.source.parent / source.seed


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Draft:
    """A config file as far as it could be read: its data (after ${VAR} expansion; None if the file is
    not a YAML mapping), the line of every field, the problems found, and the Config if there are none."""

    file: str
    templates_dir: Path
    data: dict[str, Any] | None
    lines: dict[Path_, int]
    problems: list[Problem]
    config: Config | None
    templates: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """The text templates read with the file (what the config renders with)."""

    def line_of(self, *loc: str | int) -> int | None:
        """The line where the field at LOC (or its nearest parent) is written."""
        while loc and loc not in self.lines:
            loc = loc[:-1]
        return self.lines.get(loc)


def load(path: Path, environ: Mapping[str, str], templates_dir: Path | None = None) -> Config:
    """Read, expand and validate PATH. Raises ConfigError listing every problem found."""
    return _valid(read(path, environ, templates_dir))


def parse(text: str, file: str, environ: Mapping[str, str], templates_dir: Path, templates: Mapping[str, str] | None = None) -> Config:
    """Validate YAML TEXT (named FILE in messages). Raises ConfigError listing every problem found.

    TEMPLATES are the text templates read with it (by default, read from TEMPLATES_DIR now): the
    config renders with these, and its version is the hash of TEXT and them.
    """
    return _valid(draft(text, file, environ, templates_dir, templates))


def _valid(found: Draft) -> Config:
    if found.problems or found.config is None:
        raise ConfigError(_sorted(found.problems))
    return found.config


def read(path: Path, environ: Mapping[str, str], templates_dir: Path | None = None) -> Draft:
    """Read PATH into a Draft: as much of it as can be read, and every problem found on the way."""
    file = str(path)
    templates = templates_dir or path.parent / dflt.TEMPLATES_DIRNAME

    def unreadable(message: str) -> Draft:
        return Draft(file, templates, None, {}, [Problem(file, None, "", message)], None)

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return unreadable("file not found; set REPORTER_CONFIG or run from the folder that has it")
    except OSError as exc:
        return unreadable(f"cannot read: {exc.strerror}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return unreadable("not a UTF-8 text file; is this the right file?")
    if "\x00" in text:
        return unreadable("contains NUL bytes; not a YAML text file")
    return draft(text, file, environ, templates, read_templates(templates))


MAX_TEMPLATE_BYTES = 1_000_000
"""A file in the templates folder larger than this is not a template (it stays on disk, e.g. for a PDF image)."""

MAX_TEMPLATE_FILES = 5_000
"""Files read from the templates folder at most: a folder pointed at by mistake is not read whole."""


def read_templates(folder: Path) -> dict[str, str]:
    """Every UTF-8 text file under FOLDER (hidden ones aside), by its path relative to FOLDER."""
    out: dict[str, str] = {}
    if not folder.is_dir():
        return out
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        try:
            if path.stat().st_size > MAX_TEMPLATE_BYTES:
                continue
            out[relative.as_posix()] = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # images and other binary files are read from disk by the PDF renderer
        if len(out) >= MAX_TEMPLATE_FILES:
            break
    return out


def template_key(name: str) -> str | None:
    """NAME as a key of `Config.templates` ('./a//b.html' -> 'a/b.html'); None if it climbs out with '..'."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    return None if ".." in parts else "/".join(parts)


def version_of(raw: bytes, templates: Mapping[str, str]) -> str:
    """A short content hash of the config file's bytes and the templates: the configuration's version."""
    digest = hashlib.sha256(raw)
    for name in sorted(templates):
        digest.update(b"\x00" + name.encode() + b"\x00" + templates[name].encode())
    return digest.hexdigest()[:12]


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Pause Python's cyclic garbage collector (as it was before, after).

    Reading a config builds hundreds of thousands of dicts, lists and models, none of them in a cycle;
    while they pile up the collector walks them again and again, a third of the time a 10,000-report
    config takes to load. Reference counting still frees everything as usual meanwhile.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def draft(text: str, file: str, environ: Mapping[str, str], templates_dir: Path, templates: Mapping[str, str] | None = None) -> Draft:
    """Validate YAML TEXT (named FILE in messages) into a Draft; never raises ConfigError.
    TEMPLATES: as for `parse`."""
    with _no_cycle_collection():
        return _draft(text, file, environ, templates_dir, templates)


def _draft(text: str, file: str, environ: Mapping[str, str], templates_dir: Path, templates: Mapping[str, str] | None) -> Draft:
    templates = read_templates(templates_dir) if templates is None else dict(templates)
    try:
        data, lines, problems, broken = read_yaml(text, file)
    except ConfigError as exc:
        return Draft(file, templates_dir, None, {}, exc.problems, None, templates)
    if () in broken:
        return Draft(file, templates_dir, None, lines, _sorted(problems), None, templates)
    if not isinstance(data, dict):
        kind = "empty" if data is None else ("a list" if isinstance(data, list) else "a single plain value") + ", not a mapping"
        line = lines.get((), 1) if data is not None else None
        problem = Problem(file, line, "", f"the document is {kind}; expected a mapping with at least 'reports:'")
        return Draft(file, templates_dir, None, lines, [*problems, problem], None, templates)
    # A string holds a '$' only if the text has one, or a backslash escape ("\x24") makes one.
    if "$" in text or "\\" in text:
        data = _expand(data, (), environ, file, lines, problems)

    def line_of(loc: Path_) -> int | None:
        while loc and loc not in lines:
            loc = loc[:-1]
        return lines.get(loc)

    problems.extend(_check(data, file, line_of, templates_dir, templates))
    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            if not any(loc[: len(b)] == b for b in broken):  # already said: the YAML value itself is wrong
                problems.append(Problem(file, line_of(loc), _dotted(loc), _message(err, loc)))
    if config is not None:
        config._source = Path(file)
        config._templates_dir = templates_dir
        config._lines = lines
        config._templates = templates
        config._version = version_of(text.encode(), templates)
        config._text = text
    return Draft(file, templates_dir, data, lines, _sorted(problems), None if problems else config, templates)


def _expand(value: Any, path: Path_, environ: Mapping[str, str], file: str, lines: dict[Path_, int], problems: list[Problem]) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string; $$ is a literal $."""
    if isinstance(value, dict):
        return {k: _expand(v, (*path, k), environ, file, lines, problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, (*path, i), environ, file, lines, problems) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if environ.get(name):
            return environ[name]
        if default is not None:
            return default
        problems.append(
            Problem(file, lines.get(path), _dotted(path), f"environment variable {name} is not set; set it, or write ${{{name}:-default}}")
        )
        return ""

    return VAR_RE.sub(sub, value)


# --------------------------------------------------------------------------- checks across fields


def _check(data: dict[str, Any], file: str, line_of: Any, templates_dir: Path, templates: Mapping[str, str]) -> list[Problem]:
    """Checks across fields, on the raw data, so they run even where the schema found errors."""
    problems: list[Problem] = []

    def bad(loc: Path_, message: str) -> None:
        problems.append(Problem(file, line_of(loc), _dotted(loc), message))

    def section(key: str) -> dict[str, Any]:
        value = data.get(key)
        return value if isinstance(value, dict) else {}

    d = section("defaults")
    soft, hard = d.get("soft_time_limit", dflt.SOFT_TIME_LIMIT), d.get("time_limit", dflt.TIME_LIMIT)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (soft, hard)) and soft >= hard:
        where = "soft_time_limit" if "soft_time_limit" in d else "time_limit"
        bad(("defaults", where), f"soft_time_limit must be below time_limit ({soft:g} >= {hard:g})")

    datasources = section("datasources")
    for name, source in datasources.items():
        url = source.get("url") if isinstance(source, dict) else None
        if isinstance(url, str) and url.strip() and (why := _db_url_problem(url)):
            bad(("datasources", name, "url"), why)
        seed = source.get("seed") if isinstance(source, dict) else None
        if isinstance(seed, str) and not (Path(file).parent / seed).is_file():
            bad(("datasources", name, "seed"), f"file {Path(file).parent / seed} not found")

    if data.get("reports") == {}:
        bad(("reports",), "no reports defined; add at least one under 'reports:'")
    for name, report in section("reports").items():
        loc: Path_ = ("reports", name)
        if not NAME_RE.match(str(name)):
            bad(loc, "a report name may use letters, digits, '.', '_' and '-' only, starting with a letter or digit")
        if not isinstance(report, dict):
            continue
        for key in ("template", "text_template"):
            template = report.get(key)
            if isinstance(template, str) and template_key(template) not in templates:
                if (templates_dir / template).is_file():
                    bad(
                        (*loc, key),
                        f"template {template!r} in {templates_dir} is not a UTF-8 text file of at most {MAX_TEMPLATE_BYTES:,} bytes",
                    )
                else:
                    bad((*loc, key), f"template {template!r} not found in {templates_dir}")
        _check_alert(report, loc, bad, templates, templates_dir)
        charts = report.get("charts")
        for chart_name, chart in charts.items() if isinstance(charts, dict) else ():
            _check_chart(chart_name, chart, (*loc, "charts", chart_name), bad)
        if report.get("query") is not None and report.get("function") is not None:
            bad(loc, "give either 'query' or 'function', not both")
        _check_burst(report, loc, bad)
        burst = report.get("burst")
        queries = {(*loc, "query"): report.get("query"), (*loc, "burst", "query"): burst.get("query") if isinstance(burst, dict) else None}
        for query_loc, query in queries.items():
            if isinstance(query, dict) and isinstance(query.get("sql"), str):
                for why in cast_problems(query["sql"]):
                    bad((*query_loc, "sql"), why)
            source_name = query.get("datasource") if isinstance(query, dict) else None
            if isinstance(source_name, str) and source_name not in datasources:
                known = ", ".join(sorted(datasources)) or "none defined"
                bad(
                    (*query_loc, "datasource"),
                    f"unknown datasource {source_name!r}{_did_you_mean(source_name, datasources)} (known: {known})",
                )
    return problems


ALERT_OPTIONS = ("value", "notify", "renotify_after", "recovered")
"""Report keys that only mean something with `when:`."""


def _check_alert(report: dict[str, Any], loc: Path_, bad: Any, templates: Mapping[str, str], templates_dir: Path) -> None:
    """The alert options need `when:`; renotify_after needs notify: change; a recovered template exists."""
    if report.get("when") is None:
        for key in ALERT_OPTIONS:
            if key in report:
                bad((*loc, key), f"'{key}' is an alert option and needs 'when:' (the condition) on the report")
        return
    for key in ("when", "value"):
        source = report.get(key)
        known = [n for n in ALERT_NAMES if n != "value" or (key == "when" and report.get("value") is not None)]
        for name in sorted(names_used(source) - set(known)) if isinstance(source, str) else ():
            hint = " (declare it with 'value:')" if name == "value" else _did_you_mean(name, known)
            bad((*loc, key), f"unknown name {name!r}{hint}; an alert's expressions see {', '.join(known)}")
    if report.get("renotify_after") is not None and report.get("notify", "each") != "change":
        bad(
            (*loc, "renotify_after"),
            "only applies with 'notify: change' (with notify: each every slot where the condition holds is sent)",
        )
    recovered = report.get("recovered")
    for key in ("template", "text_template"):
        template = recovered.get(key) if isinstance(recovered, dict) else None
        if isinstance(template, str) and template_key(template) not in templates:
            bad((*loc, "recovered", key), f"template {template!r} not found in {templates_dir}")


_READS_READER = re.compile(r"\breader\b")


_SQL_NOT_CODE = re.compile(r"--[^\n]*|/\*.*?(?:\*/|\Z)|'(?:[^']|'')*'?|\"(?:[^\"]|\"\")*\"?", re.DOTALL)
"""Comments (`--`, `/* */`) and quoted literals and identifiers: a `:name` there binds nothing that matters."""

_PG_CAST = re.compile(r"(?<![:\w\\]):(\w+)::(\w+)")


def sql_code(sql: str) -> str:
    """SQL without its comments and quoted strings (each replaced by a space), where bind names are read."""
    return _SQL_NOT_CODE.sub(" ", sql)


def bind_names(sql: str) -> set[str]:
    """The names SQL binds (`:region`), as SQLAlchemy's text() finds them (it ignores a value given for
    any other name, silently), outside comments and quoted strings: a commented-out `-- and region =
    :region` binds nothing the query uses."""
    import sqlalchemy as sa

    return set(sa.text(sql_code(sql)).compile().params)


def cast_problems(sql: str) -> list[str]:
    """Why SQL's PostgreSQL-style casts of a bind (`:since::date`) do not work: SQLAlchemy does not take
    `:since` followed by `:` for a bind, so the database gets the text as written."""
    return [
        f":{name}::{kind} is not a bind parameter to SQLAlchemy (a ':' follows the name); write CAST(:{name} AS {kind})"
        for name, kind in _PG_CAST.findall(sql_code(sql))
    ]


def reads_reader(value: Any) -> bool:
    """Whether a query parameter's expression VALUE reads `reader`."""
    return bool(_READS_READER.search(str(value)))


def _check_burst(report: dict[str, Any], loc: Path_, bad: Any) -> None:
    """A burst report takes its readers from burst: (never from recipients, cc or bcc); any other report needs recipients."""
    burst = report.get("burst")
    if burst is None:
        if "recipients" not in report:
            bad((*loc, "recipients"), "is required but missing")
        return
    for key in ("recipients", "cc", "bcc"):
        if key in report:
            bad((*loc, key), f"a burst report's readers come from burst: (one row each); remove '{key}'")
    if report.get("when") is not None:
        bad((*loc, "when"), "an alert cannot be a burst report (a condition per reader is not supported); make two reports")
    query = report.get("query")
    if isinstance(query, dict) and isinstance(query.get("sql"), str):
        given = query.get("params")
        params: dict[str, Any] = given if isinstance(given, dict) else {}
        if not bind_names(query["sql"]) - set(params) and not any(reads_reader(v) for v in params.values()):
            why = (
                "a burst report's query must use the reader's parameters, e.g. `and region = :region`; "
                "as written every reader gets the same rows"
            )
            bad((*loc, "query", "sql"), why)
    if isinstance(burst, dict):
        given = [key for key in ("query", "function") if burst.get(key) is not None]
        if len(given) != 1:
            how = "not both" if given else "one of them"
            bad((*loc, "burst"), f"give either 'query' or 'function' (returning one row per reader), {how}")


def _check_chart(name: Any, chart: Any, loc: Path_, bad: Any) -> None:
    """A chart is either simple (type, x and y) or a whole Vega-Lite spec; its name is a plain name."""
    if not NAME_RE.match(str(name)):
        bad(loc, "a chart name may use letters, digits, '.', '_' and '-' only, starting with a letter or digit")
    if not isinstance(chart, dict):
        return
    if chart.get("vega_lite") is not None:
        if chart.get("type") is not None:
            bad((*loc, "type"), "give either 'type' (with x and y) or 'vega_lite', not both")
        return
    if chart.get("type") is None:
        bad(loc, "needs 'type' (bar, line, area or pie) with 'x' and 'y', or a whole 'vega_lite' spec")
        return
    for key in ("x", "y"):
        if chart.get(key) is None:
            bad(loc, f"a {chart.get('type')} chart needs '{key}': the name of a column")


def _db_url_problem(url: str) -> str | None:
    """Why URL is not an SQLAlchemy URL; None if it is one. Never quotes the URL: it may hold a password."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except (ArgumentError, ValueError):
        return "is not an SQLAlchemy URL such as 'postgresql+psycopg://user:${DB_PASSWORD}@host/db' or 'sqlite:///data.db'"
    return None


def parse_rate(rate: str) -> float:
    """'1/s', '30/m', '100/h' -> emails per second."""
    match = RATE_RE.match(rate)
    if not match or not 0 < float(match.group(1)) < math.inf:
        raise ValueError(f"rate {rate!r} is not like '1/s', '30/m' or '500/h'")
    return float(match.group(1)) / {"s": 1, "m": 60, "h": 3600}[match.group(2)]


def normalize_address(address: str) -> str:
    """'Name <a@b.c>' or 'a@b.c' -> the same, validated and normalised. ValueError if invalid.

    An internationalised domain comes back in its ASCII (IDNA) form, which every mail server and
    header accepts; only a non-ASCII local part keeps Unicode (and needs a server with SMTPUTF8).
    """
    return _normalized(address)


@functools.lru_cache(maxsize=1 << 18)
def _normalized(address: str) -> str:
    if CONTROL_RE.search(address):
        raise ValueError(f"address {address!r} contains control characters")
    # Cached: the same owners and recipients recur across reports, and a big config has tens of
    # thousands; the dispatcher and the workers then find every address of the loaded config here.
    # A bare ASCII address cannot hold a display name or a second address, and a name of plain words
    # before one in <> comes back from the header parser as written: skip the parser for both.
    if PLAIN_ADDRESS_RE.fullmatch(address):
        found = [("", address)]
    elif named := NAMED_ADDRESS_RE.fullmatch(address):
        found = [(named.group(1), named.group(2))]
    else:
        found = getaddresses([address])
    if len([a for _, a in found if "@" in a]) > 1:
        raise ValueError(f"{address!r} holds several addresses; list each one on its own")
    name, addr = found[0] if len(found) == 1 else ("", "")
    if not addr or "@" not in addr:
        raise ValueError(f"{address!r} is not an email address")
    if (fast := _fast_address(addr)) is not None:
        return _with_name(name, fast)
    try:
        # Syntax only (RFC 5322/6531): a single-label domain ('localhost'), a quoted local part and
        # a bracketed IP address are addresses too; whether the mailbox exists is the server's call.
        valid = validate_email(
            addr, check_deliverability=False, globally_deliverable=False, allow_quoted_local=True, allow_domain_literal=True
        )
    except EmailNotValidError as exc:
        raise ValueError(f"{address!r} is not a valid email address: {exc}") from None
    bare = valid.ascii_email or valid.normalized
    return _with_name(name, bare)


def _fast_address(address: str) -> str | None:
    """ADDRESS normalised as email-validator would, for the common plain ASCII kind; None for any other.

    email-validator costs about 80 microseconds an address (IDNA mapping of the domain), and a config
    of 10,000 reports has tens of thousands of distinct ones. For a dot-atom local part and a domain
    of ASCII letter-digit-hyphen labels within the length limits, it returns the local part as written
    and the domain lower-cased: tests/test_config_recipients.py checks this against the library.
    What this leaves out (IDNA "xn--" and other "ab--" labels, role names it lower-cases such as
    postmaster@, special-use domains, anything longer) goes to the library.
    """
    found = FAST_ADDRESS_RE.fullmatch(address)
    if found is None or len(address) > 254 or "--" in address:
        return None
    local, domain = found.group(1), found.group(2).lower()
    if len(local) > 64 or len(domain) > 253 or local.lower() in CASE_INSENSITIVE_MAILBOX_NAMES:
        return None
    if any(domain == d or domain.endswith("." + d) for d in email_validator.SPECIAL_USE_DOMAIN_NAMES):
        return None
    return f"{local}@{domain}"


def _with_name(name: str, bare: str) -> str:
    if not name:
        return bare
    # As email.utils.formataddr quotes, but a non-ASCII name stays readable (the header policy encodes it).
    if re.search(r'[][\\()<>@,:;".]', name):
        name = '"' + re.sub(r'([\\"])', r"\\\1", name) + '"'
    return f"{name} <{bare}>"


# --------------------------------------------------------------------------- messages


def _sorted(problems: list[Problem]) -> list[Problem]:
    return sorted(dict.fromkeys(problems), key=lambda p: (p.line or 0, p.field))


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_at(loc: Path_) -> type[BaseModel] | None:
    """The model class whose field list applies at LOC, for 'did you mean' on unknown keys."""
    model: Any = Config
    for part in loc:
        if isinstance(model, type) and issubclass(model, BaseModel):
            field = model.model_fields.get(str(part))
            if field is None:
                return None
            model = field.annotation
        elif get_origin(model) is dict:
            model = get_args(model)[1]
        else:
            return None
        while get_origin(model) in (Union, getattr(__import__("types"), "UnionType", Union)):
            model = next(a for a in get_args(model) if a is not type(None))
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


LITERAL_FIELDS: dict[str, tuple[str, ...]] = {"notify": ("each", "change")}
"""Choice fields other than `formats`, by key: what their error lists."""


def _message(err: Any, loc: Path_) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        fields = list(model.model_fields) if model else []
        return f"unknown key{_did_you_mean(str(loc[-1]), fields)}" + (f"; allowed: {', '.join(fields)}" if fields else "")
    if kind == "missing":
        return "is required but missing"
    if kind == "literal_error":
        allowed = LITERAL_FIELDS.get(str(loc[-1]) if loc else "", get_args(Format))
        return f"{err['input']!r} is not one of {', '.join(allowed)}"
    if kind in ("model_type", "dict_type"):
        return f"must be a mapping, not {_yaml_type(err['input'])}"
    if kind in ("tuple_type", "list_type"):
        return f"must be a list, not {_yaml_type(err['input'])}"
    if kind == "string_type":
        return f"must be a string, not {_yaml_type(err['input'])}"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false, not {err['input']!r}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be a whole number, not {err['input']!r}"
    if kind == "finite_number":
        return f"must be a finite number, not {_yaml_number(err['input'])}"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number, not {err['input']!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        words = {"greater_than": "greater than", "greater_than_equal": "at least", "less_than": "less than", "less_than_equal": "at most"}
        bound = next(iter(err["ctx"].values()))
        return f"must be {words[kind]} {bound:g}, not {err['input']!r}"
    if kind == "value_error":
        return str(err["ctx"]["error"]) if "ctx" in err else str(err["msg"]).removeprefix("Value error, ")
    msg = str(err["msg"])
    return msg[0].lower() + msg[1:] if msg else kind


def _yaml_number(value: Any) -> str:
    """inf, -inf and nan as YAML writes them (.inf, -.inf, .nan), so the user finds them in the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
    return repr(value)


def _yaml_type(value: Any) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        int: "a number",
        float: "a number",
        bool: "true/false",
        type(None): "empty",
    }.get(type(value), type(value).__name__)
