"""reporter.config: the shipped example loads; every broken config is refused with file, line and field."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reporter.config import Config, load, normalize_address
from reporter.errors import ConfigError, Problem
from reporter.yamldoc import MAX_VALUES

ROOT = Path(__file__).resolve().parent.parent

# A minimal valid report; line 1 is "reports:", line 2 the report's name, lines 3-6 its keys.
BASE = """\
reports:
  r1:
    schedule: "0 7 * * *"
    subject: Hi
    template: t.html
    recipients: [a@example.com]
"""


def write_project(root: Path, content: str | bytes) -> Path:
    """schedules.yaml with CONTENT beside a templates/ folder holding t.html and t.txt."""
    (root / "templates").mkdir(parents=True, exist_ok=True)
    (root / "templates" / "t.html").write_text("<p>{{ report.name }}</p>")
    (root / "templates" / "t.txt").write_text("{{ report.name }}")
    path = root / "schedules.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


# --------------------------------------------------------------------------- good configs


def test_shipped_schedules_yaml_loads() -> None:
    env = {k: v for k, v in os.environ.items() if k != "WAREHOUSE_URL"}
    config = load(ROOT / "schedules.yaml", env)
    assert isinstance(config, Config)
    assert sorted(config.reports) == ["big-orders", "sales-by-region", "sales-daily", "signups"]
    assert sorted(config.beat) == ["email_reports.prune_ledger", "email_reports.schedule_hourly"]
    assert config.beat["email_reports.schedule_hourly"].cron == "1 * * * *"
    sales = config.reports["sales-daily"]
    assert sales.schedule == "0 7 * * 1-5"
    assert str(config.zone(sales)) == "Europe/Berlin"
    assert sales.formats == ("html", "pdf", "csv")
    # ${WAREHOUSE_URL:-default} falls back to the bundled SQLite sample.
    assert config.datasources["warehouse"].url == "sqlite:///var/warehouse.db"
    assert config.templates_dir == ROOT / "templates"
    assert config.source == ROOT / "schedules.yaml"


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    config = load(write_project(tmp_path, BASE), {})
    report = config.reports["r1"]
    assert config.timezone == "UTC"
    assert report.formats == ("html",)
    assert report.recipients == ("a@example.com",)
    assert config.sender_of(report) == "Reports <reports@example.com>"
    assert config.rate_of(report) == 1.0
    assert config.defaults.soft_time_limit < config.defaults.time_limit


def test_environment_variables_are_expanded(tmp_path: Path) -> None:
    text = """\
datasources:
  set:
    url: "${DB_URL}"
  defaulted:
    url: "${UNSET_DB_URL:-sqlite:///fallback.db}"
  empty-uses-default:
    url: "${EMPTY_DB_URL:-sqlite:///empty.db}"
reports:
  r1:
    schedule: "0 7 * * *"
    subject: "Costs $$5 on ${HOST:-nowhere}"
    template: t.html
    recipients: ["${TO}"]
"""
    env = {"DB_URL": "postgresql://u@db/x", "EMPTY_DB_URL": "", "TO": "ops@example.com"}
    config = load(write_project(tmp_path, text), env)
    assert config.datasources["set"].url == "postgresql://u@db/x"
    assert config.datasources["defaulted"].url == "sqlite:///fallback.db"
    assert config.datasources["empty-uses-default"].url == "sqlite:///empty.db"
    assert config.reports["r1"].subject == "Costs $5 on nowhere"
    assert config.reports["r1"].recipients == ("ops@example.com",)


def test_rates_are_emails_per_second(tmp_path: Path) -> None:
    config = load(write_project(tmp_path, "defaults:\n  rate_limit: 30/m\n" + BASE + "    rate_limit: 7200/h\n"), {})
    assert config.rate_of(config.reports["r1"]) == 2.0


# --------------------------------------------------------------------------- broken configs


@dataclass(frozen=True)
class Case:
    id: str
    content: str | bytes
    expected: list[tuple[int | None, str, str]]
    """(line, dotted field, fragment of the message) of every problem, in the order reported."""


CASES = [
    Case("yaml-syntax-tab", "reports:\n\tr1: 1\n", [(2, "", "YAML syntax error")]),
    Case("yaml-syntax-unclosed-quote", 'reports:\n  r1:\n    subject: "Hi\n', [(4, "", "YAML syntax error")]),
    Case("yaml-syntax-mapping-in-scalar", "reports:\n  r1: a: b\n", [(2, "", "YAML syntax error: mapping values are not allowed")]),
    Case("empty-file", "", [(None, "", "the document is empty")]),
    Case("only-comments", "# nothing here\n\n", [(None, "", "the document is empty")]),
    Case("list-not-mapping", "- a\n- b\n", [(1, "", "a list, not a mapping")]),
    Case("non-utf8", b"reports:\n  r1:\n    subject: \xff\xfe caf\xe9\n", [(None, "", "not a UTF-8 text file")]),
    Case("nul-bytes", "reports:\x00\n", [(None, "", "NUL bytes")]),
    Case(
        "duplicate-report-name",
        BASE + '  r1:\n    schedule: "0 8 * * *"\n    subject: Again\n    template: t.html\n    recipients: [b@example.com]\n',
        [(7, "reports.r1", "duplicate key (first defined on line 2)")],
    ),
    Case("duplicate-field", BASE + "    subject: Twice\n", [(7, "reports.r1.subject", "duplicate key (first defined on line 4)")]),
    Case(
        "unknown-key-did-you-mean",
        BASE.replace("schedule:", "schedul:"),
        [(2, "reports.r1.schedule", "is required but missing"), (3, "reports.r1.schedul", "unknown key (did you mean 'schedule'?)")],
    ),
    Case(
        "unknown-top-level-key",
        "timezone: UTC\nreport:\n  r1: {}\n" + BASE,
        [(2, "report", "unknown key (did you mean 'reports'?)")],
    ),
    Case("wrong-type-formats-string", BASE + "    formats: html\n", [(7, "reports.r1.formats", "must be a list, not a string")]),
    Case(
        "wrong-type-subject-list",
        BASE.replace("subject: Hi", "subject: [a, b]"),
        [(4, "reports.r1.subject", "must be a string, not a list")],
    ),
    Case("wrong-type-bool", BASE + "    group: maybe\n", [(7, "reports.r1.group", "must be true or false, not 'maybe'")]),
    Case("wrong-type-report-not-mapping", "reports:\n  r1: 5\n", [(2, "reports.r1", "must be a mapping, not a number")]),
    Case("cron-out-of-range", BASE.replace("0 7 * * *", "0 25 * * *"), [(3, "reports.r1.schedule", "invalid cron '0 25 * * *'")]),
    Case("cron-field-count", BASE.replace("0 7 * * *", "0 7 * *"), [(3, "reports.r1.schedule", "has 4 fields; expected 5")]),
    Case("cron-garbage", BASE.replace("0 7 * * *", "every day"), [(3, "reports.r1.schedule", "has 2 fields")]),
    Case("unknown-timezone", BASE + "    timezone: Mars/Olympus\n", [(7, "reports.r1.timezone", "unknown timezone 'Mars/Olympus'")]),
    Case("unknown-top-level-timezone", "timezone: Europe/Berln\n" + BASE, [(1, "timezone", "unknown timezone 'Europe/Berln'")]),
    Case(
        "soft-equals-hard-time-limit",
        "defaults:\n  soft_time_limit: 120\n  time_limit: 120\n" + BASE,
        [(2, "defaults.soft_time_limit", "must be below time_limit (120 >= 120)")],
    ),
    Case(
        "soft-above-hard-time-limit",
        "defaults:\n  time_limit: 60\n  soft_time_limit: 90\n" + BASE,
        [(3, "defaults.soft_time_limit", "must be below time_limit (90 >= 60)")],
    ),
    Case("negative-time-limit", "defaults:\n  soft_time_limit: -5\n" + BASE, [(2, "defaults.soft_time_limit", "greater than 0")]),
    Case(
        "invalid-email",
        BASE.replace("a@example.com", "not-an-email"),
        [(6, "reports.r1.recipients[0]", "'not-an-email' is not an email address")],
    ),
    Case(
        "invalid-second-email",
        BASE.replace("[a@example.com]", "[a@example.com, b@@example.com]"),
        [(6, "reports.r1.recipients[1]", "'b@@example.com' is not an email address")],
    ),
    Case(
        "email-with-header-injection",
        BASE.replace("[a@example.com]", '["a@example.com\\r\\nBcc: x@example.net"]'),
        [(6, "reports.r1.recipients[0]", "contains control characters")],
    ),
    Case("invalid-sender", "defaults:\n  sender: nobody\n" + BASE, [(2, "defaults.sender", "'nobody' is not an email address")]),
    Case("invalid-owner", BASE + "    owners:\n      - ops at example.com\n", [(8, "reports.r1.owners[0]", "is not")]),
    Case("empty-recipients", BASE.replace("[a@example.com]", "[]"), [(6, "reports.r1.recipients", "is empty; list at least one address")]),
    Case("missing-template", BASE.replace("t.html", "missing.html"), [(5, "reports.r1.template", "template 'missing.html' not found")]),
    Case(
        "missing-text-template",
        BASE + "    text_template: missing.txt\n",
        [(7, "reports.r1.text_template", "template 'missing.txt' not found")],
    ),
    Case(
        "undefined-variable",
        "datasources:\n  w:\n    url: ${NOPE_VAR}\n" + BASE,
        [(3, "datasources.w.url", "environment variable NOPE_VAR is not set")],
    ),
    Case(
        "undefined-variable-in-list",
        BASE.replace("[a@example.com]", '["${RCPT}"]'),
        [
            (6, "reports.r1.recipients[0]", "environment variable RCPT is not set"),
            (6, "reports.r1.recipients[0]", "is not an email address"),
        ],
    ),
    Case(
        "unknown-datasource",
        "datasources:\n  warehouse:\n    url: sqlite://\n" + BASE + "    query:\n      datasource: warehous\n      sql: select 1\n",
        [(11, "reports.r1.query.datasource", "unknown datasource 'warehous' (did you mean 'warehouse'?) (known: warehouse)")],
    ),
    Case(
        "datasource-without-any-defined",
        BASE + "    query:\n      datasource: wh\n      sql: select 1\n",
        [(8, "reports.r1.query.datasource", "unknown datasource 'wh' (known: none defined)")],
    ),
    Case(
        "missing-seed-file",
        "datasources:\n  w:\n    url: sqlite://\n    seed: nope.sql\n" + BASE,
        [(4, "datasources.w.seed", "nope.sql not found")],
    ),
    Case(
        "unknown-beat-task",
        'beat:\n  hourly:\n    task: email_reports.schedule_hourl\n    cron: "1 * * * *"\n' + BASE,
        [(3, "beat.hourly.task", "unknown task 'email_reports.schedule_hourl' (did you mean 'email_reports.schedule_hourly'?)")],
    ),
    Case(
        "bad-beat-cron",
        'beat:\n  hourly:\n    task: email_reports.schedule_hourly\n    cron: "1 * * *"\n' + BASE,
        [(4, "beat.hourly.cron", "has 4 fields")],
    ),
    Case(
        "beat-missing-cron",
        "beat:\n  hourly:\n    task: email_reports.schedule_hourly\n" + BASE,
        [(2, "beat.hourly.cron", "is required but missing")],
    ),
    Case("bad-rate-limit", "defaults:\n  rate_limit: fast\n" + BASE, [(2, "defaults.rate_limit", "rate 'fast' is not like '1/s'")]),
    Case("zero-rate-limit", BASE + "    rate_limit: 0/s\n", [(7, "reports.r1.rate_limit", "rate '0/s' is not like")]),
    Case(
        "query-and-function",
        "datasources:\n  w:\n    url: sqlite://\n"
        + BASE
        + "    function: mod:func\n    query:\n      datasource: w\n      sql: select 1\n",
        [(5, "reports.r1", "give either 'query' or 'function', not both")],
    ),
    Case("function-not-module-colon-name", BASE + "    function: notamodule\n", [(7, "reports.r1.function", "must be 'module:function'")]),
    Case("bad-format", BASE + "    formats: [html, docx]\n", [(7, "reports.r1.formats[1]", "'docx' is not one of html, pdf, csv")]),
    Case("format-twice", BASE + "    formats: [pdf, pdf]\n", [(7, "reports.r1.formats", "lists a format twice")]),
    Case("missing-subject", BASE.replace("    subject: Hi\n", ""), [(2, "reports.r1.subject", "is required but missing")]),
    Case("missing-reports", "timezone: UTC\n", [(1, "reports", "is required but missing")]),
    Case("no-reports", "reports: {}\n", [(1, "reports", "no reports defined")]),
    Case("bad-report-name", BASE.replace("r1:", '"daily sales!":'), [(2, "reports.daily sales!", "a report name may use letters, digits")]),
    Case("negative-max-retries", BASE + "    max_retries: -1\n", [(7, "reports.r1.max_retries", "must be at least 0, not -1")]),
    Case("non-scalar-key", "? [a, b]\n: 1\n" + BASE, [(1, "", "a key must be a plain value")]),
    Case("python-tag", BASE + "    description: !!python/name:os.system x\n", [(7, "reports.r1.description", "bad value")]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_broken_config_is_refused_with_line_and_field(tmp_path: Path, case: Case) -> None:
    path = write_project(tmp_path, case.content)
    with pytest.raises(ConfigError) as info:
        load(path, {})
    problems = info.value.problems
    assert all(isinstance(p, Problem) for p in problems)
    assert [(p.line, p.field) for p in problems] == [(line, field) for line, field, _ in case.expected], problems
    for problem, (_, _, fragment) in zip(problems, case.expected, strict=True):
        assert problem.file == str(path)
        assert fragment in problem.message, problem
    # The exception's text is what the CLI prints: every problem, located.
    text = str(info.value)
    for problem in problems:
        assert str(problem) in text
        if problem.line is not None:
            assert f"{path}:{problem.line}: " in text


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "nope.yaml", {})
    [problem] = info.value.problems
    assert problem.file == str(tmp_path / "nope.yaml")
    assert "file not found" in problem.message


def test_every_problem_is_reported_at_once_sorted_by_line(tmp_path: Path) -> None:
    text = """\
timezone: Nope/Zone
defaults:
  rate_limit: fast
  soft_time_limit: 200
  time_limit: 100
beat:
  hourly:
    task: email_reports.nothing
    cron: "1 * * *"
reports:
  r1:
    schedule: "bad"
    subject: Hi
    template: missing.html
    recipients: [nope]
  r2:
    schedule: "0 7 * * *"
    subject: Hi
    template: t.html
    recipients: [ok@example.com]
    timezone: Moon/Base
"""
    with pytest.raises(ConfigError) as info:
        load(write_project(tmp_path, text), {})
    got = [(p.line, p.field) for p in info.value.problems]
    assert got == [
        (1, "timezone"),
        (3, "defaults.rate_limit"),
        (4, "defaults.soft_time_limit"),
        (8, "beat.hourly.task"),
        (9, "beat.hourly.cron"),
        (12, "reports.r1.schedule"),
        (14, "reports.r1.template"),
        (15, "reports.r1.recipients[0]"),
        (21, "reports.r2.timezone"),
    ]
    lines = [p.line or 0 for p in info.value.problems]
    assert lines == sorted(lines)


def test_model_errors_are_all_reported_at_once(tmp_path: Path) -> None:
    """Type errors in several reports come back together, not one per run."""
    text = BASE + "    formats: [docx]\n    group: perhaps\n  r2:\n    template: t.html\n    recipients: [a@example.com]\n"
    with pytest.raises(ConfigError) as info:
        load(write_project(tmp_path, text), {})
    assert [(p.line, p.field) for p in info.value.problems] == [
        (7, "reports.r1.formats[0]"),
        (8, "reports.r1.group"),
        (9, "reports.r2.schedule"),
        (9, "reports.r2.subject"),
    ]


# --------------------------------------------------------------------------- never anything but ConfigError

# Explicitly tagged scalars whose value does not fit the tag, and merge keys that merge a scalar:
# YAML errors in the user's file, so they must come back as a located ConfigError.
TAG_AND_MERGE_MISTAKES = [
    ("bad-bool", BASE + "    enabled: !!bool nah\n", 7, "reports.r1.enabled"),
    ("bad-int", BASE + "    max_retries: !!int three\n", 7, "reports.r1.max_retries"),
    ("bad-float", "defaults:\n  time_limit: !!float soon\n" + BASE, 2, "defaults.time_limit"),
    ("bad-timestamp", BASE + "    description: !!timestamp 2020-13-45\n", 7, "reports.r1.description"),
    ("merge-a-scalar", "reports:\n  r1:\n    <<: 5\n    subject: Hi\n", 3, "reports.r1"),
    ("merge-a-list-of-scalars", "<<: [1, 2]\n" + BASE, 1, ""),
]


@pytest.mark.parametrize(("text", "line", "field"), [c[1:] for c in TAG_AND_MERGE_MISTAKES], ids=[c[0] for c in TAG_AND_MERGE_MISTAKES])
def test_tag_and_merge_mistakes_are_config_errors(tmp_path: Path, text: str, line: int, field: str) -> None:
    path = write_project(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, {})
    # Where exactly the field path ends (the mapping or its '<<' key) is the loader's choice.
    assert any(p.file == str(path) and p.line == line and p.field.startswith(field) for p in info.value.problems), info.value.problems


# The property tests (any YAML document or file gives a Config or a ConfigError) are in test_hostile.py.


# --------------------------------------------------------------------------- YAML with bounded effort

# Nine lists of nine aliases each: a few hundred bytes that would expand to 9**9 values.
ALIAS_BOMB = (
    'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    + "".join(f"{cur}: &{cur} [{', '.join([f'*{prev}'] * 9)}]\n" for prev, cur in zip("abcdefgh", "bcdefghi", strict=True))
    + BASE
)
MERGE_BOMB = (
    "x0: &x0 {k0: 1, k1: 2, k2: 3, k3: 4, k4: 5, k5: 6, k6: 7, k7: 8, k8: 9}\n"
    + "".join(f"x{i}: &x{i} {{<<: [{', '.join([f'*x{i - 1}'] * 9)}]}}\n" for i in range(1, 10))
    + BASE
)
ALIAS_HINT = "write the values out, or use fewer aliases"

YAML_LIMITS = [
    # The first list of 9**5 values is where expansion passes 50,000: line 5, key e.
    ("alias-bomb", ALIAS_BOMB, f"schedules.yaml:5: e: aliases expand this file to more than 50,000 values; {ALIAS_HINT}"),
    (
        "merge-key-bomb",
        MERGE_BOMB,
        "schedules.yaml:5: x4: merge keys (<<) expand to more than 50,000 values (or merge a mapping into itself); " + ALIAS_HINT,
    ),
    (
        "mapping-merging-itself",
        BASE + "    description: &d {<<: *d}\n",
        "schedules.yaml:7: reports.r1.description: merge keys (<<) expand to more than 50,000 values (or merge a mapping into itself); "
        + ALIAS_HINT,
    ),
    (
        "too-many-values",
        "x: [" + ", ".join(["1"] * MAX_VALUES) + "]\n" + BASE,
        f"schedules.yaml:1: more than {MAX_VALUES:,} values; is this the right file?",
    ),
    (
        "nested-too-deeply",
        "x: " + "[" * 5000 + "]" * 5000 + "\n" + BASE,
        "schedules.yaml:1: lists and mappings nested more than 50 levels deep",
    ),
    (
        "tab-indent",
        "reports:\n\tr1: 1\n",
        "schedules.yaml:2: YAML syntax error: found character that cannot start any token; this line has a tab: indent with spaces",
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in YAML_LIMITS], ids=[c[0] for c in YAML_LIMITS])
def test_yaml_that_would_take_too_long_is_refused_naming_the_line(tmp_path: Path, text: str, expected: str) -> None:
    path = write_project(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert [str(p).replace(str(path), "schedules.yaml") for p in info.value.problems] == [expected]


def test_a_config_with_more_values_written_out_than_aliases_may_add_still_loads(tmp_path: Path) -> None:
    # The alias budget (50,000) bounds expansion, not the file: 20,000 reports written out have more.
    text = BASE + "    query:\n      datasource: db\n      sql: select 1\n      params: {many: [" + ", ".join(["1"] * 60_000) + "]}\n"
    text = "datasources:\n  db:\n    url: sqlite://\n" + text
    config = load(write_project(tmp_path, text), {})
    assert config.reports["r1"].query is not None
    assert len(config.reports["r1"].query.params["many"]) == 60_000


def test_aliases_within_the_limit_still_work(tmp_path: Path) -> None:
    text = BASE.replace("[a@example.com]", "&team [a@example.com, b@example.com]") + (
        '  r2:\n    schedule: "0 8 * * *"\n    subject: Two\n    template: t.html\n    recipients: *team\n'
    )
    config = load(write_project(tmp_path, text), {})
    assert config.reports["r2"].recipients == ("a@example.com", "b@example.com")


NON_FINITE = [
    ("defaults:\n  time_limit: .inf\n" + BASE, "schedules.yaml:2: defaults.time_limit: must be a finite number, not .inf"),
    ("defaults:\n  soft_time_limit: .nan\n" + BASE, "schedules.yaml:2: defaults.soft_time_limit: must be a finite number, not .nan"),
    ("defaults:\n  catch_up_grace: -.inf\n" + BASE, "schedules.yaml:2: defaults.catch_up_grace: must be a finite number, not -.inf"),
    ("defaults:\n  beat_lock_timeout: .NaN\n" + BASE, "schedules.yaml:2: defaults.beat_lock_timeout: must be a finite number, not .nan"),
    (
        "defaults:\n  max_attachment_bytes: .inf\n" + BASE,
        "schedules.yaml:2: defaults.max_attachment_bytes: must be a finite number, not .inf",
    ),
    (BASE + "    max_retries: .inf\n", "schedules.yaml:7: reports.r1.max_retries: must be a finite number, not .inf"),
    (BASE + "    query_timeout: .Inf\n", "schedules.yaml:7: reports.r1.query_timeout: must be a finite number, not .inf"),
    (BASE + "    max_rows: .inf\n", "schedules.yaml:7: reports.r1.max_rows: must be a finite number, not .inf"),
    (
        BASE + f"    rate_limit: {'9' * 400}/s\n",
        f"schedules.yaml:7: reports.r1.rate_limit: rate '{'9' * 400}/s' is not like '1/s', '30/m' or '500/h'",
    ),
    (
        BASE + f"    max_attachment_bytes: {'9' * 400} MB\n",
        f"schedules.yaml:7: reports.r1.max_attachment_bytes: '{'9' * 400} MB' is too large to be a size",
    ),
]


@pytest.mark.parametrize(("text", "expected"), NON_FINITE, ids=[e.split(": ")[1] for _, e in NON_FINITE])
def test_non_finite_numbers_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    path = write_project(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert [str(p).replace(str(path), "schedules.yaml") for p in info.value.problems] == [expected]


# --------------------------------------------------------------------------- addresses: syntax, not policy

ACCEPTED_ADDRESSES = [
    ("ops@corp.local", "ops@corp.local"),
    ("root@localhost", "root@localhost"),
    ("a@example.test", "a@example.test"),
    ("x@host.internal", "x@host.internal"),
    ("tor@hidden.onion", "tor@hidden.onion"),
    ("Ops Team <OPS@Corp.LOCAL>", "Ops Team <OPS@corp.local>"),
    ('"night shift"@example.com', '"night shift"@example.com'),
    ("ops@[192.0.2.1]", "ops@[192.0.2.1]"),
    ("Jörg <joerg@bücher.example>", "Jörg <joerg@xn--bcher-kva.example>"),
]


@pytest.mark.parametrize(("written", "normalised"), ACCEPTED_ADDRESSES, ids=[a for a, _ in ACCEPTED_ADDRESSES])
def test_any_syntactically_valid_address_is_accepted(written: str, normalised: str) -> None:
    assert normalize_address(written) == normalised


REFUSED_ADDRESSES = [
    ("ann@example.com\r\nBcc: evil@example.net", "address 'ann@example.com\\r\\nBcc: evil@example.net' contains control characters"),
    ("ann@corp.local\nBcc: evil@example.net", "address 'ann@corp.local\\nBcc: evil@example.net' contains control characters"),
    ("Ann\x07 <ann@localhost>", "address 'Ann\\x07 <ann@localhost>' contains control characters"),
    ("ann@localhost, evil@example.net", "'ann@localhost, evil@example.net' holds several addresses; list each one on its own"),
    ('"x"@corp.local, evil@example.net', "'\"x\"@corp.local, evil@example.net' holds several addresses; list each one on its own"),
    ("a@b@localhost", "'a@b@localhost' is not an email address"),
    ("localhost", "'localhost' is not an email address"),
    ("a@-corp.local", "'a@-corp.local' is not a valid email address: An email address cannot have a hyphen immediately after the @-sign."),
]


@pytest.mark.parametrize(
    ("written", "message"), REFUSED_ADDRESSES, ids=[m.split(" ")[-1] + str(i) for i, (_, m) in enumerate(REFUSED_ADDRESSES)]
)
def test_header_injection_and_non_addresses_stay_refused(written: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        normalize_address(written)
    assert str(info.value) == message


_LABELS = st.one_of(
    st.text(alphabet="aZ09-", min_size=0, max_size=70),
    st.sampled_from(["xn--bcher-kva", "ab--cd", "localhost", "local", "test", "123", "Example", "co"]),
)
_LOCALS = st.one_of(
    st.text(alphabet="aZ09._%+-!#'", min_size=0, max_size=70),
    st.sampled_from(["postmaster", "PostMaster", "Info", "sales", "a..b", ".a", "a."]),
)


@settings(max_examples=2000, deadline=None)
@given(local=_LOCALS, labels=st.lists(_LABELS, min_size=1, max_size=6))
def test_the_fast_path_for_plain_addresses_agrees_with_email_validator(local: str, labels: list[str]) -> None:
    """Where the ASCII fast path answers, email-validator accepts the address and normalises it the same."""
    from email_validator import validate_email

    from reporter.config import _fast_address

    address = f"{local}@{'.'.join(labels)}"
    fast = _fast_address(address)
    if fast is not None:
        valid = validate_email(
            address, check_deliverability=False, globally_deliverable=False, allow_quoted_local=True, allow_domain_literal=True
        )
        assert fast == valid.ascii_email


@settings(max_examples=1000, deadline=None)
@given(
    name=st.one_of(
        st.text(alphabet='aZ0 .,"<>@()', max_size=12),
        st.lists(st.tuples(st.text(alphabet="aZ0.,", min_size=1, max_size=4), st.sampled_from([" ", "  ", ""])), max_size=4).map(
            lambda words: "".join(w + sep for w, sep in words).strip()
        ),
    ),
    address=st.one_of(st.text(alphabet="aZ0.@<>-_ ", max_size=14), st.sampled_from(["ann@example.com", "a.b@x", "x@y@z", "<a@b>"])),
    space=st.sampled_from([" ", "", "  "]),
)
def test_the_named_address_shortcut_agrees_with_the_header_parser(name: str, address: str, space: str) -> None:
    from email.utils import getaddresses

    from reporter.config import NAMED_ADDRESS_RE

    written = f"{name}{space}<{address}>"
    found = NAMED_ADDRESS_RE.fullmatch(written)
    if found is not None:
        assert getaddresses([written]) == [(found.group(1), found.group(2))]


@pytest.mark.parametrize(
    ("written", "normalised"),
    [
        ("Ann.Lee+x@Mail.Example.COM", "Ann.Lee+x@mail.example.com"),
        ("ops_1%a@corp-2.local", "ops_1%a@corp-2.local"),
        ("r@localhost", "r@localhost"),
    ],
)
def test_common_addresses_take_the_fast_path(written: str, normalised: str) -> None:
    from reporter.config import NAMED_ADDRESS_RE, _fast_address

    assert _fast_address(written) == normalised == normalize_address(written)
    named = f"Ann Lee 2 <{written}>"
    assert NAMED_ADDRESS_RE.fullmatch(named) and normalize_address(named) == f"Ann Lee 2 <{normalised}>"


@pytest.mark.parametrize(
    "written", ["PostMaster@example.com", "a@xn--bcher-kva.example", "a@ab--cd.example", "a..b@example.com", "x" * 65 + "@example.com"]
)
def test_addresses_the_library_treats_specially_leave_the_fast_path(written: str) -> None:
    from reporter.config import _fast_address

    assert _fast_address(written) is None


def test_special_use_domains_load_from_the_config(tmp_path: Path) -> None:
    text = 'defaults:\n  sender: "Reports <reports@reporter.internal>"\n' + BASE.replace(
        "[a@example.com]", "[ops@corp.local, root@localhost, a@example.test]"
    )
    config = load(write_project(tmp_path, text), {})
    assert config.reports["r1"].recipients == ("ops@corp.local", "root@localhost", "a@example.test")
    assert config.defaults.sender == "Reports <reports@reporter.internal>"


def test_merge_keys_are_overridden_by_keys_written_beside_them(tmp_path: Path) -> None:
    text = BASE.replace("  r1:\n", "  r1: &common\n") + (
        '  r2:\n    <<: *common\n    subject: Two\n    schedule: "0 8 * * *"\n'  # lines 7-10
    )
    config = load(write_project(tmp_path, text), {})
    r2 = config.reports["r2"]
    assert (r2.schedule, r2.subject, r2.template, r2.recipients) == ("0 8 * * *", "Two", "t.html", ("a@example.com",))
    assert config.line_of("reports", "r2", "schedule") == 10

    # Written twice in the same mapping is still a mistake, merge or not.
    path = write_project(tmp_path, text + "    subject: Again\n")
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert [str(p) for p in info.value.problems] == [
        f"{path}:11: reports.r2.subject: duplicate key (first defined on line 9); YAML would silently keep only the last"
    ]


def test_reading_a_config_leaves_the_garbage_collector_as_it_found_it(tmp_path: Path) -> None:
    import gc

    from reporter.config import _no_cycle_collection

    path = write_project(tmp_path, BASE)
    assert gc.isenabled()
    load(path, {})
    assert gc.isenabled()
    with pytest.raises(ConfigError):
        load(write_project(tmp_path / "bad", "reports: [\n"), {})
    assert gc.isenabled()
    with pytest.raises(RuntimeError), _no_cycle_collection():
        assert not gc.isenabled()
        raise RuntimeError
    assert gc.isenabled()
    gc.disable()
    try:
        load(path, {})
        assert not gc.isenabled()  # not switched on behind the back of a program that turned it off
    finally:
        gc.enable()
