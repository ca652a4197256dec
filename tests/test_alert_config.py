"""Alert options in schedules.yaml: what loads, and every mistake refused with file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from reporter.checks import load_checked
from reporter.config import Recovered, load
from reporter.errors import ConfigError
from tests.test_config import BASE, write_project

# BASE's report keys are on lines 3-6; what a case adds starts on line 7.
CASES = [
    ("when-syntax", "    when: 'rows | length >'\n", [(7, "reports.r1.when", "expression syntax error: unexpected 'end of template'")]),
    ("when-braces", "    when: '{{ rows | length > 0 }}'\n", [(7, "reports.r1.when", "write the expression without {{ }}")]),
    ("value-syntax", "    when: value > 0\n    value: 'rows | sum(attribute='\n", [(8, "reports.r1.value", "expression syntax error")]),
    (
        "when-unknown-name",
        "    when: rowz | length > 0\n",
        [
            (
                7,
                "reports.r1.when",
                "unknown name 'rowz' (did you mean 'rows'?); an alert's expressions see rows, row_count, columns, slot, previous",
            )
        ],
    ),
    ("when-value-undeclared", "    when: value > 3\n", [(7, "reports.r1.when", "unknown name 'value' (declare it with 'value:')")]),
    ("value-reads-itself", "    when: value > 3\n    value: value + 1\n", [(8, "reports.r1.value", "unknown name 'value'")]),
    ("value-without-when", "    value: rows | length\n", [(7, "reports.r1.value", "'value' is an alert option and needs 'when:'")]),
    ("notify-without-when", "    notify: change\n", [(7, "reports.r1.notify", "'notify' is an alert option and needs 'when:'")]),
    ("renotify-without-when", "    renotify_after: 24h\n", [(7, "reports.r1.renotify_after", "needs 'when:'")]),
    ("recovered-without-when", "    recovered: true\n", [(7, "reports.r1.recovered", "'recovered' is an alert option and needs 'when:'")]),
    ("notify-unknown", "    when: rows\n    notify: always\n", [(8, "reports.r1.notify", "'always' is not one of each, change")]),
    (
        "renotify-with-each",
        "    when: rows\n    renotify_after: 24h\n",
        [(8, "reports.r1.renotify_after", "only applies with 'notify: change'")],
    ),
    (
        "renotify-not-a-duration",
        "    when: rows\n    notify: change\n    renotify_after: tomorrow\n",
        [(9, "reports.r1.renotify_after", "'tomorrow' is not a duration; write '30m', '24h', '2d', '1h30m'")],
    ),
    ("renotify-zero", "    when: rows\n    notify: change\n    renotify_after: 0\n", [(9, "reports.r1.renotify_after", "above zero")]),
    (
        "recovered-template-missing",
        "    when: rows\n    recovered:\n      template: gone.html\n",
        [(9, "reports.r1.recovered.template", "template 'gone.html' not found")],
    ),
    ("recovered-unknown-key", "    when: rows\n    recovered:\n      subjekt: x\n", [(9, "reports.r1.recovered.subjekt", "unknown key")]),
    ("recovered-not-a-flag", "    when: rows\n    recovered: often\n", [(8, "reports.r1.recovered", "must be true, false or a mapping")]),
]


@pytest.mark.parametrize(("extra", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_alert_mistakes_are_refused_with_line_and_field(tmp_path: Path, extra: str, expected: list[tuple[int, str, str]]) -> None:
    path = write_project(tmp_path, BASE + extra)
    with pytest.raises(ConfigError) as info:
        load(path, {})
    problems = info.value.problems
    assert [(p.line, p.field) for p in problems] == [(line, field) for line, field, _ in expected], problems
    for problem, (_, _, fragment) in zip(problems, expected, strict=True):
        assert problem.file == str(path) and fragment in problem.message, problem


def test_alert_options_load(tmp_path: Path) -> None:
    path = write_project(
        tmp_path,
        BASE
        + "    when: value != previous.value\n    value: rows | length\n    notify: change\n    renotify_after: 1h30m\n"
        + "    recovered:\n      subject: All clear\n      text_template: t.txt\n",
    )
    report = load(path, {}).reports["r1"]
    assert (report.when, report.value, report.notify, report.renotify_after) == ("value != previous.value", "rows | length", "change", 5400)
    assert report.recovered == Recovered(subject="All clear", text_template="t.txt")
    plain = load(write_project(tmp_path / "plain", BASE), {}).reports["r1"]
    assert (plain.when, plain.value, plain.notify, plain.renotify_after, plain.recovered) == (None, None, "each", None, None)


def test_validate_finds_a_syntax_error_in_the_recovered_subject(tmp_path: Path) -> None:
    path = write_project(tmp_path, BASE + "    when: rows\n    recovered:\n      subject: 'Fine {{ slot.hour '\n")
    with pytest.raises(ConfigError) as info:
        load_checked(path, {}, tmp_path / "templates")
    assert [(p.line, p.field) for p in info.value.problems] == [(9, "reports.r1.recovered.subject")]
    assert "template syntax error" in info.value.problems[0].message


@pytest.mark.parametrize(("written", "seconds"), [("90", 90), ("'90'", 90), ('"5400"', 5400), ("2h", 7200)])
def test_renotify_after_in_seconds_may_be_quoted(tmp_path: Path, written: str, seconds: float) -> None:
    path = write_project(tmp_path, BASE + f"    when: rows\n    notify: change\n    renotify_after: {written}\n")
    assert load(path, {}).reports["r1"].renotify_after == seconds
