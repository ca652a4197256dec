"""reporter.alert: conditions, values, `previous`, and the decision of each slot, as tables."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from reporter import alert
from reporter.alert import NOT_SENT, RECOVERED, SEND, ConditionError, Evaluation, Policy, Previous

T0 = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
ROWS = [{"region": "North", "revenue": 1234.5}, {"region": "South", "revenue": 42.0}]


def ctx(rows: list[dict[str, Any]] = ROWS, previous: Previous | None = None) -> dict[str, Any]:
    columns = list(rows[0]) if rows else []
    return alert.context(rows, columns, T0, previous or Previous())


# --------------------------------------------------------------------------- conditions and values

CONDITIONS = [
    # (when, value, rows, previous, held, value out, shown)
    ("rows | length > 0", None, ROWS, None, True, None, "rows | length > 0 → 2"),
    ("rows | length > 0", None, [], None, False, None, "rows | length > 0 → 0"),
    ("row_count >= 3", None, ROWS, None, False, None, "row_count >= 3 → 2"),
    ("rows[0].revenue < 1000", None, ROWS, None, False, None, "rows[0].revenue < 1000 → 1234.5"),
    ("rows[1].revenue < 1000", None, ROWS, None, True, None, "rows[1].revenue < 1000 → 42"),
    ("'revenue' in columns", None, ROWS, None, True, None, "'revenue' in columns → \"revenue\""),
    ("rows", None, [], None, False, None, "rows → []"),
    ("rows | length > 0 and rows[0].revenue > 1000", None, ROWS, None, True, None, "rows | length > 0 and rows[0].revenue > 1000 → True"),
    ("value > 1000", "rows | sum(attribute='revenue')", ROWS, None, True, 1276.5, "value > 1000 → 1276.5"),
    ("value > 0", "rows | selectattr('revenue', 'gt', 1000) | list | length", ROWS, None, True, 1, "value > 0 → 1"),
    # No earlier slot: previous.value is None, so a change from nothing holds.
    ("value != previous.value", "rows | length", ROWS, None, True, 2, "value != previous.value → 2"),
    ("value != previous.value", "rows | length", ROWS, Previous(value=2, slot=T0 - HOUR), False, 2, "value != previous.value → 2"),
    ("value > previous.value", "rows | length", ROWS, Previous(value=1, slot=T0 - HOUR), True, 2, "value > previous.value → 2"),
    ("not previous", None, ROWS, None, True, None, "not previous → True"),
    ("previous.held", None, ROWS, Previous(held=True, slot=T0 - HOUR), True, None, "previous.held → True"),
    (
        "previous.rows | length < rows | length",
        None,
        ROWS,
        Previous(rows=ROWS[:1], slot=T0 - HOUR),
        True,
        None,
        "previous.rows | length < rows | length → 1",
    ),
    ("slot.hour == 7", None, ROWS, None, True, None, "slot.hour == 7 → 7"),
    # A condition that is an iterator (no `| list`) is judged by what it yields: nothing is false, not "a generator".
    ("rows | selectattr('revenue', 'gt', 5000)", None, ROWS, None, False, None, "rows | selectattr('revenue', 'gt', 5000) → []"),
    (
        "rows | selectattr('revenue', 'gt', 1000) | map(attribute='region')",
        None,
        ROWS,
        None,
        True,
        None,
        "rows | selectattr('revenue', 'gt', 1000) | map(attribute='region') → [\"North\"]",
    ),
    # A value that is an iterator (no `| list`) is kept as the list it yields, so it compares with the last one.
    (
        "value != previous.value",
        "rows | map(attribute='revenue')",
        ROWS,
        Previous(value=[1234.5, 42.0], slot=T0 - HOUR),
        False,
        [1234.5, 42.0],
        "value != previous.value → [1234.5, 42.0]",
    ),
    (
        "value.a | length > 1",
        "{'a': rows | map(attribute='region')}",
        ROWS,
        None,
        True,
        {"a": ["North", "South"]},
        "value.a | length > 1 → 2",
    ),
    # The left side is only shown: when it is undefined, the reason shows the whole condition's result.
    ("[rows | first] != []", None, [], None, True, None, "[rows | first] != [] → True"),
]


@pytest.mark.parametrize(("when", "value", "rows", "previous", "held", "out", "shown"), CONDITIONS, ids=[c[0] for c in CONDITIONS])
def test_conditions_and_values(
    when: str, value: str | None, rows: list[dict[str, Any]], previous: Previous | None, held: bool, out: Any, shown: str
) -> None:
    verdict = alert.evaluate(Policy(when, value), ctx(rows, previous))
    assert (verdict.held, verdict.value, verdict.shown) == (held, out, shown)


ERRORS = [
    # A condition that cannot be evaluated is a failure, never a silent "false".
    ("rows[0].nope < 3", None, ROWS, "condition error: when: rows[0].nope < 3: 'dict object' has no attribute 'nope'"),
    ("rows[0].revenue < 3", None, [], "condition error: when: rows[0].revenue < 3:"),
    ("nothing_like_this", None, ROWS, "'nothing_like_this' is undefined"),
    ("value > 0", "rows | sum(attribute='region')", ROWS, "condition error: value: rows | sum(attribute='region'): TypeError"),
    ("rows.__class__", None, ROWS, "unsafe"),
    ("1 / 0", None, ROWS, "ZeroDivisionError"),
    # A value that comes out undefined without an error is one too, not a value the ledger cannot keep.
    ("row_count == 0", "rows | first", [], "condition error: value: rows | first: is undefined (no rows?)"),
    ("row_count == 0", "rows[0]", [], "condition error: value: rows[0]: is undefined (no rows?)"),
    ("row_count == 0", "rows | map(attribute='revenue') | max", [], "value: rows | map(attribute='revenue') | max: is undefined"),
    ("row_count == 0", "[1, rows | first]", [], "condition error: value: [1, rows | first]: is undefined (no rows?)"),
    ("row_count > 0", "{'top': rows[5]}", ROWS, "condition error: value: {'top': rows[5]}: is undefined"),
]


@pytest.mark.parametrize(("when", "value", "rows", "message"), ERRORS, ids=[e[1] or e[0] for e in ERRORS])
def test_a_condition_that_cannot_be_evaluated_is_an_error(when: str, value: str | None, rows: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConditionError) as info:
        alert.evaluate(Policy(when, value), ctx(rows))
    assert message in str(info.value)


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("cannot be shown")


def test_a_value_the_ledger_cannot_keep_is_a_condition_error_not_a_crash_when_recorded() -> None:
    rows = [{"thing": Unprintable()}]
    with pytest.raises(ConditionError, match="condition error: RuntimeError: cannot be shown"):
        alert.evaluation("r", Policy("row_count > 0", value="rows[0].thing"), T0, rows, ["thing"], None)


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("rows | length > 0", None),
        ("value != previous.value", None),
        ("rows | length >", "expression syntax error: unexpected 'end of template'"),
        ("{{ rows }}", "expression syntax error: write the expression without {{ }}"),
        ("rows | length > 0 }}", "expression syntax error"),
    ],
)
def test_expression_problems(source: str, problem: str | None) -> None:
    found = alert.expression_problem(source)
    assert (found is None) if problem is None else (found is not None and problem in found), found


@pytest.mark.parametrize(
    ("source", "names"),
    [
        ("rows | length > 0", {"rows"}),
        ("value != previous.value", {"value", "previous"}),
        ("row_count in range(1, 5)", {"row_count"}),
        ("rows | selectattr('amount', 'gt', limit) | list", {"rows", "limit"}),
        ("rows |", set()),
    ],
)
def test_names_used(source: str, names: set[str]) -> None:
    assert alert.names_used(source) == names


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("written", "seconds", "text"),
    [
        ("30m", 1800, "30m"),
        ("24h", 86400, "24h"),
        ("2d", 172800, "2d"),
        ("1h30m", 5400, "1h30m"),
        (90, 90, "1m30s"),
        ("45s", 45, "45s"),
        ("90", 90, "1m30s"),  # quoted seconds, as the README says "or seconds"
        (" 7200 ", 7200, "2h"),
        (0.5, 0.5, "0.5s"),
    ],
)
def test_durations(written: Any, seconds: float, text: str) -> None:
    assert alert.parse_duration(written) == seconds
    assert alert.duration_text(seconds) == text


@pytest.mark.parametrize("written", ["soon", "", "h", "-5", 0, -3, True, "1x", "30 minutes", "0", "1e3"])
def test_bad_durations(written: Any) -> None:
    with pytest.raises(ValueError, match="duration"):
        alert.parse_duration(written)


# --------------------------------------------------------------------------- decisions over a run of slots


def run(policy: Policy, holds: list[bool]) -> list[tuple[str, str]]:
    """Evaluate one slot an hour with the condition holding as HOLDS says; (decision, reason) of each."""
    before: Evaluation | None = None
    out = []
    for index, held in enumerate(holds):
        slot = T0 + index * HOUR
        rows = [{"n": 1}] if held else []
        found = alert.evaluation("r", policy, slot, rows, ["n"], before, at=lambda s: s.strftime("%H:%M"))
        out.append((found.decision, found.reason))
        before = found
    return out


EACH = Policy("rows | length > 0")
CHANGE = Policy("rows | length > 0", notify="change")
CHANGE_2H = Policy("rows | length > 0", notify="change", renotify_after=2 * 3600)
EACH_RECOVERED = Policy("rows | length > 0", recovered=True)
CHANGE_RECOVERED = Policy("rows | length > 0", notify="change", recovered=True)

HELD_AT_7 = "condition holds but notify: change and it already held at 07:00"
DECISIONS = [
    ("each: every slot where it holds", EACH, [True, True, False, True], [SEND, SEND, NOT_SENT, SEND]),
    ("change: only when it turns true", CHANGE, [True, True, True, False, True], [SEND, NOT_SENT, NOT_SENT, NOT_SENT, SEND]),
    ("change: false first", CHANGE, [False, True, True], [NOT_SENT, SEND, NOT_SENT]),
    ("renotify_after 2h", CHANGE_2H, [True, True, True, True, True, False, True], [SEND, NOT_SENT, SEND, NOT_SENT, SEND, NOT_SENT, SEND]),
    ("recovered once", EACH_RECOVERED, [True, False, False, True, False], [SEND, RECOVERED, NOT_SENT, SEND, RECOVERED]),
    ("recovered with change", CHANGE_RECOVERED, [False, True, True, False, False], [NOT_SENT, SEND, NOT_SENT, RECOVERED, NOT_SENT]),
]


@pytest.mark.parametrize(("policy", "holds", "decisions"), [d[1:] for d in DECISIONS], ids=[d[0] for d in DECISIONS])
def test_decisions(policy: Policy, holds: list[bool], decisions: list[str]) -> None:
    assert [d for d, _ in run(policy, holds)] == decisions


def test_reasons_say_why_nothing_was_sent() -> None:
    reasons = [r for _, r in run(CHANGE_2H, [False, True, True, True, False])]
    assert reasons == [
        "condition false: rows | length > 0 → 0",
        "condition holds: rows | length > 0 → 1",
        f"{HELD_AT_7.replace('07:00', '08:00')} (last alert 08:00; renotify_after 2h)",
        "condition still holds: rows | length > 0 → 1 (renotify_after 2h)",
        "condition false: rows | length > 0 → 0",
    ]
    assert run(CHANGE, [True, True])[1][1] == f"{HELD_AT_7} (last alert 07:00)"
    assert run(EACH_RECOVERED, [True, False])[1][1] == "recovered: condition no longer holds: rows | length > 0 → 0"


def test_previous_carries_the_last_evaluation_and_is_falsy_before_the_first() -> None:
    first = alert.evaluation("r", Policy("value > 1", value="rows | length"), T0, ROWS, ["region", "revenue"], None)
    assert not Previous() and Previous().value is None and Previous().rows == []
    previous = first.as_previous()
    assert previous and previous.value == 2 and previous.held is True and previous.slot == T0 and previous.rows == ROWS
    many = [{"n": i} for i in range(alert.ROWS_KEPT + 5)]
    capped = alert.evaluation("r", Policy("rows"), T0, many, ["n"], None).as_previous()
    assert capped.capped and capped.row_count == alert.ROWS_KEPT + 5 and len(capped.rows) == alert.ROWS_KEPT
    wide = [{"text": "x" * 100_000} for _ in range(5)]
    kept = alert.evaluation("r", Policy("rows"), T0, wide, ["text"], None).as_previous()
    assert kept.capped and kept.row_count == 5 and len(kept.rows) == 2


def test_templates_see_the_alert_and_the_value() -> None:
    before = alert.evaluation("r", EACH_RECOVERED, T0, ROWS, ["region", "revenue"], None)
    found = alert.evaluation("r", EACH_RECOVERED, T0 + HOUR, [], [], before)
    seen = alert.template_context(found, before)
    assert seen["alert"]["recovered"] is True and seen["alert"]["held"] is False
    assert seen["alert"]["previous"].slot == T0 and seen["alert"]["reason"].startswith("recovered: ")
    assert seen["value"] is None


def test_values_are_kept_as_json_numbers_dates_as_text() -> None:
    assert alert.from_json(alert.to_json({"a": Decimal("1.5"), "d": T0, "l": (1, 2)})) == {"a": 1.5, "d": T0.isoformat(), "l": [1, 2]}
    assert math.isnan(alert.from_json(alert.to_json(float("nan"))))


class Store:
    """An EvaluationStore in memory."""

    def __init__(self) -> None:
        self.kept: dict[datetime, Evaluation] = {}

    def evaluation(self, report: str, slot: datetime) -> Evaluation | None:
        return self.kept.get(slot)

    def previous_evaluation(self, report: str, before: datetime) -> Evaluation | None:
        earlier = [s for s in self.kept if s < before]
        return self.kept[max(earlier)] if earlier else None

    def record_evaluation(self, found: Evaluation) -> Evaluation:
        kept = self.kept.setdefault(found.slot, found)
        return replace(kept, value=alert.from_json(alert.to_json(kept.value)))


def test_judge_without_recording_reads_the_recorded_slot_else_evaluates_and_keeps_nothing() -> None:
    store = Store()
    policy = Policy("value > 1", value="rows | sum(attribute='revenue')")
    rows = [{"revenue": Decimal("1234.5")}]
    scheduled, _ = alert.judge(store, "r", policy, T0, rows, ["revenue"])
    manual, before = alert.judge(store, "r", policy, T0 + HOUR / 2, [], ["revenue"], record=False)
    assert (manual.held, manual.decision, before) == (False, NOT_SENT, scheduled) and set(store.kept) == {T0}
    # The same value an email would show from the ledger: a float, not a Decimal.
    again, _ = alert.judge(store, "r", policy, T0 + HOUR, rows, ["revenue"], record=False)
    assert type(again.value) is float and again.value == 1234.5 and set(store.kept) == {T0}
    # A slot recorded already keeps its decision, however the data changed.
    assert alert.judge(store, "r", policy, T0, [], ["revenue"], record=False)[0] == scheduled
