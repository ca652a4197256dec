"""schedules.yaml -> a typed, immutable Config. Every problem is reported at once, with file and line.

Loading happens in three passes so one mistake never hides another:
1. YAML to plain data, remembering the line of every key and value (duplicate keys are errors);
2. ``${VAR}`` expansion from the environment;
3. the pydantic model, then checks across fields (datasources, templates, crons, time limits).
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import zoneinfo
from collections.abc import Mapping
from email.utils import getaddresses
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from email_validator import EmailNotValidError, validate_email
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from reporter import defaults as dflt
from reporter.errors import ConfigError, Problem
from reporter.schedule import cron_problem

Path_ = tuple[str | int, ...]

KNOWN_TASKS = ("email_reports.schedule_hourly", "email_reports.prune_ledger", "email_reports.sweep")
"""Task names a beat entry may name (email_reports.send needs a report and a slot, so it cannot be one)."""

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\$")
LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
HOST_RE = re.compile(rf"^(?:\*\.)?{LABEL}(?:\.{LABEL})*$")


# --------------------------------------------------------------------------- the model


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31), ("month", 1, 12), ("day-of-week", 0, 7))


def _valid_cron(value: str) -> str:
    if (why := cron_problem(value)) is not None:
        raise ValueError(why + _cron_detail(value))
    return value


def _cron_detail(value: str) -> str:
    """'; hour 25 is out of range 0-23' for the first out-of-range number, so the user knows what to fix."""
    fields = value.split()
    if len(fields) != len(CRON_FIELDS):
        return ""
    for text, (name, low, high) in zip(fields, CRON_FIELDS, strict=True):
        for number in re.findall(r"(?<![/\d])\d+", text):  # not step sizes such as the 15 in */15
            if not low <= int(number) <= high:
                return f"; {name} {number} is out of range {low}-{high}"
    return ""


def _byte_size(value: Any) -> Any:
    """10000000, '10 MB', '500kB' or '2 MiB' -> bytes; anything else is left for the type check."""
    if not isinstance(value, str):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|kB|KB|MB|GB|KiB|MiB|GiB)?\s*", value)
    if not match:
        raise ValueError(f"{value!r} is not a size; write bytes (10000000) or a size such as '10 MB' or '500 kB'")
    unit = {"B": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[match.group(2) or "B"]
    return int(float(match.group(1)) * unit)


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


def _non_empty(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ValueError("is empty; list at least one address")
    return value


Cron = Annotated[str, AfterValidator(_valid_cron)]
Zone = Annotated[str, AfterValidator(_valid_zone)]
Address = Annotated[str, AfterValidator(_valid_address)]
Rate = Annotated[str, AfterValidator(_valid_rate)]
Host = Annotated[str, AfterValidator(_valid_host)]
Rows = Annotated[int, Field(gt=0)]
Bytes = Annotated[int, Field(gt=0), BeforeValidator(_byte_size)]
Seconds = Annotated[float, Field(gt=0)]


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
    params: dict[str, Any] = {}


Format = Literal["html", "pdf", "csv"]


class Report(_Model):
    schedule: Cron
    timezone: Zone | None = None
    subject: str
    template: str
    text_template: str | None = None
    query: Query | None = None
    function: Annotated[str, AfterValidator(_valid_function)] | None = None
    formats: tuple[Format, ...] = ("html",)
    recipients: Annotated[tuple[Address, ...], AfterValidator(_non_empty)]
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

    def query_timeout_of(self, report: Report) -> float:
        return report.query_timeout or self.defaults.query_timeout

    def seed_path(self, source: Datasource) -> Path | None:
        return None if source.seed is None else self.source.parent / source.seed


# --------------------------------------------------------------------------- loading


def load(path: Path, environ: Mapping[str, str], templates_dir: Path | None = None) -> Config:
    """Read, expand and validate PATH. Raises ConfigError listing every problem found."""
    file = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([Problem(file, None, "", "file not found; set REPORTER_CONFIG or run from the folder that has it")]) from None
    except OSError as exc:
        raise ConfigError([Problem(file, None, "", f"cannot read: {exc.strerror}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError([Problem(file, None, "", "not a UTF-8 text file; is this the right file?")]) from None
    if "\x00" in text:
        raise ConfigError([Problem(file, None, "", "contains NUL bytes; not a YAML text file")])
    return parse(text, file, environ, templates_dir or path.parent / dflt.TEMPLATES_DIRNAME)


def parse(text: str, file: str, environ: Mapping[str, str], templates_dir: Path) -> Config:
    """Validate YAML TEXT (named FILE in messages). Raises ConfigError listing every problem found."""
    problems: list[Problem] = []
    data, lines = _read_yaml(text, file)
    if not isinstance(data, dict):
        kind = "empty" if data is None else ("a list" if isinstance(data, list) else "a single plain value") + ", not a mapping"
        raise ConfigError(
            [
                Problem(
                    file,
                    lines.get((), 1) if data is not None else None,
                    "",
                    f"the document is {kind}; expected a mapping with at least 'reports:'",
                )
            ]
        )
    data = _expand(data, (), environ, file, lines, problems)

    def line_of(loc: Path_) -> int | None:
        while loc and loc not in lines:
            loc = loc[:-1]
        return lines.get(loc)

    problems.extend(_check(data, file, line_of, templates_dir))
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(err["loc"])
            problems.append(Problem(file, line_of(loc), _dotted(loc), _message(err, loc)))
    if problems:
        raise ConfigError(_sorted(problems))
    config._source = Path(file)
    config._templates_dir = templates_dir
    config._lines = lines
    return config


class _LineLoader(yaml.SafeLoader):
    """Safe loader; we walk its node tree ourselves to keep the line of every key."""


def _read_yaml(text: str, file: str) -> tuple[Any, dict[Path_, int]]:
    lines: dict[Path_, int] = {}
    try:
        loader = _LineLoader(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        what = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem and exc.context_mark and exc.context_mark.line + 1 != line:
            what = f"{exc.problem} ({exc.context} that starts on line {exc.context_mark.line + 1})"
        raise ConfigError([Problem(file, line, "", f"YAML syntax error: {what}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(file, None, "", f"YAML error: {exc}")]) from None
    if node is None:
        return None, lines
    problems: list[Problem] = []
    constructor = _LineLoader("")

    def walk(n: yaml.Node, path: Path_, depth: int) -> Any:
        lines.setdefault(path, n.start_mark.line + 1)
        if depth > 50:
            problems.append(Problem(file, n.start_mark.line + 1, _dotted(path), "nested too deeply"))
            return None
        if isinstance(n, yaml.MappingNode):
            try:
                constructor.flatten_mapping(n)
            except yaml.YAMLError as exc:
                problems.append(
                    Problem(file, n.start_mark.line + 1, _dotted(path), f"bad merge key: {getattr(exc, 'problem', None) or exc}")
                )
                return None
            out: dict[Any, Any] = {}
            for key_node, value_node in n.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    problems.append(Problem(file, key_node.start_mark.line + 1, _dotted(path), "a key must be a plain value"))
                    continue
                # Keys as written: YAML 1.1 would turn a report called `off:` or `yes:` into a boolean.
                key = key_node.value
                if key in out:
                    first = lines.get((*path, key))
                    problems.append(
                        Problem(
                            file,
                            key_node.start_mark.line + 1,
                            _dotted((*path, key)),
                            f"duplicate key (first defined on line {first}); YAML would silently keep only the last",
                        )
                    )
                    continue
                lines[(*path, key)] = key_node.start_mark.line + 1
                out[key] = walk(value_node, (*path, key), depth + 1)
            return out
        if isinstance(n, yaml.SequenceNode):
            return [walk(item, (*path, i), depth + 1) for i, item in enumerate(n.value)]
        try:
            return constructor.construct_object(n, deep=True)
        except (yaml.YAMLError, ValueError, KeyError, IndexError, AttributeError, TypeError, OverflowError) as exc:
            # A tagged scalar that does not fit its tag (`!!int three`, `!!bool nah`).
            detail = getattr(exc, "problem", None) or f"{n.value!r} is not a valid {n.tag.rsplit(':', 1)[-1]}"
            problems.append(Problem(file, n.start_mark.line + 1, _dotted(path), f"bad value: {detail}"))
            return None

    data = walk(node, (), 0)
    if problems:
        raise ConfigError(_sorted(problems))
    return data, lines


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


def _check(data: dict[str, Any], file: str, line_of: Any, templates_dir: Path) -> list[Problem]:
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
            if isinstance(template, str) and not (templates_dir / template).is_file():
                bad((*loc, key), f"template {template!r} not found in {templates_dir}")
        if report.get("query") is not None and report.get("function") is not None:
            bad(loc, "give either 'query' or 'function', not both")
        query = report.get("query")
        source_name = query.get("datasource") if isinstance(query, dict) else None
        if isinstance(source_name, str) and source_name not in datasources:
            known = ", ".join(sorted(datasources)) or "none defined"
            bad(
                (*loc, "query", "datasource"),
                f"unknown datasource {source_name!r}{_did_you_mean(source_name, datasources)} (known: {known})",
            )
    return problems


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
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"rate {rate!r} is not like '1/s', '30/m' or '500/h'")
    return float(match.group(1)) / {"s": 1, "m": 60, "h": 3600}[match.group(2)]


def normalize_address(address: str) -> str:
    """'Name <a@b.c>' or 'a@b.c' -> the same, validated and normalised. ValueError if invalid.

    An internationalised domain comes back in its ASCII (IDNA) form, which every mail server and
    header accepts; only a non-ASCII local part keeps Unicode (and needs a server with SMTPUTF8).
    """
    if any(ord(c) < 32 or 127 <= ord(c) < 160 or c in "\u2028\u2029" for c in address):
        raise ValueError(f"address {address!r} contains control characters")
    found = getaddresses([address])
    if len([a for _, a in found if re.fullmatch(r"[^@\s]+@[^@\s]+", a)]) > 1:
        raise ValueError(f"{address!r} holds several addresses; list each one on its own")
    name, addr = found[0] if len(found) == 1 else ("", "")
    if not addr or "@" not in addr:
        raise ValueError(f"{address!r} is not an email address")
    try:
        valid = validate_email(addr, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"{address!r} is not a valid email address: {exc}") from None
    bare = valid.ascii_email or valid.normalized
    if not name:
        return bare
    # As email.utils.formataddr quotes, but a non-ASCII name stays readable (the header policy encodes it).
    if re.search(r'[][\\()<>@,:;".]', name):
        name = '"' + re.sub(r'([\\"])', r"\\\1", name) + '"'
    return f"{name} <{bare}>"


# --------------------------------------------------------------------------- messages


def _dotted(loc: Path_) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


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


def _message(err: Any, loc: Path_) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        fields = list(model.model_fields) if model else []
        return f"unknown key{_did_you_mean(str(loc[-1]), fields)}" + (f"; allowed: {', '.join(fields)}" if fields else "")
    if kind == "missing":
        return "is required but missing"
    if kind == "literal_error":
        return f"{err['input']!r} is not one of html, pdf, csv"
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
    if kind in ("float_type", "float_parsing", "finite_number"):
        return f"must be a number, not {err['input']!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        words = {"greater_than": "greater than", "greater_than_equal": "at least", "less_than": "less than", "less_than_equal": "at most"}
        bound = next(iter(err["ctx"].values()))
        return f"must be {words[kind]} {bound:g}, not {err['input']!r}"
    if kind == "value_error":
        return str(err["ctx"]["error"]) if "ctx" in err else str(err["msg"]).removeprefix("Value error, ")
    msg = str(err["msg"])
    return msg[0].lower() + msg[1:] if msg else kind


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
