"""Alerts: a report whose `when:` condition over its rows decides whether a slot sends.

Pure logic, tested with tables: compiling the condition and the declared `value`, evaluating them over
a slot's rows and the previous evaluation, and the decision (send the alert, send the recovered email,
or send nothing, with the reason a person reads in `reporter history`). `judge` binds them to the
ledger, where the first evaluation of a slot is recorded and is that slot's truth: a retry, a
redelivered message or a second `send --slot` reads the recorded decision instead of evaluating again.
Only scheduled slots record: a manual send evaluates for itself unless its slot was recorded.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, ItemsView, Iterator, KeysView, Mapping, Sequence, ValuesView
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, Protocol

import jinja2
import jinja2.meta
from jinja2 import nodes
from jinja2.sandbox import SandboxedEnvironment

from reporter.errors import INTERRUPTS, RenderError

if TYPE_CHECKING:
    from reporter.config import Report

Decision = Literal["send", "recovered", "not-sent"]
SEND: Decision = "send"
RECOVERED: Decision = "recovered"
NOT_SENT: Decision = "not-sent"
"""The decisions: send the alert, send the one recovered email, send nothing (the reason says why)."""

SlotText = Callable[[datetime], str]
"""How a reason writes a slot (`slot_label` in the report's zone; ISO by default)."""

ROWS_KEPT = 1000
"""Rows of an evaluation kept for the next slot's `previous.rows`; `previous.capped` says when there were more."""
ROWS_KEPT_BYTES = 256_000
"""...and at most this much of them as JSON, so that wide rows do not make a large ledger row either."""

SECONDS_RE = re.compile(r"\d+(?:\.\d+)?")
"""A duration written as a bare number in quotes ("90"): seconds, as the number 90 is."""
DURATION_RE = re.compile(r"(?:(\d+(?:\.\d+)?)d)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")

_env = SandboxedEnvironment(undefined=jinja2.StrictUndefined)


class ConditionError(RenderError):
    """The condition or the value could not be evaluated: a failure like a render failure, never a skip."""


# --------------------------------------------------------------------------- durations


def parse_duration(value: Any) -> float:
    """'30m', '24h', '2d', '1h30m', '90s' or a number of seconds (90 or '90') -> seconds (> 0). ValueError if not."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration; write '30m', '24h', '2d', '1h30m' or a number of seconds")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = str(value).strip().replace(" ", "")
        match = DURATION_RE.fullmatch(text)
        if SECONDS_RE.fullmatch(text):
            seconds = float(text)
        elif not text or match is None or not any(match.groups()):
            raise ValueError(f"{value!r} is not a duration; write '30m', '24h', '2d', '1h30m' or a number of seconds")
        else:
            d, h, m, s = (float(g) if g else 0.0 for g in match.groups())
            seconds = d * 86400 + h * 3600 + m * 60 + s
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{value!r} is not a duration above zero")
    return seconds


def duration_text(seconds: float) -> str:
    """86400 -> '24h', 5400 -> '1h30m', 90 -> '1m30s': as a person writes it in schedules.yaml."""
    whole = int(seconds)
    if whole % 86400 == 0 and whole >= 86400 * 2:
        return f"{whole // 86400}d"
    parts = []
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    return "".join(parts) or f"{seconds:g}s"


# --------------------------------------------------------------------------- expressions


def expression_problem(source: str) -> str | None:
    """Why SOURCE is not a Jinja expression (as `when:` and `value:` are written), or None."""
    try:
        compile_expression(source)
    except jinja2.TemplateSyntaxError as exc:
        return f"expression syntax error: {exc.message}"
    return None


NAMES = ("rows", "row_count", "columns", "slot", "previous", "value")
"""What `when:` sees; `value:` sees the same but `value`."""


def names_used(source: str) -> set[str]:
    """The names expression SOURCE reads (`previous.value` reads `previous`; Jinja's own globals such as
    `range` aside); empty if it does not parse."""
    try:
        return set(jinja2.meta.find_undeclared_variables(_env.parse("{{ " + source + " }}"))) - set(_env.globals)
    except jinja2.TemplateSyntaxError:
        return set()


def compile_expression(source: str) -> jinja2.environment.TemplateExpression:
    """SOURCE compiled in the sandbox (StrictUndefined: a misspelt name is an error, not false)."""
    if "{{" in source or "{%" in source:
        raise jinja2.TemplateSyntaxError("write the expression without {{ }}, e.g. rows | length > 0", 1)
    return _env.compile_expression(source, undefined_to_none=False)


def _left_side(source: str) -> nodes.Expr | None:
    """The left operand of SOURCE when SOURCE is one comparison (`rows | length > 0` -> `rows | length`)."""
    parsed = _env.parse("{{ " + source + " }}")
    body = parsed.body[0] if len(parsed.body) == 1 else None
    if isinstance(body, nodes.Output) and len(body.nodes) == 1 and isinstance(body.nodes[0], nodes.Compare):
        return body.nodes[0].expr
    return None


def _evaluate_node(node: nodes.Expr, context: Mapping[str, Any]) -> Any:
    template = _env.from_string(nodes.Template([nodes.Assign(nodes.Name("left", "store"), node)], lineno=1))
    module: Any = template.make_module(dict(context))
    return module.left


def show(value: Any, limit: int = 80) -> str:
    """VALUE as a reason shows it: short, on one line."""
    if isinstance(value, float) and value.is_integer():
        text = f"{value:g}" if abs(value) < 1e15 else repr(value)
    elif isinstance(value, (str, list, dict, tuple)):
        text = json.dumps(value, default=str, ensure_ascii=False)
    else:
        text = str(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- what a slot sees


@dataclass(frozen=True)
class Previous:
    """The last slot evaluated before this one, as conditions and templates see it (`previous.value`).

    Falsy when there was none; then `.value` and `.held` are None and `.rows` is empty, so
    `value != previous.value` simply holds in the first slot."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    value: Any = None
    held: bool | None = None
    slot: datetime | None = None
    row_count: int = 0
    capped: bool = False
    """True when the evaluation had more than ROWS_KEPT rows: `rows` holds the first ones only."""

    def __bool__(self) -> bool:
        return self.slot is not None


@dataclass(frozen=True)
class Evaluation:
    """One slot's evaluation as recorded in the ledger (table alert_evaluations)."""

    report: str
    slot: datetime
    held: bool
    value: Any
    rows: list[dict[str, Any]]
    row_count: int
    capped: bool
    decision: str
    reason: str
    held_since: datetime | None
    """The first slot of the run of slots in which the condition holds (None when it does not hold)."""
    last_alert: datetime | None
    """The slot of the last alert sent in that run: what renotify_after counts from."""
    evaluated_at: datetime | None = None

    def as_previous(self) -> Previous:
        return Previous(self.rows, self.value, self.held, self.slot, self.row_count, self.capped)


@dataclass(frozen=True)
class Policy:
    """What a report's alert options say: `when`, `value`, `notify`, `renotify_after`, `recovered`."""

    when: str
    value: str | None = None
    notify: str = "each"
    renotify_after: float | None = None
    recovered: bool = False

    @classmethod
    def of(cls, report: Report) -> Policy:
        assert report.when is not None
        return cls(report.when, report.value, report.notify, report.renotify_after, bool(report.recovered))


def context(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], slot: datetime, previous: Previous, value: Any = None
) -> dict[str, Any]:
    """What `when:` and `value:` see."""
    every = [dict(r) for r in rows]
    return {"rows": every, "row_count": len(every), "columns": list(columns), "slot": slot, "previous": previous, "value": value}


@dataclass(frozen=True)
class Verdict:
    """A condition evaluated: whether it holds, the declared value, and the text a reason quotes."""

    held: bool
    value: Any
    shown: str
    """`rows | length > 0 → 0`: the expression and what its left side (or the whole of it) came to."""


def evaluate(policy: Policy, ctx: Mapping[str, Any]) -> Verdict:
    """Evaluate POLICY's value, then its condition, over CTX. ConditionError if either cannot be."""
    ctx = dict(ctx)
    value = None
    if policy.value is not None:
        # Settled before `when` reads it: a generator read by `when` would be stored empty.
        value = _settled("value", policy.value, _run("value", policy.value, ctx), ctx)
        ctx["value"] = value
    result = _run("when", policy.when, ctx)
    if not isinstance(result, jinja2.Undefined):  # bool() of an undefined one says which name, below
        # Settled too: a generator (`rows | selectattr(...)` without `| list`) is truthy even when empty.
        result = _settled("when", policy.when, result, ctx)
    try:
        held = bool(result)
    except INTERRUPTS:
        raise
    except Exception as exc:  # noqa: BLE001 - an undefined result or a value whose bool() fails is the condition's fault
        raise ConditionError(f"condition error: when: {policy.when}: {_why(exc)}") from None
    try:
        left = _left_side(policy.when)
        shown = show(_materialise(result if left is None else _evaluate_node(left, ctx)))
    except INTERRUPTS:
        raise
    except Exception:  # noqa: BLE001 - the left side alone is only for the message (it may be undefined); the whole came out
        shown = show(held)
    return Verdict(held, value, f"{policy.when} → {shown}")


def _run(key: str, source: str, ctx: Mapping[str, Any]) -> Any:
    try:
        return compile_expression(source)(**ctx)
    except INTERRUPTS:
        raise
    except Exception as exc:  # noqa: BLE001 - user expressions fail in many ways; each is the report's failure
        raise ConditionError(f"condition error: {key}: {source}: {_why(exc)}") from None


class _UndefinedValue(ValueError):
    """An expression's result is, or holds, a Jinja Undefined (`rows | first` of no rows)."""


def _materialise(value: Any) -> Any:
    """VALUE with every iterator (a Jinja `map` or `select` without `| list`) made a list, in lists,
    tuples and dicts too; _UndefinedValue if it is or holds an undefined value."""
    if isinstance(value, jinja2.Undefined):
        raise _UndefinedValue
    if isinstance(value, (str, bytes)):
        return value
    if isinstance(value, dict):
        return {k: _materialise(v) for k, v in value.items()}
    if isinstance(value, (Iterator, KeysView, ValuesView, ItemsView, range, list)):
        return [_materialise(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_materialise(v) for v in value)
    return value


def _settled(key: str, source: str, result: Any, ctx: Mapping[str, Any]) -> Any:
    try:
        return _materialise(result)
    except _UndefinedValue:
        hint = " (no rows?)" if not ctx.get("rows") else ""
        raise ConditionError(f"condition error: {key}: {source}: is undefined{hint}") from None
    except INTERRUPTS:
        raise
    except Exception as exc:  # noqa: BLE001 - an iterator that fails while read is the expression's failure
        raise ConditionError(f"condition error: {key}: {source}: {_why(exc)}") from None


def _why(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return f"{type(exc).__name__}: {message}" if not isinstance(exc, jinja2.TemplateError) else str(message)


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Outcome:
    """What one slot does, and what carries over to the next."""

    decision: Decision
    reason: str
    held_since: datetime | None
    last_alert: datetime | None


def decide(policy: Policy, verdict: Verdict, slot: datetime, before: Evaluation | None, at: SlotText | None = None) -> Outcome:
    """The decision for SLOT, given POLICY, its VERDICT and BEFORE (the previous evaluation, which carries
    when the current run of holding slots began and when it last alerted). AT formats a slot for a reason
    (default: ISO in UTC)."""
    when: SlotText = at or (lambda s: s.isoformat())
    was_held = before is not None and before.held
    if verdict.held:
        if policy.notify == "each" or not was_held:
            since = before.held_since if was_held and before is not None else slot
            return Outcome(SEND, f"condition holds: {verdict.shown}", since, slot)
        assert before is not None
        since = before.held_since or before.slot
        last = before.last_alert
        if last is not None and policy.renotify_after is not None and slot - last >= timedelta(seconds=policy.renotify_after):
            return Outcome(
                SEND, f"condition still holds: {verdict.shown} (renotify_after {duration_text(policy.renotify_after)})", since, slot
            )
        # "alert", not "sent": a slot that decided to alert counts even if its delivery failed (its owners were told).
        sent = f"last alert {when(last)}" if last is not None else "no alert since"
        renotify = f"; renotify_after {duration_text(policy.renotify_after)}" if policy.renotify_after is not None else ""
        reason = f"condition holds but notify: change and it already held at {when(since)} ({sent}{renotify})"
        return Outcome(NOT_SENT, reason, since, last)
    if was_held and policy.recovered:
        return Outcome(RECOVERED, f"recovered: condition no longer holds: {verdict.shown}", None, None)
    return Outcome(NOT_SENT, f"condition false: {verdict.shown}", None, None)


def evaluation(
    report: str,
    policy: Policy,
    slot: datetime,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    before: Evaluation | None,
    at: SlotText | None = None,
) -> Evaluation:
    """SLOT of REPORT evaluated and decided (pure): what the ledger records. ConditionError if it cannot
    be, whatever the reason: the slot then fails with it, never stays unsent without one."""
    previous = before.as_previous() if before is not None else Previous()
    try:
        verdict = evaluate(policy, context(rows, columns, slot, previous))
        outcome = decide(policy, verdict, slot, before, at)
        kept = kept_rows(rows)
        to_json(verdict.value)  # what the ledger will write: fail here, with the reason, not when recording
    except ConditionError:
        raise
    except INTERRUPTS:
        raise
    except Exception as exc:  # noqa: BLE001 - anything else (a value JSON cannot hold) is still the alert's failure
        raise ConditionError(f"condition error: {_why(exc)}") from None
    return Evaluation(
        report,
        slot,
        verdict.held,
        verdict.value,
        kept,
        len(rows),
        len(kept) < len(rows),
        outcome.decision,
        outcome.reason,
        outcome.held_since,
        outcome.last_alert,
    )


def kept_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The first of ROWS, up to ROWS_KEPT rows and ROWS_KEPT_BYTES of JSON: what `previous.rows` keeps."""
    kept: list[dict[str, Any]] = []
    size = 0
    for row in rows[:ROWS_KEPT]:
        size += len(to_json(dict(row)))
        if size > ROWS_KEPT_BYTES:
            break
        kept.append(dict(row))
    return kept


def email_spec(report: Report, found: Evaluation) -> Report:
    """REPORT as the email of decision FOUND renders it: a recovered email with its own subject and templates."""
    if found.decision != RECOVERED or report.recovered is None:
        return report
    return report.model_copy(update={k: v for k, v in report.recovered.model_dump().items() if v is not None})


def slot_label(slot: datetime, zone: tzinfo) -> str:
    """A slot as a reason names it: in the report's zone, to the minute."""
    return slot.astimezone(zone).strftime("%Y-%m-%d %H:%M %Z")


def template_context(found: Evaluation, before: Evaluation | None) -> dict[str, Any]:
    """What a template sees of the alert: `alert` (held, recovered, value, previous, reason, decision) and `value`."""
    previous = before.as_previous() if before is not None else Previous()
    info = {
        "held": found.held,
        "recovered": found.decision == RECOVERED,
        "value": found.value,
        "previous": previous,
        "reason": found.reason,
        "decision": found.decision,
    }
    return {"alert": info, "value": found.value}


# --------------------------------------------------------------------------- JSON for the ledger


def to_json(value: Any) -> str:
    """VALUE as the ledger keeps it: numbers stay numbers (Decimal as float), dates become ISO text."""
    return json.dumps(value, default=_plain, ensure_ascii=False)


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def from_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


# --------------------------------------------------------------------------- with the ledger


class EvaluationStore(Protocol):
    """Where evaluations are recorded (the ledger)."""

    def evaluation(self, report: str, slot: datetime) -> Evaluation | None: ...

    def previous_evaluation(self, report: str, before: datetime) -> Evaluation | None: ...

    def record_evaluation(self, found: Evaluation) -> Evaluation: ...


def judge(
    store: EvaluationStore,
    report: str,
    policy: Policy,
    slot: datetime,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    at: SlotText | None = None,
    record: bool = True,
) -> tuple[Evaluation, Evaluation | None]:
    """(this slot's evaluation, the one before it): the recorded one if there is one, else evaluated now
    and, if RECORD, recorded unless another execution recorded first (then that one wins). ConditionError,
    recording nothing, if the condition cannot be evaluated. A manual send passes RECORD=False: what it
    decides must not become the next scheduled slot's `previous`."""
    found = store.evaluation(report, slot)
    before = store.previous_evaluation(report, slot)
    if found is None:
        found = evaluation(report, policy, slot, rows, columns, before, at)
        # Unrecorded, the value still reads as the ledger would give it back, so the email is the same.
        found = store.record_evaluation(found) if record else replace(found, value=from_json(to_json(found.value)))
    return found, before
