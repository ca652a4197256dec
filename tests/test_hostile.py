"""Hostile and broken input (issue 4): clear config errors, safe templates and PDFs, no header
injection, limits that say so, and no password in any output.

Sections follow the issue's points: 1 config errors, 2 templates, 3 PDF fetching, 4 email headers,
5 limits, 6 secrets.
"""

from __future__ import annotations

import http.server
import io
import logging
import os
import sqlite3
import string
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pypdf import PdfReader

from reporter.config import KNOWN_TASKS, Config, Defaults, Report, load, parse
from reporter.errors import ConfigError, DataError, Problem, RenderError
from reporter.render import Renderer
from tests.conftest import Inbox, Project, run_cli
from tests.test_config import BASE, write_project

SLOT = datetime(2026, 7, 1, 7, 0, tzinfo=UTC)


# =========================================================================== 1. config errors

DS = "datasources:\n  warehouse:\n    url: sqlite://\n"
REPORT_KEYS = ", ".join(Report.model_fields)
DEFAULTS_KEYS = ", ".join(Defaults.model_fields)
HOST_HINT = "is not a host name; write the host only, such as 'cdn.example.com' or '*.example.com' (no scheme, port or path)"
NOT_A_MAPPING = "expected a mapping with at least 'reports:'"

# (id, schedules.yaml content, every problem exactly as `reporter validate` prints it). "schedules.yaml"
# and "TEMPLATES" stand for the file's and the templates folder's real paths.
BROKEN = [
    (
        "unknown-report-key",
        BASE + "    recipents: [b@example.com]\n",
        [f"schedules.yaml:7: reports.r1.recipents: unknown key (did you mean 'recipients'?); allowed: {REPORT_KEYS}"],
    ),
    (
        "unknown-top-level-key",
        "report:\n  r1: {}\n" + BASE,
        ["schedules.yaml:1: report: unknown key (did you mean 'reports'?); allowed: timezone, defaults, datasources, beat, reports"],
    ),
    (
        "unknown-defaults-key",
        "defaults:\n  max_row: 100\n" + BASE,
        [f"schedules.yaml:2: defaults.max_row: unknown key (did you mean 'max_rows'?); allowed: {DEFAULTS_KEYS}"],
    ),
    ("formats-not-a-list", BASE + "    formats: html\n", ["schedules.yaml:7: reports.r1.formats: must be a list, not a string"]),
    (
        "subject-a-list",
        BASE.replace("subject: Hi", "subject: [a, b]"),
        ["schedules.yaml:4: reports.r1.subject: must be a string, not a list"],
    ),
    ("group-not-boolean", BASE + "    group: maybe\n", ["schedules.yaml:7: reports.r1.group: must be true or false, not 'maybe'"]),
    ("max-rows-not-a-number", BASE + "    max_rows: lots\n", ["schedules.yaml:7: reports.r1.max_rows: must be a whole number, not 'lots'"]),
    ("max-rows-zero", "defaults:\n  max_rows: 0\n" + BASE, ["schedules.yaml:2: defaults.max_rows: must be greater than 0, not 0"]),
    (
        "query-timeout-negative",
        BASE + "    query_timeout: -1\n",
        ["schedules.yaml:7: reports.r1.query_timeout: must be greater than 0, not -1"],
    ),
    (
        "attachment-cap-not-a-size",
        "defaults:\n  max_attachment_bytes: huge\n" + BASE,
        [
            "schedules.yaml:2: defaults.max_attachment_bytes: "
            "'huge' is not a size; write bytes (10000000) or a size such as '10 MB' or '500 kB'"
        ],
    ),
    (
        "cron-hour-out-of-range",
        BASE.replace("0 7 * * *", "0 25 * * *"),
        ["schedules.yaml:3: reports.r1.schedule: invalid cron '0 25 * * *'; hour 25 is out of range 0-23"],
    ),
    (
        "cron-four-fields",
        BASE.replace("0 7 * * *", "0 7 * *"),
        ["schedules.yaml:3: reports.r1.schedule: cron '0 7 * *' has 4 fields; expected 5 (minute hour day-of-month month day-of-week)"],
    ),
    (
        "report-timezone-unknown",
        BASE + "    timezone: Mars/Olympus\n",
        ["schedules.yaml:7: reports.r1.timezone: unknown timezone 'Mars/Olympus'; use an IANA name such as 'UTC' or 'Europe/Berlin'"],
    ),
    (
        "top-level-timezone-typo",
        "timezone: Europe/Berln\n" + BASE,
        ["schedules.yaml:1: timezone: unknown timezone 'Europe/Berln'; use an IANA name such as 'UTC' or 'Europe/Berlin'"],
    ),
    (
        "soft-limit-equals-hard",
        "defaults:\n  soft_time_limit: 120\n  time_limit: 120\n" + BASE,
        ["schedules.yaml:2: defaults.soft_time_limit: soft_time_limit must be below time_limit (120 >= 120)"],
    ),
    (
        "soft-limit-above-hard",
        "defaults:\n  time_limit: 60\n  soft_time_limit: 90\n" + BASE,
        ["schedules.yaml:3: defaults.soft_time_limit: soft_time_limit must be below time_limit (90 >= 60)"],
    ),
    (
        "recipient-not-an-address",
        BASE.replace("a@example.com", "not-an-email"),
        ["schedules.yaml:6: reports.r1.recipients[0]: 'not-an-email' is not an email address"],
    ),
    (
        "recipient-domain-with-underscore",
        BASE.replace("a@example.com", "a@exa_mple.com"),
        [
            "schedules.yaml:6: reports.r1.recipients[0]: 'a@exa_mple.com' is not a valid email address: "
            "The part after the @-sign contains invalid characters: '_'."
        ],
    ),
    (
        "recipient-two-dots-in-a-row",
        BASE.replace("a@example.com", "a..b@example.com"),
        [
            "schedules.yaml:6: reports.r1.recipients[0]: 'a..b@example.com' is not a valid email address: "
            "An email address cannot have two periods in a row."
        ],
    ),
    (
        "recipient-header-injection",
        BASE.replace("[a@example.com]", '["a@example.com\\r\\nBcc: x@example.net"]'),
        ["schedules.yaml:6: reports.r1.recipients[0]: address 'a@example.com\\r\\nBcc: x@example.net' contains control characters"],
    ),
    (
        "two-addresses-in-one-entry",
        BASE.replace("[a@example.com]", '["a@example.com, b@example.com"]'),
        ["schedules.yaml:6: reports.r1.recipients[0]: 'a@example.com, b@example.com' holds several addresses; list each one on its own"],
    ),
    (
        "sender-not-an-address",
        "defaults:\n  sender: nobody\n" + BASE,
        ["schedules.yaml:2: defaults.sender: 'nobody' is not an email address"],
    ),
    (
        "sender-header-injection",
        'defaults:\n  sender: "Reports <r@example.com>\\nBcc: x@example.net"\n' + BASE,
        ["schedules.yaml:2: defaults.sender: address 'Reports <r@example.com>\\nBcc: x@example.net' contains control characters"],
    ),
    (
        "sender-control-character",
        'defaults:\n  sender: "Reports\\x07 <r@example.com>"\n' + BASE,
        ["schedules.yaml:2: defaults.sender: address 'Reports\\x07 <r@example.com>' contains control characters"],
    ),
    (
        "empty-recipient-list",
        BASE.replace("[a@example.com]", "[]"),
        ["schedules.yaml:6: reports.r1.recipients: is empty; list at least one address"],
    ),
    (
        "missing-template-file",
        BASE.replace("t.html", "missing.html"),
        ["schedules.yaml:5: reports.r1.template: template 'missing.html' not found in TEMPLATES"],
    ),
    (
        "missing-text-template-file",
        BASE + "    text_template: missing.txt\n",
        ["schedules.yaml:7: reports.r1.text_template: template 'missing.txt' not found in TEMPLATES"],
    ),
    (
        "undefined-environment-variable",
        "datasources:\n  w:\n    url: ${WAREHOUSE_URL}\n" + BASE,
        ["schedules.yaml:3: datasources.w.url: environment variable WAREHOUSE_URL is not set; set it, or write ${WAREHOUSE_URL:-default}"],
    ),
    (
        "duplicate-report-name",
        BASE + '  r1:\n    schedule: "0 8 * * *"\n    subject: Again\n    template: t.html\n    recipients: [b@example.com]\n',
        ["schedules.yaml:7: reports.r1: duplicate key (first defined on line 2); YAML would silently keep only the last"],
    ),
    (
        "duplicate-field",
        BASE + "    subject: Twice\n",
        ["schedules.yaml:7: reports.r1.subject: duplicate key (first defined on line 4); YAML would silently keep only the last"],
    ),
    (
        "unknown-datasource",
        DS + BASE + "    query:\n      datasource: warehous\n      sql: select 1\n",
        ["schedules.yaml:11: reports.r1.query.datasource: unknown datasource 'warehous' (did you mean 'warehouse'?) (known: warehouse)"],
    ),
    (
        "unknown-beat-task",
        'beat:\n  hourly:\n    task: email_reports.schedule_hourl\n    cron: "1 * * * *"\n' + BASE,
        [
            "schedules.yaml:3: beat.hourly.task: unknown task 'email_reports.schedule_hourl' "
            f"(did you mean 'email_reports.schedule_hourly'?); known: {', '.join(KNOWN_TASKS)}"
        ],
    ),
    ("document-is-a-list", "- a\n- b\n", [f"schedules.yaml:1: the document is a list, not a mapping; {NOT_A_MAPPING}"]),
    (
        "document-is-a-string",
        "just some text\n",
        [f"schedules.yaml:1: the document is a single plain value, not a mapping; {NOT_A_MAPPING}"],
    ),
    ("empty-file", "", [f"schedules.yaml: the document is empty; {NOT_A_MAPPING}"]),
    ("binary-file", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["schedules.yaml: not a UTF-8 text file; is this the right file?"]),
    ("latin-1-file", b"reports:\n  r1:\n    subject: caf\xe9\n", ["schedules.yaml: not a UTF-8 text file; is this the right file?"]),
    (
        "unclosed-quote",
        'reports:\n  r1:\n    subject: "Hi\n',
        ["schedules.yaml:4: YAML syntax error: found unexpected end of stream (while scanning a quoted scalar that starts on line 3)"],
    ),
    (
        "pdf-host-with-scheme-and-path",
        "defaults:\n  pdf_allowed_hosts: [https://cdn.example.com/]\n" + BASE,
        [f"schedules.yaml:2: defaults.pdf_allowed_hosts[0]: 'https://cdn.example.com/' {HOST_HINT}"],
    ),
    (
        "pdf-host-with-port",
        "defaults:\n  pdf_allowed_hosts: [cdn.example.com:8443]\n" + BASE,
        [f"schedules.yaml:2: defaults.pdf_allowed_hosts[0]: 'cdn.example.com:8443' {HOST_HINT}"],
    ),
    (
        "datasource-url-not-a-url-never-quoted",
        "datasources:\n  w:\n    url: bob:hunter2@db.internal\n" + BASE,
        [
            "schedules.yaml:3: datasources.w.url: is not an SQLAlchemy URL such as "
            "'postgresql+psycopg://user:${DB_PASSWORD}@host/db' or 'sqlite:///data.db'"
        ],
    ),
    ("report-not-a-mapping", "reports:\n  r1: 5\n", ["schedules.yaml:2: reports.r1: must be a mapping, not a number"]),
    (
        "several-problems-at-once",
        "timezone: Nowhere\ndefaults:\n  max_rows: -3\n" + BASE.replace("a@example.com", "a@b@c").replace("t.html", "none.html"),
        [
            "schedules.yaml:1: timezone: unknown timezone 'Nowhere'; use an IANA name such as 'UTC' or 'Europe/Berlin'",
            "schedules.yaml:3: defaults.max_rows: must be greater than 0, not -3",
            "schedules.yaml:8: reports.r1.template: template 'none.html' not found in TEMPLATES",
            "schedules.yaml:9: reports.r1.recipients[0]: 'a@b@c' is not an email address",
        ],
    ),
]


@pytest.mark.parametrize(("content", "expected"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_broken_config_gets_exactly_this_message(tmp_path: Path, content: str | bytes, expected: list[str]) -> None:
    path = write_project(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load(path, {})
    shown = [str(p).replace(str(path), "schedules.yaml").replace(str(tmp_path / "templates"), "TEMPLATES") for p in info.value.problems]
    assert shown == expected
    assert "hunter2" not in str(info.value)


def test_the_table_covers_at_least_thirty_broken_configs() -> None:
    assert len(BROKEN) >= 30
    assert len({c[0] for c in BROKEN}) == len(BROKEN)


def test_attachment_cap_takes_sizes_with_units(tmp_path: Path) -> None:
    config = load(write_project(tmp_path, "defaults:\n  max_attachment_bytes: 2 MB\n" + BASE + "    max_attachment_bytes: 512 KiB\n"), {})
    assert config.defaults.max_attachment_bytes == 2_000_000
    assert config.attachment_cap_of(config.reports["r1"]) == 512 * 1024


@pytest.mark.slow
def test_validate_prints_every_problem_and_no_traceback(tmp_path: Path) -> None:
    path = write_project(tmp_path, BROKEN[-1][1])
    done = run_cli("validate", env={**os.environ, "REPORTER_CONFIG": str(path)})
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert "4 problem(s) in the configuration" in done.stderr
    for line in BROKEN[-1][2]:
        expected = line.replace("schedules.yaml", str(path)).replace("TEMPLATES", str(tmp_path / "templates"))
        assert f"  {expected}\n" in done.stderr


@pytest.mark.slow
def test_validate_refuses_an_alias_bomb_and_infinite_limits_in_one_run(tmp_path: Path) -> None:
    from tests.test_config import ALIAS_BOMB

    text = ALIAS_BOMB.replace("reports:\n", "defaults:\n  time_limit: .inf\nreports:\n")
    assert len(text.encode()) < 1000  # a few hundred bytes that would expand to 9**9 values
    path = write_project(tmp_path, text)
    done = run_cli("validate", env={**os.environ, "REPORTER_CONFIG": str(path)})
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    # The bomb stops the reading, so it is the one problem: the line where expansion passes the limit.
    assert done.stderr.splitlines() == [
        "reporter: 1 problem(s) in the configuration:",
        f"  {path}:5: e: aliases expand this file to more than 50,000 values; write the values out, or use fewer aliases",
    ]
    path.write_text(BASE + "    query_timeout: .inf\n")
    done = run_cli("validate", env={**os.environ, "REPORTER_CONFIG": str(path)})
    assert done.returncode == 1
    assert done.stderr.splitlines()[1:] == [f"  {path}:7: reports.r1.query_timeout: must be a finite number, not .inf"]


@pytest.mark.slow
def test_validate_finds_template_syntax_errors_before_any_schedule_fires(tmp_path: Path) -> None:
    text = BASE.replace("subject: Hi", 'subject: "Total {{ row_count | }}"') + "    text_template: t.txt\n"
    path = write_project(tmp_path, text)
    (tmp_path / "templates" / "t.html").write_text("<html><body>\n<p>{{ report.name }}</p>\n{% for row in rows %}\n</body></html>\n")
    (tmp_path / "templates" / "t.txt").write_text("{{ report.name }\n")
    done = run_cli("validate", env={**os.environ, "REPORTER_CONFIG": str(path)})
    assert done.returncode == 1, done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    templates = tmp_path / "templates"
    assert f"  {path}:4: reports.r1.subject: template syntax error: " in done.stderr
    assert f"  {templates / 't.html'}:4: reports.r1.template: template syntax error: Unexpected end of template." in done.stderr
    assert f"  {templates / 't.txt'}:1: reports.r1.text_template: template syntax error: " in done.stderr


# --------------------------------------------------------------------------- the loader never raises anything else

FIELD_NAMES = [
    *Config.model_fields,
    *Defaults.model_fields,
    *Report.model_fields,
    "r1",
    "datasource",
    "sql",
    "params",
    "task",
    "cron",
    "url",
    "seed",
    "<<",
]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**6), max_value=10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(
        [
            "0 7 * * *",
            "* * * * *",
            "UTC",
            "Europe/Berlin",
            "a@example.com",
            "Ann <ann@bücher.example>",
            "t.html",
            "1/s",
            "html",
            "pdf",
            "${X}",
            "$$",
            "${X:-y}",
            "10 MB",
            "cdn.example.com",
            "sqlite://",
        ]
    )
)
keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=10)
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5), max_leaves=30)
# YAML-looking text: fragments with a meaning to the YAML parser, glued together at random.
fragments = st.sampled_from(
    [
        "reports:",
        "\n",
        "  ",
        "- ",
        ": ",
        "r1",
        "schedule",
        '"',
        "'",
        "[",
        "]",
        "{",
        "}",
        ",",
        "&a ",
        "*a",
        "<<: ",
        "!!int ",
        "!!bool ",
        "!!float ",
        "!!str ",
        "!!timestamp ",
        "!!binary ",
        "!!python/object ",
        "? ",
        "#",
        "---",
        "...",
        "%YAML 1.1",
        "\t",
        "${",
        "}",
        "x",
        "1",
        "yes",
        "~",
        "|",
        ">",
    ]
)
yamlish = st.lists(fragments, max_size=40).map("".join)


@pytest.fixture(scope="module")
def templates_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    write_project(root, BASE)
    return root / "templates"


def config_or_config_error(load_it: Callable[[], Config]) -> None:
    try:
        result = load_it()
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, Problem) for p in exc.problems)
    else:
        assert isinstance(result, Config)


@settings(max_examples=300, deadline=None)
@given(document=documents)
@pytest.mark.slow
def test_any_yaml_document_is_a_config_or_a_config_error(templates_dir: Path, document: object) -> None:
    text = yaml.safe_dump(document, allow_unicode=True)
    config_or_config_error(lambda: parse(text, "fuzz.yaml", {"X": "1"}, templates_dir))


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=string.printable + "äß€\u2028", max_size=200) | yamlish)
def test_any_text_is_a_config_or_a_config_error(templates_dir: Path, text: str) -> None:
    config_or_config_error(lambda: parse(text, "fuzz.yaml", {}, templates_dir))


@settings(max_examples=100, deadline=None)
@given(content=st.binary(max_size=200) | documents.map(lambda d: yaml.safe_dump(d).encode("utf-16")))
def test_any_file_is_a_config_or_a_config_error(templates_dir: Path, content: bytes) -> None:
    path = templates_dir.parent / f"fuzz-{uuid.uuid4().hex[:8]}.yaml"
    path.write_bytes(content)
    try:
        config_or_config_error(lambda: load(path, {}, templates_dir))
    finally:
        path.unlink()


# =========================================================================== helpers for rendering and sending


@pytest.fixture
def renderers() -> Iterator[Callable[[Config], Renderer]]:
    """Renderers whose engines are disposed; sys.path and imported data modules restored after."""
    made: list[Renderer] = []
    path, modules = list(sys.path), set(sys.modules)

    def make(config: Config) -> Renderer:
        made.append(Renderer(config))
        return made[-1]

    yield make
    for renderer in made:
        renderer.datasources.dispose()
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        if name.startswith("hostile_data_"):
            del sys.modules[name]


def hostile_project(
    make_project: Callable[..., Project],
    reports: dict[str, Any],
    templates: dict[str, str] | None = None,
    rows: str | None = None,
    defaults: dict[str, Any] | None = None,
    datasources: dict[str, Any] | None = None,
) -> Project:
    """A project with REPORTS; ROWS is the body of the data function `rows(slot, report)` (module `data_module`)."""
    project = make_project()
    for name, text in (templates or {}).items():
        (project.root / "templates" / name).write_text(text)
    module = f"hostile_data_{uuid.uuid4().hex[:8]}"
    (project.root / f"{module}.py").write_text(f"def rows(slot, report):\n    {rows or 'return []'}\n")
    for report in reports.values():
        if report.get("function") == "DATA":
            report["function"] = f"{module}:rows"
    document = {
        "timezone": "UTC",
        "defaults": {
            "sender": "Reports <reports@example.com>",
            "soft_time_limit": 20,
            "time_limit": 30,
            "rate_limit": "50/s",
            **(defaults or {}),
        },
        "datasources": datasources or {"warehouse": {"url": f"sqlite:///{project.root}/warehouse.db", "seed": "orders.sql"}},
        "reports": reports,
    }
    project.config.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    return project


def report(**extra: Any) -> dict[str, Any]:
    return {
        "schedule": "0 7 * * *",
        "subject": "Report {{ row_count }}",
        "template": "simple.html",
        "function": "DATA",
        "formats": ["html"],
        "recipients": ["ann@example.com"],
        **extra,
    }


def loaded(project: Project) -> Config:
    return load(project.config, os.environ)


def pdf_text(data: bytes | None) -> str:
    assert data is not None and data.startswith(b"%PDF-")
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(data)).pages)


def ledger_bytes(project: Project) -> bytes:
    """Everything the SQLite ledger holds, as bytes: a secret in any row or column shows up here."""
    db = sqlite3.connect(project.root / "ledger.db")
    try:
        dump = "\n".join(db.iterdump()).encode()
    finally:
        db.close()
    return dump + b"".join(f.read_bytes() for f in project.root.glob("ledger.db*"))


# =========================================================================== 2. templates


UNDEFINED_CASES = [
    (
        "html-template",
        {"template": "page.html"},
        {"page.html": "<html><body>\n<h1>{{ report.name }}</h1>\n<p>{{ totl_amount }}</p>\n</body></html>\n"},
        "template page.html:3: 'totl_amount' is undefined",
    ),
    (
        "text-template",
        {"text_template": "plain.txt"},
        {"plain.txt": "{{ report.name }}\n{% for row in rows %}\n{{ row.regoin }}\n{% endfor %}\n"},
        "template plain.txt:3: 'dict object' has no attribute 'regoin'",
    ),
    (
        "included-template",
        {"template": "outer.html"},
        {"outer.html": "<html><body>\n{% include 'part.html' %}\n</body></html>\n", "part.html": "<p>ok</p>\n<p>{{ oops }}</p>\n"},
        "template part.html:2 (used by outer.html): 'oops' is undefined",
    ),
    ("subject", {"subject": "Sales {{ totl }}"}, {}, "SCHEDULES:LINE: reports.r.subject: 'totl' is undefined"),
    (
        "python-error-in-template",
        {"template": "div.html"},
        {"div.html": "<p>\n{{ 1 / 0 }}\n</p>\n"},
        "template div.html:2: ZeroDivisionError: division by zero",
    ),
    (
        "sandbox-escape-attempt",
        {"template": "escape.html"},
        {"escape.html": "{{ ''.__class__.__mro__[1].__subclasses__() }}\n"},
        "template escape.html:1: access to attribute '__class__' of 'str' object is unsafe.",
    ),
]


@pytest.mark.parametrize(("extra", "templates", "expected"), [c[1:] for c in UNDEFINED_CASES], ids=[c[0] for c in UNDEFINED_CASES])
def test_template_errors_name_the_template_line_and_name(
    make_project: Callable[..., Project],
    renderers: Callable[[Config], Renderer],
    extra: dict[str, str],
    templates: dict[str, str],
    expected: str,
) -> None:
    project = hostile_project(make_project, {"r": report(**extra)}, templates, rows="return [{'region': 'Mu', 'amount': 1}]")
    config = loaded(project)
    with pytest.raises(RenderError) as info:
        renderers(config).render("r", SLOT)
    subject_line = config.line_of("reports", "r", "subject")
    assert str(info.value) == expected.replace("SCHEDULES", str(project.config)).replace("LINE", str(subject_line))


def test_html_autoescapes_but_subject_and_text_do_not(
    make_project: Callable[..., Project], renderers: Callable[[Config], Renderer]
) -> None:
    project = hostile_project(
        make_project,
        {"r": report(subject="{{ rows[0].region }}")},
        rows="return [{'region': '<b>Fish & Chips</b>', 'amount': '\"1\"'}]",
    )
    rendered = renderers(loaded(project)).render("r", SLOT)
    assert "&lt;b&gt;Fish &amp; Chips&lt;/b&gt;" in rendered.html and "<b>Fish" not in rendered.html
    assert rendered.subject == "<b>Fish & Chips</b>"
    assert "<b>Fish & Chips</b>" in rendered.text


# =========================================================================== 3. what a PDF may load


class RecordingServer:
    """A real HTTP server on 127.0.0.1 that records every request and serves a stylesheet that would show."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                body = b"h1::after { content: ' FROM-LOCAL-SERVER'; }"
                self.send_response(200)
                self.send_header("Content-Type", "text/css")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def local_http() -> Iterator[RecordingServer]:
    server = RecordingServer()
    yield server
    server.close()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A stylesheet and a 'secret' outside the templates folder."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "evil.css").write_text('h1::after { content: " LEAKED-STYLESHEET"; }')
    (folder / "secret.txt").write_text("LEAKED-SECRET-FILE")
    return folder


def hostile_refs(outside: Path, port: int) -> list[str]:
    """Every way an HTML document can make WeasyPrint load something: stylesheets, @import, images, attachments."""
    targets = [
        "file:///etc/passwd",
        (outside / "evil.css").as_uri(),
        (outside / "secret.txt").as_uri(),
        "../../outside/evil.css",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        f"http://127.0.0.1:{port}/style.css",
        f"http://localhost:{port}/style.css",
    ]
    out = []
    for url in targets:
        out += [
            f'<link rel="stylesheet" href="{url}">',
            f"<style>@import url({url});</style>",
            f'<img src="{url}" alt="">',
            f'<link rel="attachment" href="{url}">',
            f'<a rel="attachment" href="{url}">attach</a>',
        ]
    return out


def assert_nothing_leaked(pdf: bytes | None) -> str:
    text = pdf_text(pdf)
    reader = PdfReader(io.BytesIO(pdf or b""))
    assert reader.attachments == {}
    assert b"/EmbeddedFile" not in (pdf or b"")
    for leaked in ("root:", "LEAKED", "FROM-LOCAL-SERVER"):
        assert leaked not in text
    assert b"root:x:0:0" not in (pdf or b"") and b"LEAKED" not in (pdf or b"")
    return text


# Allowlisted on purpose: loopback and link-local addresses must be refused even then.
RISKY_ALLOWLIST = ["127.0.0.1", "localhost", "169.254.169.254"]


def test_template_cannot_make_the_pdf_load_files_internal_hosts_or_attachments(
    make_project: Callable[..., Project],
    renderers: Callable[[Config], Renderer],
    outside: Path,
    local_http: RecordingServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    head = "\n".join(hostile_refs(outside, local_http.port))
    template = (
        f"<!doctype html><html><head>{head}\n<link rel='stylesheet' href='ok.css'></head>\n"
        "<body><h1>Fetch test</h1><p>{{ rows[0].region }}</p></body></html>"
    )
    project = hostile_project(
        make_project,
        {"r": report(template="hostile.html", formats=["html", "pdf"])},
        {"hostile.html": template, "ok.css": 'p::after { content: " ALLOWED-STYLE"; }'},
        rows="return [{'region': 'Still-rendered', 'amount': 1}]",
        defaults={"pdf_allowed_hosts": RISKY_ALLOWLIST},
    )
    with caplog.at_level(logging.WARNING, logger="reporter.fetch"):
        rendered = renderers(loaded(project)).render("r", SLOT)
    text = assert_nothing_leaked(rendered.pdf)
    assert "Fetch test" in text and "Still-rendered" in text and "Page 1 of 1" in text
    assert "ALLOWED-STYLE" in text  # a stylesheet in the templates folder still works
    assert local_http.requests == []  # not one request reached the loopback server
    refusals = "\n".join(r.getMessage() for r in caplog.records if r.name == "reporter.fetch")
    assert "refused to load file:///etc/passwd: outside the templates folder" in refusals
    assert f"refused to load {(outside / 'evil.css').as_uri()}: outside the templates folder" in refusals
    assert "169.254.169.254 resolves to 169.254.169.254, a link-local address" in refusals
    assert f"refused to load http://127.0.0.1:{local_http.port}/style.css: 127.0.0.1 resolves to 127.0.0.1, a loopback address" in refusals
    assert "localhost resolves to" in refusals


@pytest.mark.slow
def test_report_data_is_escaped_and_loads_nothing_even_when_a_template_trusts_it(
    make_project: Callable[..., Project],
    renderers: Callable[[Config], Renderer],
    outside: Path,
    local_http: RecordingServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    refs = hostile_refs(outside, local_http.port)
    # `safe.html` marks one column safe, as a careless template might: the fetcher is the last line.
    safe = "<html><body><h1>Trusting</h1>{% for row in rows %}<div>{{ row.region | safe }}</div>{% endfor %}</body></html>"
    project = hostile_project(
        make_project,
        {
            "escaped": report(formats=["html", "pdf"], subject="{{ rows[0].region }}"),
            "trusting": report(template="safe.html", formats=["html", "pdf"]),
        },
        {"safe.html": safe},
        rows=f"return [{{'region': r, 'amount': 1}} for r in {refs!r}]",
        defaults={"pdf_allowed_hosts": RISKY_ALLOWLIST},
    )
    renderer = renderers(loaded(project))
    with caplog.at_level(logging.WARNING, logger="reporter.fetch"):
        escaped = renderer.render("escaped", SLOT)
        trusting = renderer.render("trusting", SLOT)

    # Escaped: the markup is shown as text in the HTML body and the PDF, and nothing is fetched for it.
    assert "<link" not in escaped.html.split("<body>", 1)[1] and "<img" not in escaped.html
    # (The email HTML is re-serialised by the CSS inliner: quotes in text need no escaping, < and > do.)
    assert '&lt;link rel="attachment" href="file:///etc/passwd"&gt;' in escaped.html
    text = assert_nothing_leaked(escaped.pdf)
    assert '<link rel="attachment" href="file:///etc/passwd">' in text.replace("\n", "")

    # Trusted by a careless template: WeasyPrint sees the markup, and the fetcher refuses every load.
    assert '<link rel="attachment" href="file:///etc/passwd">' in trusting.html
    assert_nothing_leaked(trusting.pdf)
    assert local_http.requests == []
    refusals = "\n".join(r.getMessage() for r in caplog.records if r.name == "reporter.fetch")
    assert "refused to load file:///etc/passwd" in refusals
    assert "a link-local address" in refusals and "a loopback address" in refusals


@pytest.mark.parametrize(
    ("ip", "problem"),
    [
        ("127.0.0.1", "a loopback address"),
        ("::1", "a loopback address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("169.254.169.254", "a link-local address"),
        ("fe80::1%1", "a link-local address"),
        ("10.1.2.3", "a private address"),
        ("172.16.0.1", "a private address"),
        ("192.168.1.1", "a private address"),
        ("fd00::1", "a private address"),
        ("100.64.0.1", "not a public address"),
        ("224.0.0.1", "a multicast address"),
        ("0.0.0.0", "a private address"),
        ("240.0.0.1", "a private address"),
        ("93.184.215.14", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_which_addresses_a_pdf_may_connect_to(ip: str, problem: str | None) -> None:
    from reporter.fetch import address_problem

    assert address_problem(ip) == problem


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("cdn.example.com", True),
        ("CDN.Example.COM.", True),
        ("img.assets.example.org", True),
        ("assets.example.org", False),  # '*.example.org' means subdomains only
        ("evil-cdn.example.com", False),
        ("cdn.example.com.evil.net", False),
        ("bücher.example", True),
        ("169.254.169.254", False),
    ],
)
def test_which_hosts_are_on_the_allowlist(host: str, allowed: bool) -> None:
    from reporter.fetch import host_allowed

    assert host_allowed(host, ("cdn.example.com", "*.assets.example.org", "xn--bcher-kva.example")) is allowed


@pytest.mark.parametrize(
    ("location", "refused"),
    [
        (
            "http://169.254.169.254/latest/meta-data/",
            "redirect to http://169.254.169.254/latest/meta-data/: host '169.254.169.254' is not in",
        ),
        ("file:///etc/passwd", "redirect to file:///etc/passwd: a redirect may lead to http(s) only"),
        ("https://evil.example.net/x.png", "host 'evil.example.net' is not in defaults.pdf_allowed_hosts"),
        ("https://cdn.example.com/logo.png", None),
    ],
)
def test_redirects_are_followed_only_to_allowed_hosts(tmp_path: Path, location: str, refused: str | None) -> None:
    from urllib.request import Request

    from reporter.fetch import Refused, ResourceFetcher, _CheckedRedirects

    redirects = _CheckedRedirects(ResourceFetcher(tmp_path, ["cdn.example.com"]))
    original = Request("https://cdn.example.com/old.png")
    if refused is None:
        follow = redirects.redirect_request(original, None, 302, "Found", {}, location)
        assert follow is not None and follow.full_url == location
    else:
        with pytest.raises(Refused) as info:
            redirects.redirect_request(original, None, 302, "Found", {}, location)
        assert refused in str(info.value)


def test_allowed_host_resolving_to_loopback_is_refused_before_connecting(tmp_path: Path, local_http: RecordingServer) -> None:
    from reporter.fetch import Refused, ResourceFetcher

    fetcher = ResourceFetcher(tmp_path, ["localhost", "127.0.0.1"])
    for url in (f"http://localhost:{local_http.port}/a.css", f"http://127.0.0.1:{local_http.port}/b.css"):
        with pytest.raises(Refused, match="a loopback address"):
            fetcher(url)
    assert local_http.requests == []


# =========================================================================== 4. email headers

INJECTED = "Sales\r\nBcc: evil@example.net\r\nX-Evil: 1\x00\x1b[31m\x07\u2028done\x7f"


@pytest.mark.slow
def test_subject_from_data_cannot_inject_headers(make_project: Callable[..., Project], inbox: Inbox) -> None:
    project = hostile_project(
        make_project, {"r": report(subject="{{ rows[0].region }}")}, rows=f"return [{{'region': {INJECTED!r}, 'amount': 1}}]"
    )
    done = run_cli("send", "r", "--sync", env=project.env(REPORTER_SMTP_URL=inbox.url))
    assert done.returncode == 0, done.stdout + done.stderr
    [msg] = inbox.messages
    assert inbox.envelopes == [("reports@example.com", ["ann@example.com"])]
    assert msg["Bcc"] is None and msg["X-Evil"] is None
    assert msg["Subject"] == "Sales Bcc: evil@example.net X-Evil: 1 [31m done"
    # The body is still the body: no blank line smuggled into the headers ended them early.
    assert "\r\n1 row; totals: amount 1.\r\n" in msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]


@pytest.mark.slow
def test_recipient_from_the_command_line_cannot_inject_headers(make_project: Callable[..., Project], inbox: Inbox) -> None:
    project = make_project()
    done = run_cli(
        "send", "regional", "--sync", "--to", "ann@example.com\r\nBcc: evil@example.net", env=project.env(REPORTER_SMTP_URL=inbox.url)
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "--to: address 'ann@example.com\\r\\nBcc: evil@example.net' contains control characters" in done.stderr
    assert inbox.messages == []


@pytest.mark.parametrize(
    ("sender", "to", "message"),
    [
        ("Reports <r@example.com>\r\nBcc: evil@example.net", ["ann@example.com"], "contains control characters"),
        ("Reports <r@example.com>", ["ann@example.com\nBcc: evil@example.net"], "contains control characters"),
        ("Reports <r@example.com>", ["ann@example.com, evil@example.net"], "holds several addresses"),
        ("r@example.com, evil@example.net", ["ann@example.com"], "holds several addresses"),
    ],
    ids=["sender-crlf", "recipient-lf", "recipient-two-addresses", "sender-two-addresses"],
)
def test_build_refuses_anything_but_one_address_per_sender_or_recipient(sender: str, to: list[str], message: str) -> None:
    from reporter.mail import build
    from reporter.render import Rendered

    rendered = Rendered("r", SLOT, "Subject", "<p>x</p>", "x", None, None, 1)
    with pytest.raises(ValueError, match=message):
        build(rendered, sender, to, [], "<x@example.com>", with_html=True)


@pytest.mark.slow
def test_internationalised_domains_go_out_in_ascii(make_project: Callable[..., Project], inbox: Inbox) -> None:
    project = hostile_project(
        make_project,
        {"r": report(recipients=["Jörg Müller <joerg@bücher.example>"], cc=["ops@ex\u00e4mple.com"])},
        defaults={"sender": "Berichte <reports@exämple.com>"},
    )
    done = run_cli("send", "r", "--sync", env=project.env(REPORTER_SMTP_URL=inbox.url))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("joerg@xn--bcher-kva.example\tsent\t")
    assert inbox.envelopes == [("reports@xn--exmple-cua.com", ["joerg@xn--bcher-kva.example", "ops@xn--exmple-cua.com"])]
    [msg] = inbox.messages
    assert msg["To"] == "Jörg Müller <joerg@xn--bcher-kva.example>"
    assert msg["From"] == "Berichte <reports@xn--exmple-cua.com>"
    assert msg["Cc"] == "ops@xn--exmple-cua.com"


@pytest.mark.slow
def test_non_ascii_mailbox_needs_smtputf8_and_fails_for_good_without_it(
    make_project: Callable[..., Project], inbox: Inbox, smtp_server: Callable[..., Inbox]
) -> None:
    project = hostile_project(make_project, {"r": report(recipients=["jörg@example.com"])})
    done = run_cli("send", "r", "--sync", env=project.env(REPORTER_SMTP_URL=inbox.url))  # aiosmtpd offers SMTPUTF8
    assert done.returncode == 0, done.stdout + done.stderr
    assert inbox.envelopes == [("reports@example.com", ["jörg@example.com"])]

    plain = smtp_server(enable_SMTPUTF8=False)
    done = run_cli("send", "r", "--sync", "--slot", "2026-07-01T07:00Z", env=project.env(REPORTER_SMTP_URL=plain.url))
    assert done.returncode == 2
    [line] = done.stdout.splitlines()
    assert line.startswith(f"jörg@example.com\tfailed\tSMTP 127.0.0.1:{plain.port}: ")
    assert "SMTPUTF8" in line
    assert plain.messages == []


# =========================================================================== 5. limits

ROWS_30 = "return [{'region': f'Region-{i:02d}', 'amount': i} for i in range(30)]"


@pytest.mark.slow
def test_row_cap_shows_the_first_rows_with_a_note_and_the_csv_has_all(
    make_project: Callable[..., Project], renderers: Callable[[Config], Renderer]
) -> None:
    shows_notes = (
        "<html><body><ul>{% for n in notes %}<li>{{ n }}</li>{% endfor %}</ul><p>{{ rows_shown }}/{{ row_count }}</p></body></html>"
    )
    project = hostile_project(
        make_project,
        {
            "capped": report(formats=["html", "pdf", "csv"], max_rows=10),
            "no-csv": report(formats=["html"], max_rows=10),
            "own-notes": report(template="notes.html", formats=["html"], max_rows=10),
            "uncapped": report(formats=["html", "csv"]),
        },
        {"notes.html": shows_notes},
        rows=ROWS_30,
    )
    renderer = renderers(loaded(project))
    note = "Showing the first 10 of 30 rows; the attached CSV has all of them."

    capped = renderer.render("capped", SLOT)
    assert capped.notes == (note,)
    assert capped.row_count == 30
    assert capped.html.count("<tr><td>Region-") == 10 and "Region-09" in capped.html and "Region-10" not in capped.html
    assert '<body><div class="reporter-notes"' in capped.html and f"<p>{note}</p>" in capped.html
    assert f"Note: {note}" in capped.text
    assert "Region-09" in capped.text and "Region-10" not in capped.text
    pdf = pdf_text(capped.pdf)
    assert "Showing the first 10 of 30 rows" in pdf and "Region-09" in pdf and "Region-10" not in pdf
    assert capped.csv is not None and len(capped.csv.decode().splitlines()) == 31

    assert renderer.render("no-csv", SLOT).notes == ("Showing the first 10 of 30 rows.",)
    own = renderer.render("own-notes", SLOT)
    assert own.html.count("Showing the first 10 of 30 rows") == 1  # the template shows it; nothing added
    assert "<p>10/30</p>" in own.html and "reporter-notes" not in own.html

    uncapped = renderer.render("uncapped", SLOT)  # the default cap is 5,000
    assert uncapped.notes == () and uncapped.html.count("<tr><td>Region-") == 30 and "reporter-notes" not in uncapped.html


@pytest.mark.slow
def test_attachments_over_the_size_cap_are_left_out_with_a_note(
    make_project: Callable[..., Project], renderers: Callable[[Config], Renderer], inbox: Inbox
) -> None:
    from reporter.mail import SmtpSettings, SmtpTransport, build

    project = hostile_project(
        make_project,
        {"big": report(formats=["html", "pdf", "csv"], max_attachment_bytes="0.5 kB")},
        rows="return [{'region': 'Region-' + 'x' * 40, 'amount': i} for i in range(30)]",
    )
    rendered = renderers(loaded(project)).render("big", SLOT)
    assert rendered.pdf is None and rendered.csv is None and rendered.attachments() == []
    csv_note, pdf_note = rendered.notes
    assert csv_note.startswith("The CSV attachment (") and csv_note.endswith(
        "was left out: it is larger than the 500 bytes limit (max_attachment_bytes)."
    )
    assert pdf_note.startswith("The PDF attachment (") and pdf_note.endswith("limit (max_attachment_bytes).")
    for note in (csv_note, pdf_note):
        assert f"<p>{note}</p>" in rendered.html and f"Note: {note}" in rendered.text

    mailer = SmtpTransport(SmtpSettings.from_url(inbox.url))
    mailer.send(
        build(rendered, "reports@example.com", ["ann@example.com"], [], "<big@example.com>", True),
        "reports@example.com",
        ["ann@example.com"],
    )
    mailer.close()
    [msg] = inbox.messages
    assert [p.get_content_type() for p in msg.walk()] == ["multipart/alternative", "text/plain", "text/html"]
    assert pdf_note in msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]


SLOW_SQLITE = "with recursive n(i) as (select 1 union all select i + 1 from n where i < 1000000000) select count(*) as c from n"


def test_a_query_over_its_timeout_is_stopped_with_a_clear_error(
    make_project: Callable[..., Project], renderers: Callable[[Config], Renderer]
) -> None:
    project = hostile_project(
        make_project,
        {
            "slow": report(function=None, query={"datasource": "warehouse", "sql": SLOW_SQLITE}, query_timeout=0.2),
            "quick": report(function=None, query={"datasource": "warehouse", "sql": "select region, amount from orders"}),
        },
    )
    renderer = renderers(loaded(project))
    with pytest.raises(DataError) as info:
        renderer.render("slow", SLOT)
    assert str(info.value) == (
        "report 'slow': the query ran longer than query_timeout (0.2 s) and was stopped; "
        "make it faster, or raise query_timeout for this report"
    )
    # The pooled connection is not left with the time limit on it.
    assert renderer.render("quick", SLOT).row_count == 3


def test_a_postgresql_query_over_its_timeout_is_stopped(
    make_project: Callable[..., Project], renderers: Callable[[Config], Renderer], pg_url: str
) -> None:
    project = hostile_project(
        make_project,
        {
            "slow": report(function=None, query={"datasource": "pg", "sql": "select pg_sleep(30)"}, query_timeout=0.3),
            "quick": report(function=None, query={"datasource": "pg", "sql": "select current_setting('statement_timeout') as t"}),
        },
        datasources={"pg": {"url": pg_url}},
    )
    renderer = renderers(loaded(project))
    with pytest.raises(DataError, match=r"ran longer than query_timeout \(0\.3 s\) and was stopped"):
        renderer.render("slow", SLOT)
    quick = renderer.datasources.fetch("quick", loaded(project).reports["quick"], SLOT, {})
    assert quick.rows == (("1min",),)  # the default 60 s, set for that query alone


# =========================================================================== 6. secrets

PASSWORD = "Pa55-w0rd-hunter2"


@pytest.fixture
def smtp_server() -> Iterator[Callable[..., Inbox]]:
    """Start aiosmtpd servers with the given SMTP options (AUTH, SMTPUTF8); stopped afterwards."""
    from aiosmtpd.controller import Controller

    from reporter.runner import free_port

    controllers: list[Controller] = []

    def start(**smtp_options: Any) -> Inbox:
        box = Inbox("127.0.0.1", free_port())
        controllers.append(Controller(box, hostname=box.host, port=box.port, **smtp_options))
        controllers[-1].start()
        return box

    yield start
    for controller in controllers:
        controller.stop()


def right_password_only(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> Any:
    """aiosmtpd authenticator: bot / right-password, nobody else."""
    from aiosmtpd.smtp import AuthResult, LoginPassword

    ok = isinstance(auth_data, LoginPassword) and auth_data.login == b"bot" and auth_data.password == b"right-password"
    return AuthResult(success=ok, handled=False)  # not handled: aiosmtpd sends the 535 reply itself


@pytest.mark.slow
def test_failing_smtp_login_prints_no_password(make_project: Callable[..., Project], smtp_server: Callable[..., Inbox]) -> None:
    auth_inbox = smtp_server(authenticator=right_password_only, auth_require_tls=False)
    project = make_project(recipients=["ann@example.com", "ben@example.com"])
    env = project.env(REPORTER_SMTP_URL=f"smtp://bot:{PASSWORD}@{auth_inbox.host}:{auth_inbox.port}")
    done = run_cli("send", "regional", "--sync", env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all("\tfailed\tSMTP login as 'bot' refused by 127.0.0.1:" in line for line in lines)
    history = run_cli("history", env=env)
    assert history.returncode == 0 and "SMTP login as 'bot' refused" in history.stdout
    for output in (done.stdout, done.stderr, history.stdout, history.stderr):
        assert PASSWORD not in output
    assert PASSWORD.encode() not in ledger_bytes(project)
    assert b"SMTP login as ''bot'' refused by 127.0.0.1" in ledger_bytes(project)  # the error is recorded, as SQL
    assert auth_inbox.messages == []


@pytest.mark.slow
def test_validate_connect_logs_in_to_smtp_and_prints_no_password(
    make_project: Callable[..., Project], smtp_server: Callable[..., Inbox]
) -> None:
    auth_inbox = smtp_server(authenticator=right_password_only, auth_require_tls=False)
    project = make_project()
    where = f"{auth_inbox.host}:{auth_inbox.port}"
    wrong = run_cli("validate", "--connect", env=project.env(REPORTER_SMTP_URL=f"smtp://bot:{PASSWORD}@{where}"))
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert "Traceback" not in wrong.stderr
    assert wrong.stdout.splitlines()[-1] == (
        f"mail (SMTP smtp://{where}): does not answer: SMTP login as 'bot' refused by {where}: 535 5.7.8 Authentication credentials invalid"
    )
    right = run_cli("validate", "--connect", env=project.env(REPORTER_SMTP_URL=f"smtp://bot:right-password@{where}"))
    assert right.returncode == 0, right.stdout + right.stderr
    assert right.stdout.splitlines()[-1] == f"mail (SMTP smtp://{where}): answers (logged in as 'bot')"
    for output in (wrong.stdout, wrong.stderr, right.stdout, right.stderr):
        assert PASSWORD not in output and "right-password" not in output
    assert auth_inbox.messages == []


@pytest.mark.slow
def test_unreachable_datasource_with_a_password_leaks_it_nowhere(make_project: Callable[..., Project]) -> None:
    from reporter.runner import free_port

    url = f"postgresql+psycopg://reporter:{PASSWORD}@127.0.0.1:{free_port()}/warehouse"
    project = hostile_project(
        make_project,
        {"r": report(function=None, query={"datasource": "warehouse", "sql": "select 1"})},
        datasources={"warehouse": {"url": "${WAREHOUSE_URL}"}},
    )
    env = project.env(WAREHOUSE_URL=url)
    sent = run_cli("send", "r", "--sync", env=env)
    assert sent.returncode == 2, sent.stdout + sent.stderr
    assert "\tfailed\treport 'r': datasource 'warehouse': " in sent.stdout
    preview = run_cli("preview", "r", "--out", str(project.root / "preview"), env=env)
    assert preview.returncode == 1 and "Traceback" not in preview.stderr
    history = run_cli("history", env=env)
    for output in (sent.stdout, sent.stderr, preview.stdout, preview.stderr, history.stdout, history.stderr):
        assert PASSWORD not in output
    assert PASSWORD.encode() not in ledger_bytes(project)


def test_smtp_settings_never_show_the_password() -> None:
    from reporter.mail import SmtpSettings

    settings_ = SmtpSettings.from_url(f"smtp://bot:{PASSWORD}@mail.example.com:587")
    assert settings_.password == PASSWORD
    assert PASSWORD not in repr(settings_) and PASSWORD not in str(settings_)
