"""reporter.checks: every problem in one pass (schema, templates, query parameters, data functions,
database drivers), each with its exact message; `validate --connect` against real services."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reporter.checks import Reach, connect_problems, load_checked
from reporter.config import Config, load
from reporter.errors import ConfigError
from reporter.settings import Settings, mask_url
from tests.conftest import ROOT, Inbox
from tests.test_config import BASE, write_project


def module_name() -> str:
    """A fresh module name per test: an imported module stays in sys.modules."""
    return f"checks_data_{uuid.uuid4().hex[:8]}"


def problems_of(path: Path) -> list[str]:
    """Every problem load_checked finds in PATH, as `reporter validate` prints it, paths shortened."""
    with pytest.raises(ConfigError) as info:
        load_checked(path, {}, path.parent / "templates")
    return [
        str(p).replace(str(path.parent / "templates") + "/", "TEMPLATES/").replace(str(path), "schedules.yaml") for p in info.value.problems
    ]


def report(name: str, **fields: str) -> str:
    """A report block of schedules.yaml; FIELDS are added or replace BASE's (values written as given)."""
    keys = {"schedule": '"0 7 * * *"', "subject": "Hi", "template": "t.html", "recipients": "[a@example.com]", **fields}
    return f"  {name}:\n" + "".join(f"    {key}: {value}\n" for key, value in keys.items())


# --------------------------------------------------------------------------- one pass


def test_every_kind_of_problem_comes_back_in_one_pass(tmp_path: Path) -> None:
    module = module_name()
    (tmp_path / f"{module}.py").write_text("def rows(slot, report):\n    return []\n")
    text = (
        "defaults:\n  rate_limit: fast\n"  # 2: schema
        "datasources:\n  w:\n    url: sqlite://\n"
        "reports:\n"  # 6
        + report("bad-subject", subject='"Total {{ row_count | }}"')  # 7-11, subject on 9
        + report("bad-function", function=f"{module}:nope")  # 12-17, function on 17
        + report("bad-schema-too", subject='"{{ oops"', recipients="[nobody]", function=f"{module}:nope")  # 18-23
        + report(
            "bad-param",
            query='\n      datasource: w\n      sql: select :day\n      params: {day: "{{ slot.date( }}"}',
        )  # 24-32, params.day on 32
    )
    path = write_project(tmp_path, text)
    (tmp_path / "templates" / "t.html").write_text("<p>\n{% for row in rows %}\n")
    assert problems_of(path) == [
        "schedules.yaml:2: defaults.rate_limit: rate 'fast' is not like '1/s', '30/m' or '500/h'",
        "schedules.yaml:9: reports.bad-subject.subject: template syntax error: expected token 'name', got 'end of print statement'",
        f"schedules.yaml:17: reports.bad-function.function: module {module} has no function 'nope'",
        "schedules.yaml:20: reports.bad-schema-too.subject: template syntax error: "
        "unexpected end of template, expected 'end of print statement'.",
        "schedules.yaml:22: reports.bad-schema-too.recipients[0]: 'nobody' is not an email address",
        f"schedules.yaml:23: reports.bad-schema-too.function: module {module} has no function 'nope'",
        "schedules.yaml:32: reports.bad-param.query.params.day: template syntax error: unexpected 'end of template'",
        # The same broken template, once per report that uses it, after the config file's own problems.
        *[
            f"TEMPLATES/t.html:2: reports.{name}.template: template syntax error: Unexpected end of template. "
            "Jinja was looking for the following tags: 'endfor' or 'else'. The innermost block that needs to be closed is 'for'."
            for name in ("bad-function", "bad-param", "bad-schema-too", "bad-subject")
        ],
    ]


def test_a_config_that_passes_comes_back_whole(tmp_path: Path) -> None:
    module = module_name()
    (tmp_path / f"{module}.py").write_text("def rows(slot, report):\n    return []\n")
    path = write_project(tmp_path, BASE + f"    function: {module}:rows\n    text_template: t.txt\n")
    config = load_checked(path, {}, tmp_path / "templates")
    assert isinstance(config, Config)
    assert config.reports["r1"].function == f"{module}:rows"


def test_the_shipped_config_passes() -> None:
    env = {k: v for k, v in os.environ.items() if k != "WAREHOUSE_URL"}
    config = load_checked(ROOT / "schedules.yaml", env, ROOT / "templates")
    assert sorted(config.reports) == ["big-orders", "sales-by-region", "sales-daily", "signups"]


def test_checking_opens_no_database(tmp_path: Path) -> None:
    """load_checked may be called on every edit of the file: it reads, it does not connect or create."""
    database = tmp_path / "warehouse.db"
    path = write_project(tmp_path, f"datasources:\n  w:\n    url: sqlite:///{database}\n" + BASE)
    load_checked(path, {}, tmp_path / "templates")
    assert not database.exists()


# --------------------------------------------------------------------------- each check, its exact message


def test_data_function_problems(tmp_path: Path) -> None:
    modules = {name: module_name() for name in ("missing-import", "raises", "syntax", "values")}
    (tmp_path / f"{modules['missing-import']}.py").write_text("import no_such_package_for_reporter_tests\n")
    (tmp_path / f"{modules['raises']}.py").write_text("raise RuntimeError('needs API_KEY')\n")
    (tmp_path / f"{modules['syntax']}.py").write_text("def rows(:\n")
    (tmp_path / f"{modules['values']}.py").write_text("LIMIT = 5\n\ndef three(a, b, c):\n    return []\n")
    nowhere = module_name()
    text = "reports:\n" + "".join(
        report(name, function=function)
        for name, function in (
            ("r1", f"{modules['missing-import']}:rows"),
            ("r2", f"{modules['raises']}:rows"),
            ("r3", f"{modules['syntax']}:rows"),
            ("r4", f"{modules['values']}:LIMIT"),
            ("r5", f"{modules['values']}:three"),
            ("r6", f"{nowhere}:rows"),
        )
    )
    path = write_project(tmp_path, text)
    assert problems_of(path) == [
        f"schedules.yaml:7: reports.r1.function: cannot import module {modules['missing-import']}: "
        "No module named 'no_such_package_for_reporter_tests'",
        f"schedules.yaml:13: reports.r2.function: module {modules['raises']} failed to import: RuntimeError: needs API_KEY",
        f"schedules.yaml:19: reports.r3.function: module {modules['syntax']} failed to import: "
        f"SyntaxError: invalid syntax ({modules['syntax']}.py, line 1)",
        f"schedules.yaml:25: reports.r4.function: {modules['values']}:LIMIT is not a function (it is a value of type int)",
        f"schedules.yaml:31: reports.r5.function: {modules['values']}:three cannot be called as three(slot=..., report=...): "
        "missing a required argument: 'a'",
        f"schedules.yaml:37: reports.r6.function: cannot import module {nowhere}: No module named '{nowhere}'",
    ]


def test_template_file_problems(tmp_path: Path) -> None:
    path = write_project(tmp_path, BASE + "    text_template: t.txt\n")
    templates = tmp_path / "templates"
    (templates / "t.html").write_text('{% extends "layout.html" %}\n{% block body %}{% include "gone.html" %}{% endblock %}\n')
    (templates / "layout.html").write_text("<html>\n<body>{% block body %}{% endblock %}</body>\n</html>\n")
    (templates / "t.txt").write_text("{{ report.name }\n")
    assert problems_of(path) == [
        f"{templates}: reports.r1.template: template 'gone.html' (used by t.html) not found",
        "TEMPLATES/t.txt:1: reports.r1.text_template: template syntax error: unexpected '}'",
    ]


def test_datasource_driver_problems(tmp_path: Path) -> None:
    text = "datasources:\n  my:\n    url: mysql://u:hunter2@db/x\n  odd:\n    url: nosuchdb://x/y\n  fine:\n    url: sqlite://\n" + BASE
    path = write_project(tmp_path, text)
    problems = problems_of(path)
    assert problems == [
        "schedules.yaml:3: datasources.my.url: the database driver for 'mysql' is not installed (No module named 'MySQLdb'); "
        "install it, or name another driver in the URL",
        "schedules.yaml:5: datasources.odd.url: no SQLAlchemy dialect 'nosuchdb'; "
        "check the part before '://' (for example 'postgresql+psycopg')",
    ]
    assert "hunter2" not in "".join(problems)


def test_schema_only_load_still_exists_for_celery_settings(tmp_path: Path) -> None:
    """config.load checks the file alone (Celery reads its settings from it at import); load_checked does the rest."""
    module = module_name()
    path = write_project(tmp_path, BASE + f"    function: {module}:rows\n")
    assert load(path, {}).reports["r1"].function == f"{module}:rows"
    assert problems_of(path) == [f"schedules.yaml:7: reports.r1.function: cannot import module {module}: No module named '{module}'"]


# --------------------------------------------------------------------------- --connect, against the real things


def connect_settings(tmp_path: Path, smtp_url: str | None) -> Settings:
    env = {"REPORTER_CONFIG": str(tmp_path / "schedules.yaml"), "REPORTER_OUTBOX": str(tmp_path / "outbox")}
    if smtp_url:
        env["REPORTER_SMTP_URL"] = smtp_url
    return Settings.from_env(env)


@pytest.mark.integration
def test_connect_reaches_postgresql_and_smtp(tmp_path: Path, pg_url: str, inbox: Inbox) -> None:
    path = write_project(tmp_path, "datasources:\n  pg:\n    url: ${PG_URL}\n" + BASE)
    config = load_checked(path, {"PG_URL": pg_url}, tmp_path / "templates")
    reached = connect_problems(config, connect_settings(tmp_path, inbox.url))
    assert [str(r) for r in reached] == [
        f"datasource pg ({mask_url(pg_url)}): answers",
        f"mail (SMTP smtp://{inbox.host}:{inbox.port}): answers",
    ]
    assert inbox.messages == []  # connected and said goodbye; sent nothing


@pytest.mark.integration
def test_connect_says_which_do_not_answer(tmp_path: Path) -> None:
    from reporter.runner import free_port

    pg_port, smtp_port = free_port(), free_port()
    path = write_project(tmp_path, "datasources:\n  pg:\n    url: ${PG_URL}\n  lite:\n    url: sqlite:///${NOWHERE}/x.db\n" + BASE)
    env = {"PG_URL": f"postgresql+psycopg://bob:hunter2pw@127.0.0.1:{pg_port}/db", "NOWHERE": str(tmp_path / "none")}
    config = load_checked(path, env, tmp_path / "templates")
    reached = connect_problems(config, connect_settings(tmp_path, f"smtp://bot:hunter2pw@127.0.0.1:{smtp_port}"))
    assert [(r.what, r.where) for r in reached] == [
        ("datasource lite", f"sqlite:///{tmp_path}/none/x.db"),
        ("datasource pg", f"postgresql+psycopg://bob:***@127.0.0.1:{pg_port}/db"),
        ("mail", f"SMTP smtp://127.0.0.1:{smtp_port}"),
    ]
    lite, pg, mail = reached
    assert lite.problem == f"the database file {tmp_path}/none/x.db does not exist"
    assert pg.problem is not None and "Connection refused" in pg.problem
    assert mail.problem == "ConnectionRefusedError: [Errno 111] Connection refused"
    assert "hunter2pw" not in "".join(str(r) for r in reached)
    assert not (tmp_path / "none").exists()


def test_an_existing_sqlite_file_answers_and_without_an_smtp_url_nothing_is_opened(tmp_path: Path) -> None:
    import sqlite3

    sqlite3.connect(tmp_path / "warehouse.db").close()
    path = write_project(tmp_path, f"datasources:\n  w:\n    url: sqlite:///{tmp_path}/warehouse.db\n" + BASE)
    config = load_checked(path, {}, tmp_path / "templates")
    assert connect_problems(config, connect_settings(tmp_path, None)) == [
        Reach("datasource w", f"sqlite:///{tmp_path}/warehouse.db"),
        Reach("mail", f"Maildir {tmp_path / 'outbox'}", skipped="no SMTP server set (REPORTER_SMTP_URL); mail goes to files"),
    ]
    assert not (tmp_path / "outbox").exists()


def test_yaml_level_mistakes_do_not_hide_the_rest(tmp_path: Path) -> None:
    """A duplicate key or a bad tag is reported together with everything else, not in a round of its own."""
    module = module_name()
    text = (
        "reports:\n"
        + report("r1", subject='"{{ oops"', max_retries="!!int three")  # subject on 4, max_retries on 7
        + "    subject: Twice\n"  # 8: duplicate
        + report("r2", function=f"{module}:rows", recipients="[nobody]")  # 9-14
    )
    path = write_project(tmp_path, text)
    assert problems_of(path) == [
        "schedules.yaml:4: reports.r1.subject: template syntax error: unexpected end of template, expected 'end of print statement'.",
        "schedules.yaml:7: reports.r1.max_retries: bad value: 'three' is not a valid int",
        "schedules.yaml:8: reports.r1.subject: duplicate key (first defined on line 4); YAML would silently keep only the last",
        "schedules.yaml:13: reports.r2.recipients[0]: 'nobody' is not an email address",
        f"schedules.yaml:14: reports.r2.function: cannot import module {module}: No module named '{module}'",
    ]


def test_loading_and_checking_a_config_does_not_import_weasyprint(tmp_path: Path) -> None:
    """WeasyPrint takes seconds to import: only a PDF render needs it, not validate, beat or a config load."""
    import subprocess
    import sys

    path = write_project(tmp_path, BASE)
    code = (
        "import sys; from pathlib import Path; from reporter.checks import load_checked; import reporter.cli, reporter.render; "
        f"load_checked(Path({str(path)!r}), {{}}, Path({str(path.parent / 'templates')!r})); print('weasyprint' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


_SUBJECT_PIECES = st.lists(
    st.one_of(
        st.text(alphabet="ab %'\"-.|()#\\\n", max_size=6),
        st.sampled_from(["{{", "}}", "{{ x }}", "{{ slot.strftime('%d %B') }}", "{{ a|upper }}", "{{ 1 + }}", "{{ 'a' ~ b }}", "{%", "{#"]),
    ),
    max_size=8,
)


@settings(max_examples=1500, deadline=None)
@given(pieces=_SUBJECT_PIECES)
def test_a_subject_parses_exactly_when_its_shape_does(pieces: list[str]) -> None:
    """Subjects are checked once per shape (text between tags replaced): that must not change the verdict."""
    from reporter.checks import template_shape
    from reporter.render import TemplateCheck

    subject = "".join(pieces)
    shape = template_shape(subject)
    if shape is not None:
        check = TemplateCheck(Path("."), {})
        assert (check.string(subject) is None) == (check.string(shape) is None)


def test_subjects_of_one_shape_are_parsed_once_and_a_bad_one_keeps_its_message(tmp_path: Path) -> None:
    from reporter.checks import template_shape

    assert template_shape("Sales 1 {{ slot.date() }}") == template_shape("Sales 2 {{ slot.date() }}") == "x{{ slot.date() }}"
    assert template_shape("{% if x %}a{% endif %}") is None
    one = BASE.replace("subject: Hi", 'subject: "Daily {{ 1 + }}"')
    text = one + one.split("reports:\n", 1)[1].replace("r1:", "r2:").replace("Daily", "Weekly")
    with pytest.raises(ConfigError) as info:
        load_checked(write_project(tmp_path, text), {}, tmp_path / "templates")
    assert [p.field for p in info.value.problems] == ["reports.r1.subject", "reports.r2.subject"]
    assert {p.message for p in info.value.problems} == {"template syntax error: unexpected 'end of print statement'"}
